//! Schema evolution (issue 13): producers change the event schema without a single event
//! dead-lettered. Writer schemas by id, from a schema directory and from a Confluent-
//! compatible registry (its documented `GET /schemas/ids/{id}`, served by this test on
//! loopback: no registry server installs from the reachable package registries here, see
//! README), each resolved against Tally's reader schema once.

mod common;

use apache_avro::Schema;
use apache_avro::types::Value;
use common::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tally::pricing::Catalog;
use tally::simulate::{Generator, Kind, Message, SimulateOptions};

fn v1() -> serde_json::Value {
    serde_json::from_str(include_str!("../schemas/avro/usage_event.v1.avsc")).unwrap()
}

/// v2: two fields added (a defaulted string, an optional string).
fn v2() -> serde_json::Value {
    let mut s = v1();
    s.as_object_mut().unwrap().remove("tally.schema_id");
    let f = s["fields"].as_array_mut().unwrap();
    f.push(serde_json::json!({"name": "region", "type": "string", "default": "eu-west-1"}));
    f.push(serde_json::json!({"name": "request_id", "type": ["null", "string"], "default": null}));
    s
}

/// v0: an older writer without three optional fields.
fn v0(id: u32) -> serde_json::Value {
    let mut s = v1();
    s["tally.schema_id"] = serde_json::json!(id);
    s["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| !["user_agent", "request_ip", "latency_ms"].contains(&f["name"].as_str().unwrap()));
    s
}

/// A writer Tally cannot read: input_tokens as a string.
fn retyped() -> serde_json::Value {
    let mut s = v1();
    s.as_object_mut().unwrap().remove("tally.schema_id");
    for f in s["fields"].as_array_mut().unwrap() {
        if f["name"] == "input_tokens" {
            f["type"] = serde_json::json!("string");
            f["default"] = serde_json::json!("0");
        }
    }
    s
}

/// Re-encode a simulated event with another writer schema under `id`.
fn frame(id: u32, writer: &serde_json::Value, e: &tally::event::UsageEvent, n: usize) -> Vec<u8> {
    let schema = Schema::parse(writer).unwrap();
    let Value::Record(v1_fields) = tally::codec::to_value(&e.to_raw()) else { unreachable!() };
    let by_name: HashMap<String, Value> = v1_fields.into_iter().collect();
    let Schema::Record(r) = &schema else { unreachable!() };
    let fields = r
        .fields
        .iter()
        .map(|f| {
            let v = match f.name.as_str() {
                "region" => Value::String(format!("region-{}", n % 3)),
                "request_id" => Value::Union(1, Box::new(Value::String(format!("req-{n}")))),
                "input_tokens" if !matches!(f.schema, Schema::Long) => {
                    let Value::Long(t) = by_name["input_tokens"] else { unreachable!() };
                    Value::String(t.to_string())
                }
                name => by_name[name].clone(),
            };
            (f.name.clone(), v)
        })
        .collect();
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().unwrap();
    let body = writer.write_value_to_vec(Value::Record(fields)).unwrap();
    let mut out = vec![0u8];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A registry on loopback answering `GET /schemas/ids/{id}` from `schemas`.
async fn serve_registry(listener: tokio::net::TcpListener, schemas: Arc<HashMap<u32, String>>) {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    let app = axum::Router::new()
        .route(
            "/schemas/ids/{id}",
            axum::routing::get(
                |State(s): State<Arc<HashMap<u32, String>>>, Path(id): Path<u32>| async move {
                    match s.get(&id) {
                        Some(text) => (StatusCode::OK, axum::Json(serde_json::json!({"schema": text}))),
                        None => (
                            StatusCode::NOT_FOUND,
                            axum::Json(
                                serde_json::json!({"error_code": 40403, "message": "Schema not found"}),
                            ),
                        ),
                    }
                },
            ),
        )
        .route(
            "/schemas",
            axum::routing::get(|State(s): State<Arc<HashMap<u32, String>>>| async move {
                let mut listed: Vec<_> = s
                    .iter()
                    .map(|(id, text)| serde_json::json!({"subject": "usage-value", "version": id, "id": id, "schema": text}))
                    .collect();
                listed.sort_by_key(|l| l["id"].as_u64());
                axum::Json(listed)
            }),
        )
        .with_state(schemas);
    axum::serve(listener, app).await.unwrap();
}

fn simulated(n: usize, seed: u64) -> Vec<tally::event::UsageEvent> {
    let mut g = Generator::new(SimulateOptions {
        seed,
        accounts: 40,
        duplicate_share: 0.0,
        malformed_share: 0.0,
        ..SimulateOptions::default()
    });
    (0..n)
        .map(|_| match g.next_message().kind {
            Kind::Valid(e) => *e,
            other => panic!("only valid events asked for: {other:?}"),
        })
        .collect()
}

fn message(e: &tally::event::UsageEvent, payload: Vec<u8>) -> Message {
    Message { key: e.account_id.clone(), payload, partition: None, kind: Kind::Valid(Box::new(e.clone())) }
}

async fn debits_by_account(env: &TestEnv) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, -sum(amount_units)::bigint FROM ledger_entries WHERE kind = 'consume' GROUP BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

fn priced(events: &[tally::event::UsageEvent]) -> HashMap<String, i64> {
    let catalog = Catalog::load(&repo().join("examples/demo.toml")).unwrap();
    let mut want: HashMap<String, i64> = HashMap::new();
    for e in events {
        let cost = catalog.price(e).cost_units;
        if cost > 0 {
            *want.entry(e.account_id.clone()).or_default() += cost;
        }
    }
    want
}

/// v1, v2 (registry, two added fields) and v0 (schema directory, three fields missing) in
/// one topic: all billed exactly. An incompatible writer (registry) and an unknown id:
/// dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_writers_mixed_in_one_topic_are_billed_exactly() {
    let env = TestEnv::new(3).await;
    let dir = std::env::temp_dir().join(format!("tally-schemas-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("usage_event.v0.avsc"), v0(3).to_string()).unwrap();
    let registry: HashMap<u32, String> = [(2, v2().to_string()), (4, retyped().to_string())].into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_registry(listener, Arc::new(registry)));

    let events = simulated(3_000, 5);
    let mut messages = Vec::new();
    for (n, e) in events.iter().enumerate() {
        let payload = match n % 3 {
            0 => tally::codec::encode(&e.to_raw()),
            1 => frame(2, &v2(), e, n),
            _ => frame(3, &v0(3), e, n),
        };
        messages.push(message(e, payload));
    }
    // 7 events written with the incompatible schema, 5 with an id nobody knows.
    let bad = simulated(12, 99);
    for (n, e) in bad.iter().enumerate() {
        let mut e = e.clone();
        e.event_id = format!("bad-{n}");
        let payload = if n < 7 { frame(4, &retyped(), &e, n) } else { frame(99, &v2(), &e, n) };
        messages.push(message(&e, payload));
    }
    produce(&env.topic, &messages).await;
    let dir_arg = dir.to_str().unwrap().to_string();
    let mut run = env.spawn_run_env(
        "examples/demo.toml",
        0,
        &["--schema-dir", &dir_arg],
        &[("TALLY_SCHEMA_REGISTRY_URL", &registry_url)],
    );
    env.wait_for("every message applied or dead-lettered", Duration::from_secs(120), || async {
        env.count("SELECT count(*) FROM processed_events").await == events.len() as i64
            && env.count("SELECT count(*) FROM dead_letters").await == 12
    })
    .await;
    terminate(&mut run);
    assert_eq!(debits_by_account(&env).await, priced(&events), "every account billed exactly");
    let dead: Vec<(String, String)> =
        sqlx::query_as("SELECT code, reason FROM dead_letters ORDER BY source_partition, source_offset")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let incompatible: Vec<_> = dead.iter().filter(|(c, _)| c == "incompatible_schema").collect();
    assert_eq!(incompatible.len(), 7, "{dead:?}");
    assert!(
        incompatible.iter().all(|(_, r)| r.contains("input_tokens") && r.contains("schema id 4")),
        "{incompatible:?}"
    );
    assert_eq!(dead.iter().filter(|(c, r)| c == "unknown_schema" && r.contains("99")).count(), 5, "{dead:?}");
    // The usage log has every valid event too, v2's and v0's included.
    let ch: u64 = env.clickhouse().query("SELECT count() FROM usage_log FINAL").fetch_one().await.unwrap();
    assert_eq!(ch, events.len() as u64);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The registry is down for 30 s while v2 events arrive: nothing is applied and nothing
/// dead-lettered meanwhile; once it answers, every event is billed exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_loses_nothing_and_dead_letters_nothing() {
    let env = TestEnv::new(3).await;
    let port = free_port();
    let registry_url = format!("http://127.0.0.1:{port}");
    let mut run =
        env.spawn_run_env("examples/demo.toml", 0, &[], &[("TALLY_SCHEMA_REGISTRY_URL", &registry_url)]);
    let events = simulated(2_000, 8);
    let messages: Vec<_> =
        events.iter().enumerate().map(|(n, e)| message(e, frame(2, &v2(), e, n))).collect();
    let (first, second) = messages.split_at(1_000);
    produce(&env.topic, first).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    produce(&env.topic, second).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events").await,
        0,
        "nothing applied during the outage"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters").await,
        0,
        "nothing dead-lettered for an outage"
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(serve_registry(listener, Arc::new([(2, v2().to_string())].into())));
    env.wait_for("every event applied", Duration::from_secs(120), || async {
        env.count("SELECT count(*) FROM processed_events").await == events.len() as i64
    })
    .await;
    terminate(&mut run);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(debits_by_account(&env).await, priced(&events), "every account billed exactly");
}

/// The reader evolves by adding defaulted fields, writers by adding or dropping them: a
/// frame decodes to the same event and the same price whichever compatible writer wrote it.
#[test]
fn every_compatible_writer_decodes_to_the_same_price() {
    let catalog = Catalog::load(&repo().join("examples/demo.toml")).unwrap();
    let schemas = tally::codec::Schemas::new(None);
    let dir = std::env::temp_dir().join(format!("tally-schemas-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut with_id = v2();
    with_id["tally.schema_id"] = serde_json::json!(2);
    std::fs::write(dir.join("v2.avsc"), with_id.to_string()).unwrap();
    std::fs::write(dir.join("v0.avsc"), v0(3).to_string()).unwrap();
    assert_eq!(schemas.load_dir(&dir).unwrap(), 2);
    for (n, e) in simulated(500, 21).iter().enumerate() {
        let decode =
            |frame: Vec<u8>| tally::event::UsageEvent::parse(schemas.decode(&frame).unwrap()).unwrap();
        let from_v1 = decode(tally::codec::encode(&e.to_raw()));
        let mut from_v0 = decode(frame(3, &v0(3), e, n));
        let from_v2 = decode(frame(2, &v2(), e, n));
        assert_eq!(from_v2, from_v1, "v2's added fields are skipped");
        // v0 has no user_agent, request_ip, latency_ms: the reader's defaults (absent).
        assert_eq!(
            (from_v0.user_agent.take(), from_v0.request_ip.take(), from_v0.latency_ms.take()),
            (None, None, None)
        );
        let mut v1_without = from_v1.clone();
        (v1_without.user_agent, v1_without.request_ip, v1_without.latency_ms) = (None, None, None);
        assert_eq!(from_v0, v1_without);
        assert_eq!(catalog.price(&from_v0), catalog.price(&from_v1), "same price");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tally schema check` tells a producer before they ship; `tally schema list` shows ids.
#[test]
fn schema_check_and_list_on_the_command_line() {
    let dir = std::env::temp_dir().join(format!("tally-schemas-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (good, bad) = (dir.join("good.avsc"), dir.join("bad.avsc"));
    std::fs::write(&good, v2().to_string()).unwrap();
    std::fs::write(&bad, retyped().to_string()).unwrap();
    let tally =
        |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_tally")).args(args).output().unwrap();
    let out = tally(&["schema", "check", good.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = tally(&["schema", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("input_tokens"), "{out:?}");
    std::fs::remove_file(&good).unwrap();
    std::fs::remove_file(&bad).unwrap();
    std::fs::write(dir.join("v0.avsc"), v0(3).to_string()).unwrap();
    let out = tally(&["schema", "list", "--schema-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 3], "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a registry, `tally schema list` shows every schema it lists, readable or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_list_shows_the_registry_ids() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_registry(
        listener,
        Arc::new([(2, v2().to_string()), (4, retyped().to_string())].into()),
    ));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["schema", "list", "--schema-registry-url", &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seen: Vec<(u64, bool)> =
        lines.iter().map(|l| (l["id"].as_u64().unwrap(), l["readable"].as_bool().unwrap())).collect();
    assert_eq!(seen, [(1, true), (2, true), (4, false)], "{lines:?}");
    assert!(lines[2]["reason"].as_str().unwrap().contains("input_tokens"));
}
