//! A spec a client can trust (issue 12 item 7): schemathesis (PyPI) runs every operation of
//! `schemas/openapi.yaml` with all its checks (no 5xx, responses conforming to the spec,
//! documented status codes and content types, negative data refused with 4xx...) against a
//! real `tally run`, with a funded account and its owner token so requests reach the
//! handlers' logic rather than 404. A bounded number of examples per operation here; README
//! says how to run it longer.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Examples per operation in the suite (`TALLY_SCHEMATHESIS_EXAMPLES` to change).
const EXAMPLES: &str = "15";

#[tokio::test]
async fn schemathesis_finds_no_failure() {
    let env = TestEnv::new(1).await;
    let account = "acct-st";
    credit(&env, account, 100 * tally::money::UNITS_PER_USD).await;
    let owner = tally::api::auth::NewToken {
        account_id: Some(account.into()),
        role: tally::api::auth::Role::Owner,
        name: "schemathesis".into(),
    };
    let token = tally::api::auth::create_token(&env.pool, &owner).await.unwrap().token;
    let port = free_port();
    // Checkout reaches a local Stripe-compatible server (Brievio sells through Stripe).
    let (stripe_base, stripe, _stripe_stop) = common::providers::spawn_provider().await;
    let secret = [
        ("TALLY_STRIPE_WEBHOOK_SECRET", "whsec_schemathesis"),
        ("TALLY_POLAR_WEBHOOK_SECRET", "polar_st"),
        ("TALLY_STRIPE_SECRET_KEY", common::providers::STRIPE_KEY),
        ("TALLY_STRIPE_API_BASE", stripe_base.as_str()),
    ];
    let _run = env.spawn_run_env("examples/brievio.toml", port, &[], &secret);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    env.wait_for("tally run up", Duration::from_secs(60), || async {
        http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    let examples = std::env::var("TALLY_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| EXAMPLES.into());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(repo().join("scripts/schemathesis"))
            .args([&base, &token, account, &examples])
            .env("NO_COLOR", "1")
            .output()
            .expect("scripts/schemathesis runs")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    // Not vacuous: every operation was exercised.
    assert!(text.contains("Tested: 25"), "{text}");
    assert!(!stripe.received.lock().unwrap().is_empty(), "checkout reached the provider");
    println!("{text}");
}
