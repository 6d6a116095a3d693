//! `POST /v1/authorize` under load while `tally run` ingests: `cargo bench --bench authorize`.
//!
//! A Rust loopback load generator (keep-alive HTTP/1.1 connections, each sending requests
//! back to back) against a release `tally run` that is consuming simulated traffic at the
//! same time. Prints requests/s and p50/p99/max latency. Baseline, same run, same server:
//! `GET /v1/nope`, a request that does no decision work (the router's JSON 404), so the
//! ratio separates authorize's own cost from HTTP and loopback overhead. Asserts nothing.
//!
//! Env: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (default 32), `BENCH_MESSAGES`
//! (traffic ingested meanwhile, default 200000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::{Duration, Instant};
use tally::api::auth::{NewToken, Role, create_token};
use tally::simulate::{Generator, SimulateOptions};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Figures {
    requests: usize,
    rps: f64,
    p50_us: u128,
    p99_us: u128,
    max_us: u128,
    statuses: std::collections::BTreeMap<u16, usize>,
}

async fn load(
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
    seconds: u64,
    connections: u64,
) -> Figures {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let url = url.to_string();
            let token = token.to_string();
            let body = body.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
                let mut lat = Vec::new();
                let mut statuses = std::collections::BTreeMap::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let req = match &body {
                        Some(b) => {
                            let mut b = b.clone();
                            b["account_id"] = serde_json::json!(format!("acct-{:04}", (c * 7 + i) % 200));
                            http.post(&url).bearer_auth(&token).json(&b)
                        }
                        None => http.get(&url).bearer_auth(&token),
                    };
                    let r = req.send().await.expect("request");
                    *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
                    let _ = r.bytes().await;
                    lat.push(started.elapsed().as_micros());
                    i += 1;
                }
                (lat, statuses)
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        let (lat, st) = t.await.unwrap();
        all.extend(lat);
        for (k, v) in st {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    let took = started.elapsed().max(Duration::from_secs(seconds));
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Figures {
        requests: all.len(),
        rps: all.len() as f64 / took.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: *all.last().unwrap(),
        statuses,
    }
}

#[tokio::main]
async fn main() {
    let seconds = env_u64("BENCH_SECONDS", 10);
    let connections = env_u64("BENCH_CONNECTIONS", 32);
    let messages = env_u64("BENCH_MESSAGES", 200_000) as usize;
    let env = TestEnv::new(6).await;
    let token =
        create_token(&env.pool, &NewToken { account_id: None, role: Role::Service, name: "bench".into() })
            .await
            .unwrap()
            .token;
    let mut generator = Generator::new(SimulateOptions { seed: 5, ..SimulateOptions::default() });
    let traffic: Vec<_> = (0..messages).map(|_| generator.next_message()).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut run = env.spawn_run("examples/demo.toml", port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    env.wait_for("http up", Duration::from_secs(60), || async {
        http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    // Ingest while the load runs.
    let topic = env.topic.clone();
    let producing = tokio::spawn(async move { produce(&topic, &traffic).await });
    let body = serde_json::json!({"account_id": "", "api_key_id": "key-0001-1", "feature": "ad_generations",
        "estimated_cost_usd": "0.01"});
    let auth = load(&format!("{base}/v1/authorize"), &token, Some(body), seconds, connections).await;
    let base_line = load(&format!("{base}/v1/nope"), &token, None, seconds, connections).await;
    producing.await.unwrap();
    let ingested = env.count("SELECT count(*) FROM processed_events").await;
    terminate(&mut run);
    println!(
        "authorize bench: {connections} connections x {seconds} s, while ingesting ({ingested} events applied by the end)"
    );
    for (name, f) in [("POST /v1/authorize", &auth), ("baseline GET /v1/nope (404)", &base_line)] {
        println!(
            "  {name:<30} {:>9.0} req/s  p50 {:>6} us  p99 {:>6} us  max {:>7} us  ({} requests, statuses {:?})",
            f.rps, f.p50_us, f.p99_us, f.max_us, f.requests, f.statuses
        );
    }
    println!("  ratio authorize / baseline    {:>9.3}", auth.rps / base_line.rps);
}
