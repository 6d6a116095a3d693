//! Two `tally run` instances in one consumer group, each owning some partitions: both
//! answer `authorize`, quotas and balances correctly for every account, from memory.

mod common;

use common::*;
use std::time::Duration;
use tally::api::auth::{NewToken, Role, create_token};
use tally::event::{RawUsageEvent, UsageEvent};

const ACCOUNTS: usize = 12;

fn feature_call(id: usize, account: usize) -> UsageEvent {
    UsageEvent::parse(RawUsageEvent {
        event_id: Some(format!("inst-{id}")),
        occurred_at: Some(chrono::Utc::now().to_rfc3339()),
        account_id: Some(format!("acct-{account}")),
        provider: Some("platform".into()),
        model: Some("ad_generations".into()),
        modality: Some("feature".into()),
        feature: Some("ad_generations".into()),
        status: Some("success".into()),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_answers_for_every_account() {
    let env = TestEnv::new(6).await;
    // Account i makes i calls of a feature whose free quota is 10 (demo catalog): accounts
    // 10 and 11 are at or over it, the others under.
    let mut messages = Vec::new();
    let mut n = 0;
    for account in 0..ACCOUNTS {
        for _ in 0..account {
            let e = feature_call(n, account);
            n += 1;
            messages.push(tally::simulate::Message {
                key: e.account_id.clone(),
                payload: tally::codec::encode(&e.to_raw()),
                partition: None,
                kind: tally::simulate::Kind::Valid(Box::new(e)),
            });
        }
    }
    produce(&env.topic, &messages).await;
    let token =
        create_token(&env.pool, &NewToken { account_id: None, role: Role::Service, name: "gw".into() })
            .await
            .unwrap()
            .token;
    let ports = [free_port(), free_port()];
    let mut runs: Vec<_> = ports.iter().map(|p| env.spawn_run("examples/demo.toml", *p, &[])).collect();
    // Applied, not just claimed: every message is below its partition's committed offset
    // (a claim commits before its batch, so counting claims could run ahead).
    env.wait_for("all events", Duration::from_secs(120), || async {
        env.count("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets").await
            == messages.len() as i64
    })
    .await;
    // Both members got partitions (a group of two over six partitions).
    let owners = env.count("SELECT count(DISTINCT partition) FROM consumer_offsets").await;
    assert!(owners >= 2, "events spread over partitions: {owners}");
    let http = reqwest::Client::new();
    for port in ports {
        let base = format!("http://127.0.0.1:{port}");
        // Memory catches up with the other instance's commits through the changelog, in
        // whatever order the two committed: poll briefly until every account is there.
        env.wait_for("state refreshed", Duration::from_secs(10), || async {
            for account in 0..ACCOUNTS {
                if quota_used(&http, &base, &token, account).await != Some(account as i64) {
                    return false;
                }
            }
            true
        })
        .await;
        for account in 0..ACCOUNTS {
            assert_eq!(quota_used(&http, &base, &token, account).await, Some(account as i64), "port {port}");
            let r = http
                .post(format!("{base}/v1/authorize"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"account_id": format!("acct-{account}"), "feature": "ad_generations"}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            if account >= 10 {
                assert_eq!((status, body["error"]["code"].as_str()), (429, Some("quota_exceeded")), "{body}");
            } else {
                // Under quota, but the wallet is empty (or negative after $0.02 calls): the
                // prepaid refusal, not the quota one.
                assert_eq!(
                    (status, body["error"]["code"].as_str()),
                    (402, Some("insufficient_quota")),
                    "{body}"
                );
            }
        }
    }
    for run in &mut runs {
        terminate(run);
    }
}

async fn quota_used(http: &reqwest::Client, base: &str, token: &str, account: usize) -> Option<i64> {
    let r =
        http.get(format!("{base}/v1/accounts/acct-{account}/quotas")).bearer_auth(token).send().await.ok()?;
    let body: serde_json::Value = r.json().await.ok()?;
    body["usage"]["ad_generations"]["used"].as_i64()
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct RowCount {
    rows: u64,
    ids: u64,
}

/// Scale-out with the largest statements Tally can build: 64-character event ids and the
/// maximum `batch_events_max`. A crashed attempt (fault hook: abort after the ClickHouse
/// insert, before COMMIT) leaves ClickHouse holding uncommitted rows, so every instance
/// must ask ClickHouse which of a batch's events it already has. That question is sent in
/// chunks below ClickHouse's `max_query_size`; one 50,000-id literal would be refused
/// (`Code: 62`) and retried forever, so neither instance would make progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_long_ids_and_maximum_batches_make_progress() {
    const EVENTS: usize = 60_000;
    let env = TestEnv::new(6).await;
    let messages: Vec<_> = (0..EVENTS)
        .map(|n| {
            let mut e = feature_call(n, n % 200);
            e.event_id = format!("evt_{n:060x}");
            assert_eq!(e.event_id.len(), 64);
            tally::simulate::Message {
                key: e.account_id.clone(),
                payload: tally::codec::encode(&e.to_raw()),
                partition: None,
                kind: tally::simulate::Kind::Valid(Box::new(e)),
            }
        })
        .collect();
    produce(&env.topic, &messages).await;
    // Duplicates collapse in ClickHouse's background merges: stop them, so any duplicate
    // row stays visible to the count below.
    env.clickhouse().query("SYSTEM STOP MERGES usage_log").execute().await.expect("stop merges");
    let big = ["--batch-events-max", "50000", "--batch-wait-ms", "3000"];
    let fault = [("TALLY_FAULT_ABORT_AFTER_CLICKHOUSE_INSERT", "1")];
    let mut crashed = env.spawn_run_env("examples/demo.toml", 0, &big, &fault);
    let status = wait_exit(&mut crashed, Duration::from_secs(120));
    assert!(!status.success(), "the fault hook aborts the process");
    // Its event ids were claimed (a short transaction of their own), but no debit and
    // no consumer progress was committed.
    assert_eq!(env.count("SELECT count(*) FROM ledger_entries").await, 0, "no debit committed");
    assert_eq!(
        env.count("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets").await,
        0,
        "no progress"
    );

    let mut runs: Vec<_> = (0..2).map(|_| env.spawn_run("examples/demo.toml", 0, &big)).collect();
    env.wait_for("every event committed by two instances", Duration::from_secs(300), || async {
        env.count("SELECT count(*) FROM processed_events").await == EVENTS as i64
    })
    .await;
    for run in &mut runs {
        terminate(run);
    }
    let ch: RowCount = env
        .clickhouse()
        .query("SELECT count() AS rows, uniqExact(event_id) AS ids FROM usage_log")
        .fetch_one()
        .await
        .expect("clickhouse count");
    assert_eq!(ch.ids, EVENTS as u64, "every event reached the usage log");
    assert_eq!(ch.rows, ch.ids, "and none twice, even before merges");
    let debits = env.count("SELECT count(*) FROM ledger_entries WHERE kind = 'consume'").await;
    assert_eq!(debits, EVENTS as i64, "one debit per event");
}

/// Send `n` holding authorizations at once, alternating between the two instances' APIs;
/// returns the status of each.
async fn hold_burst(
    http: &reqwest::Client,
    bases: &[String],
    token: &str,
    n: usize,
    body: serde_json::Value,
) -> Vec<u16> {
    let calls = (0..n).map(|i| {
        let req =
            http.post(format!("{}/v1/authorize", bases[i % bases.len()])).bearer_auth(token).json(&body);
        async move { req.send().await.expect("authorize").status().as_u16() }
    });
    futures::future::join_all(calls).await
}

fn tally_of(statuses: &[u16]) -> std::collections::BTreeMap<u16, usize> {
    let mut t = std::collections::BTreeMap::new();
    for s in statuses {
        *t.entry(*s).or_default() += 1;
    }
    t
}

/// Issue 16: holding authorize is exact across instances. 200 concurrent holds split
/// between two `tally run` instances: exactly 10 against a quota of 10, exactly 33 of $0.03
/// against $1.00. Holds survive the kill -9 of the instance that granted them, are settled
/// by the usage event (processed by the other instance) at the event's real cost, and an
/// expired one is counted in `tally_holds_expired_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holding_authorize_is_exact_across_two_instances() {
    let env = TestEnv::new(6).await;
    let token =
        create_token(&env.pool, &NewToken { account_id: None, role: Role::Service, name: "gw".into() })
            .await
            .unwrap()
            .token;
    for (account, units) in [("acct-q", 10_000_000_000i64), ("acct-w", 100_000_000), ("acct-x", 100_000_000)]
    {
        credit(&env, account, units).await;
    }
    let ports = [free_port(), free_port()];
    let mut runs: Vec<_> = ports.iter().map(|p| env.spawn_run("examples/demo.toml", *p, &[])).collect();
    let bases: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let http = reqwest::Client::new();
    for base in &bases {
        env.wait_for("instance up", Duration::from_secs(60), || async {
            http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await;
    }
    // Quota of 10 (demo catalog, free tier), a wallet that is not the limit.
    let quota = serde_json::json!({"account_id": "acct-q", "feature": "ad_generations", "hold": true,
                                   "estimated_cost_usd": "0.02"});
    let statuses = hold_burst(&http, &bases, &token, 200, quota.clone()).await;
    assert_eq!(tally_of(&statuses), [(200, 10), (429, 190)].into_iter().collect(), "quota of 10");
    // $1.00 and $0.03 estimates: 33 fit (0.99), the 34th does not.
    let money = serde_json::json!({"account_id": "acct-w", "hold": true, "estimated_cost_usd": "0.03"});
    let statuses = hold_burst(&http, &bases, &token, 200, money).await;
    assert_eq!(tally_of(&statuses), [(200, 33), (402, 167)].into_iter().collect(), "$1.00 / $0.03");

    // Kill -9 the first instance: the holds it granted live in Postgres, so the survivor
    // still counts all 10.
    kill9(&mut runs[0]);
    let one = |base: &str, body: &serde_json::Value| {
        let req = http.post(format!("{base}/v1/authorize")).bearer_auth(&token).json(body);
        async move {
            let r = req.send().await.expect("authorize");
            (r.status().as_u16(), r.json::<serde_json::Value>().await.expect("json"))
        }
    };
    let (s, b) = one(&bases[1], &quota).await;
    assert_eq!((s, b["error"]["code"].as_str()), (429, Some("quota_exceeded")), "{b}");
    // One of the 10 holds is settled by its usage event (consumed by the survivor) at the
    // event's price, $0.02 flat; then release another one: exactly one more is allowed.
    let (held,): (Vec<String>,) = sqlx::query_as(
        "SELECT array_agg(reservation_id ORDER BY reservation_id) FROM reservations
         WHERE account_id = 'acct-q' AND status = 'active'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(held.len(), 10);
    let mut e = feature_call(1_000_000, 0);
    e.account_id = "acct-q".into();
    e.reservation_id = Some(held[0].clone());
    produce(
        &env.topic,
        &[tally::simulate::Message {
            key: e.account_id.clone(),
            payload: tally::codec::encode(&e.to_raw()),
            partition: None,
            kind: tally::simulate::Kind::Valid(Box::new(e)),
        }],
    )
    .await;
    env.wait_for("the hold settled by its event", Duration::from_secs(90), || async {
        env.count(&format!(
            "SELECT count(*) FROM reservations WHERE reservation_id = '{}' AND status = 'settled'
               AND actual_units = 2000000",
            held[0]
        ))
        .await
            == 1
    })
    .await;
    let (s, _) = one(&bases[1], &quota).await;
    assert_eq!(s, 429, "a settled hold is a used unit");
    let r = http
        .post(format!("{}/v1/authorizations/{}/release", bases[1], held[1]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (s, b) = one(&bases[1], &quota).await;
    assert_eq!(s, 200, "the released unit, exactly once: {b}");
    let (s, _) = one(&bases[1], &quota).await;
    assert_eq!(s, 429);

    // An expired hold is released by the survivor's housekeeping and counted (leak detection).
    let short = serde_json::json!({"account_id": "acct-x", "feature": "ad_generations", "hold": true,
                                   "hold_ttl_secs": 1});
    assert_eq!(one(&bases[1], &short).await.0, 200);
    env.wait_for("the expiry counted", Duration::from_secs(30), || async {
        let text = http.get(format!("{}/metrics", bases[1])).send().await.unwrap().text().await.unwrap();
        text.lines().any(|l| l.starts_with("tally_holds_expired_total{kind=\"authorization\"} 1"))
    })
    .await;
    terminate(&mut runs[1]);
}
