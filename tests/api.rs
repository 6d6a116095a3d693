//! The HTTP API against real Postgres: health, balances, JSON errors, Stripe webhooks
//! (good, bad, stale and replayed signatures; credit once per payment; async payments
//! pending until they settle).

mod common;

use common::*;
use std::sync::Arc;
use tally::api::{self, AppState, stripe};
use tally::ledger;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_test_secret";
const POLAR_SECRET: &str = "polar_whs_test_secret";
const USD: i64 = tally::money::UNITS_PER_USD;

struct App {
    env: TestEnv,
    base: String,
    http: reqwest::Client,
    _stop: tokio_util::sync::DropGuard,
}

async fn spawn_app() -> App {
    let env = TestEnv::new(1).await;
    let cfg = ledger::config::LedgerConfig::load(&repo().join("examples/brievio.toml")).unwrap();
    let state = AppState {
        pool: env.pool.clone(),
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle(),
        ledger_config: Arc::new(cfg),
        stripe_webhook_secret: Some(SECRET.into()),
        polar_webhook_secret: Some(POLAR_SECRET.into()),
        auth: Arc::new(api::auth::TokenCache::new(env.pool.clone(), api::auth::TOKEN_CACHE_TTL)),
        clickhouse: env.clickhouse(),
        quota: Default::default(),
        quota_config: Arc::new(
            tally::quota::config::QuotaConfig::load(&repo().join("examples/brievio.toml")).unwrap(),
        ),
        payments: Default::default(),
        catalog: Arc::new(tally::pricing::Catalog::load(&repo().join("examples/brievio.toml")).unwrap()),
        holds: Arc::new(tally::ledger::holds::HoldQueue::new(env.pool.clone())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(api::serve(listener, state, stop.clone()));
    App { env, base, http: reqwest::Client::new(), _stop: stop.drop_guard() }
}

impl App {
    async fn webhook(&self, body: &str, signature: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}/v1/webhooks/stripe", self.base))
            .header("Stripe-Signature", signature)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn signed(&self, body: &str) -> (u16, serde_json::Value) {
        self.webhook(body, &stripe::sign(body.as_bytes(), SECRET, chrono::Utc::now().timestamp())).await
    }

    async fn balance_units(&self, account: &str) -> i64 {
        ledger::balance(&self.env.pool, account).await.unwrap().map_or(0, |b| b.balance_units)
    }
}

fn payment_intent(pi: &str, account: &str, cents: i64) -> String {
    serde_json::json!({"id": format!("evt_{pi}"), "type": "payment_intent.succeeded",
        "data": {"object": {"id": pi, "amount_received": cents, "currency": "usd",
        "metadata": {"account_id": account}}}})
    .to_string()
}

fn checkout(kind: &str, pi: &str, account: &str, cents: i64, status: &str) -> String {
    serde_json::json!({"id": format!("evt_{kind}_{pi}"), "type": kind,
        "data": {"object": {"id": "cs_1", "payment_intent": pi, "amount_total": cents, "currency": "usd",
        "payment_status": status, "client_reference_id": account}}})
    .to_string()
}

#[tokio::test]
async fn webhook_signatures_good_bad_stale_and_replayed() {
    let app = spawn_app().await;
    let body = payment_intent("pi_1", "acct-w", 10_000);
    let (status, json) = app.signed(&body).await;
    assert_eq!((status, json["outcome"].as_str()), (200, Some("credited")));
    assert_eq!(app.balance_units("acct-w").await, 110 * USD, "$100 with Brievio's 10% bonus");

    // Replayed (same event, fresh valid signature, or the very same header): credited once.
    let header = stripe::sign(body.as_bytes(), SECRET, chrono::Utc::now().timestamp());
    assert_eq!(app.webhook(&body, &header).await.0, 200);
    assert_eq!(app.webhook(&body, &header).await.0, 200);
    assert_eq!(app.balance_units("acct-w").await, 110 * USD);

    let tampered = payment_intent("pi_1", "acct-w", 99_999);
    let (status, json) = app.webhook(&tampered, &header).await;
    assert_eq!((status, json["error"]["code"].as_str()), (400, Some("invalid_signature")));
    let wrong_secret = stripe::sign(body.as_bytes(), "whsec_other", chrono::Utc::now().timestamp());
    assert_eq!(app.webhook(&body, &wrong_secret).await.1["error"]["code"], "invalid_signature");
    let stale = stripe::sign(body.as_bytes(), SECRET, chrono::Utc::now().timestamp() - 301);
    let (status, json) = app.webhook(&body, &stale).await;
    assert_eq!((status, json["error"]["code"].as_str()), (400, Some("stale_signature")));
    assert_eq!(app.webhook(&body, "garbage").await.0, 400);
    assert_eq!(app.balance_units("acct-w").await, 110 * USD, "no bad request credited anything");
}

#[tokio::test]
async fn checkout_and_payment_intent_credit_once_and_async_payments_wait() {
    let app = spawn_app().await;
    // Both events of one card checkout: one credit.
    app.signed(&checkout("checkout.session.completed", "pi_c", "acct-c", 2_000, "paid")).await;
    app.signed(&payment_intent("pi_c", "acct-c", 2_000)).await;
    assert_eq!(app.balance_units("acct-c").await, 20 * USD);

    // ACH: pending until async_payment_succeeded; a failed one never credits.
    let (_, json) =
        app.signed(&checkout("checkout.session.completed", "pi_a", "acct-a", 5_000, "unpaid")).await;
    assert_eq!(json["outcome"], "pending");
    assert_eq!(app.balance_units("acct-a").await, 0);
    let pending = app.env.count("SELECT count(*) FROM topup_orders WHERE status = 'pending'").await;
    assert_eq!(pending, 1);
    app.signed(&checkout("checkout.session.async_payment_succeeded", "pi_a", "acct-a", 5_000, "paid")).await;
    assert_eq!(app.balance_units("acct-a").await, 50 * USD);
    app.signed(&checkout("checkout.session.completed", "pi_f", "acct-a", 5_000, "unpaid")).await;
    let (_, json) = app
        .signed(&checkout("checkout.session.async_payment_failed", "pi_f", "acct-a", 5_000, "unpaid"))
        .await;
    assert_eq!(json["outcome"], "failed");
    assert_eq!(app.balance_units("acct-a").await, 50 * USD);

    // Not captured yet and below Brievio's $10 minimum: refused (no money moved).
    let (status, json) =
        app.signed(&checkout("checkout.session.completed", "pi_u", "acct-a", 500, "unpaid")).await;
    assert_eq!((status, json["error"]["code"].as_str()), (422, Some("invalid_request")));
    // Without a payment id or an amount nothing can be recorded: 422.
    let no_amount = r#"{"type":"payment_intent.succeeded","data":{"object":{"id":"pi_x"}}}"#;
    assert_eq!(app.signed(no_amount).await.1["error"]["code"], "missing_amount");
    let (status, json) = app.signed("{not json").await;
    assert_eq!((status, json["error"]["code"].as_str()), (400, Some("malformed_body")));
    ledger::verify(&app.env.pool).await.unwrap();
}

#[tokio::test]
async fn health_balance_and_json_errors() {
    let app = spawn_app().await;
    let get = |path: &str| app.http.get(format!("{}{path}", app.base)).send();
    let r = get("/healthz").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    app.signed(&payment_intent("pi_b", "acct-b", 1_000)).await;
    let owner = tally::api::auth::NewToken {
        account_id: Some("acct-b".into()),
        role: tally::api::auth::Role::Owner,
        name: "t".into(),
    };
    let token = tally::api::auth::create_token(&app.env.pool, &owner).await.unwrap().token;
    let r = get("/v1/accounts/acct-b/balance").await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "balances need a token");
    let authed = |path: &str| app.http.get(format!("{}{path}", app.base)).bearer_auth(&token).send();
    let b: serde_json::Value = authed("/v1/accounts/acct-b/balance").await.unwrap().json().await.unwrap();
    assert_eq!((b["balance"].as_str(), b["balance_units"].as_i64()), (Some("10.00000000"), Some(10 * USD)));
    assert_eq!(b["effective_units"].as_i64(), Some(10 * USD));
    assert!(b["projected_days_remaining"].is_null(), "no burn yet: {b}");
    let r = authed("/v1/accounts/nobody/balance").await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "account_not_found");
    let long = "x".repeat(200);
    let r = authed(&format!("/v1/accounts/{long}/balance")).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = get("/v1/nope").await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "route_not_found");
    assert_eq!(get("/metrics").await.unwrap().status().as_u16(), 200);
}

/// Issue 11.1: money the processor captured is credited, or recorded in `needs_review`
/// with the reason and resolved by an operator exactly once; never refused or dropped.
#[tokio::test]
async fn captured_money_is_never_dropped() {
    use ledger::topup::{self, Resolution};
    let app = spawn_app().await;
    let cfg = ledger::config::LedgerConfig::load(&repo().join("examples/brievio.toml")).unwrap().topup;

    // A paid $5 Brievio payment (minimum $10): recorded for review, 200, nothing credited.
    let (status, json) = app.signed(&payment_intent("pi_small", "acct-r", 500)).await;
    assert_eq!((status, json["outcome"].as_str()), (200, Some("needs_review")));
    let (_, json) = app.signed(&payment_intent("pi_small", "acct-r", 500)).await;
    assert_eq!(json["outcome"], "already_recorded", "a redelivery records nothing new");
    assert_eq!(app.balance_units("acct-r").await, 0);
    let order = topup::find(&app.env.pool, "pi_small").await.unwrap().unwrap();
    assert_eq!((order.status.as_str(), order.amount_minor), ("needs_review", Some(500)));
    assert!(order.review_reason.as_deref().unwrap().contains("below the minimum"), "{order:?}");

    // Visible through the API to the account's billing token.
    let owner = tally::api::auth::NewToken {
        account_id: Some("acct-r".into()),
        role: tally::api::auth::Role::Owner,
        name: "t".into(),
    };
    let token = tally::api::auth::create_token(&app.env.pool, &owner).await.unwrap().token;
    let r = app.http.get(format!("{}/v1/accounts/acct-r/topups", app.base)).bearer_auth(&token).send().await;
    let list: serde_json::Value = r.unwrap().json().await.unwrap();
    assert_eq!(list["topups"][0]["status"], "needs_review");
    assert_eq!(list["topups"][0]["order_id"], "pi_small");
    let r =
        app.http.get(format!("{}/v1/accounts/acct-r/topups?limit=0", app.base)).bearer_auth(&token).send();
    assert_eq!(r.await.unwrap().status().as_u16(), 400);
    // The review queue alone, and a status that does not exist.
    let get = |query: &str| {
        app.http.get(format!("{}/v1/accounts/acct-r/topups?{query}", app.base)).bearer_auth(&token).send()
    };
    let queue: serde_json::Value = get("status=needs_review").await.unwrap().json().await.unwrap();
    let statuses: Vec<&str> =
        queue["topups"].as_array().unwrap().iter().map(|o| o["status"].as_str().unwrap()).collect();
    assert!(!statuses.is_empty() && statuses.iter().all(|s| *s == "needs_review"), "{queue}");
    let none: serde_json::Value = get("status=refund_noted").await.unwrap().json().await.unwrap();
    assert_eq!(none["topups"], serde_json::json!([]));
    assert_eq!(get("status=lost").await.unwrap().status().as_u16(), 400);

    // Another currency, and a payment that names no account: recorded, not refused.
    let eur = serde_json::json!({"type": "payment_intent.succeeded", "data": {"object": {"id": "pi_eur",
        "amount_received": 2_000, "currency": "EUR", "metadata": {"account_id": "acct-r"}}}})
    .to_string();
    assert_eq!(app.signed(&eur).await.1["outcome"], "needs_review");
    let anonymous =
        r#"{"type":"payment_intent.succeeded","data":{"object":{"id":"pi_anon","amount_received":5000}}}"#;
    assert_eq!(app.signed(anonymous).await.1["outcome"], "needs_review");
    assert_eq!(topup::review_backlog(&app.env.pool).await.unwrap().0, 3);
    // The operators' queue across accounts holds all three, the anonymous one included;
    // an account's own token may not read it.
    let operator = tally::api::auth::NewToken {
        account_id: None,
        role: tally::api::auth::Role::Operator,
        name: "ops".into(),
    };
    let operator = tally::api::auth::create_token(&app.env.pool, &operator).await.unwrap().token;
    let r = app.http.get(format!("{}/v1/topups", app.base)).bearer_auth(&operator).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let queue: serde_json::Value = r.json().await.unwrap();
    let mut ids: Vec<&str> =
        queue["topups"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["pi_anon", "pi_eur", "pi_small"]);
    let r = app.http.get(format!("{}/v1/topups", app.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "an owner token is not an operator");
    let r = app
        .http
        .get(format!("{}/v1/topups?status=lost", app.base))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // A checkout's payment intent ahead of its session: the session names the account and
    // the pre-tax amount, and the rules credit it ($50, no bonus below $100).
    let session = serde_json::json!({"type": "checkout.session.completed", "data": {"object": {
        "id": "cs_anon", "payment_intent": "pi_anon", "amount_subtotal": 5_000, "amount_total": 5_500,
        "currency": "usd", "payment_status": "paid", "client_reference_id": "acct-s"}}})
    .to_string();
    assert_eq!(app.signed(&session).await.1["outcome"], "credited");
    assert_eq!(app.balance_units("acct-s").await, 50 * USD);

    // The credit is the subtotal: tax is not credit. $100 + $10 tax -> $110 with the 10% bonus.
    let taxed = serde_json::json!({"type": "checkout.session.completed", "data": {"object": {
        "id": "cs_tax", "payment_intent": "pi_tax", "amount_subtotal": 10_000, "amount_total": 11_000,
        "currency": "usd", "payment_status": "paid", "client_reference_id": "acct-t"}}})
    .to_string();
    assert_eq!(app.signed(&taxed).await.1["outcome"], "credited");
    // ...and its payment intent (with the taxed amount) is the same payment: acknowledged.
    let (status, json) = app.signed(&payment_intent("pi_tax", "acct-t", 11_000)).await;
    assert_eq!((status, json["outcome"].as_str()), (200, Some("already_recorded")));
    assert_eq!(app.balance_units("acct-t").await, 110 * USD);
    // The same payment named for another account is a conflict, not a second credit.
    let (status, _) = app.signed(&payment_intent("pi_tax", "acct-x", 11_000)).await;
    assert_eq!(status, 409);

    // The operator credits the $5 once: a retry returns the same order, another
    // resolution is refused.
    let credit = Resolution::Credit { account_id: None, usd: None };
    let done =
        topup::resolve(&app.env.pool, &cfg, "pi_small", &credit, "ops@x", "customer asked").await.unwrap();
    assert_eq!((done.status.as_str(), done.resolution.as_deref()), ("succeeded", Some("credited")));
    assert_eq!(app.balance_units("acct-r").await, 5 * USD);
    let again = topup::resolve(&app.env.pool, &cfg, "pi_small", &credit, "ops@x", "retry").await.unwrap();
    assert_eq!(again.entry, done.entry);
    let refund =
        topup::resolve(&app.env.pool, &cfg, "pi_small", &Resolution::RefundNoted, "ops@x", "x").await;
    assert!(matches!(refund, Err(ledger::ops::LedgerError::InvalidState(_))), "{refund:?}");
    assert_eq!(app.balance_units("acct-r").await, 5 * USD, "credited exactly once");

    // EUR: the operator must say the USD amount; then it is credited, bonus tiers applied.
    let no_usd = topup::resolve(&app.env.pool, &cfg, "pi_eur", &credit, "ops@x", "fx").await;
    assert!(matches!(no_usd, Err(ledger::ops::LedgerError::Invalid(_))), "{no_usd:?}");
    let eur_credit = Resolution::Credit { account_id: None, usd: Some("21.80".parse().unwrap()) };
    topup::resolve(&app.env.pool, &cfg, "pi_eur", &eur_credit, "ops@x", "fx 1.09").await.unwrap();
    assert_eq!(app.balance_units("acct-r").await, 5 * USD + 2_180_000_000);

    // A refund noted: nothing credited, the order closed.
    let gbp = eur.replace("pi_eur", "pi_gbp").replace("EUR", "gbp");
    assert_eq!(app.signed(&gbp).await.1["outcome"], "needs_review");
    let noted = topup::resolve(
        &app.env.pool,
        &cfg,
        "pi_gbp",
        &Resolution::RefundNoted,
        "ops@x",
        "refunded in Stripe",
    )
    .await
    .unwrap();
    assert_eq!((noted.status.as_str(), noted.entry), ("refund_noted", None));
    assert_eq!(app.balance_units("acct-r").await, 5 * USD + 2_180_000_000);
    assert_eq!(topup::review_backlog(&app.env.pool).await.unwrap().0, 0);
    ledger::verify(&app.env.pool).await.unwrap();
}

/// A Stripe refund takes back the credits the refunded part of the payment bought (bonus
/// included), once per cumulative amount, whatever the delivery order, even into overdraft.
#[tokio::test]
async fn a_stripe_refund_takes_back_what_it_bought_once() {
    let app = spawn_app().await;
    let a = "acct-rf";
    // Brievio: $100 buys $110 (10% bonus).
    assert_eq!(app.signed(&payment_intent("pi_rf", a, 10_000)).await.1["outcome"], "credited");
    assert_eq!(app.balance_units(a).await, 110 * USD);
    let refund = |cents: i64| {
        serde_json::json!({"id": format!("evt_rf_{cents}"), "type": "charge.refunded",
            "data": {"object": {"id": "ch_rf", "payment_intent": "pi_rf", "amount_refunded": cents,
            "currency": "usd"}}})
        .to_string()
    };
    // Half of it: half of the $110.
    assert_eq!(app.signed(&refund(5_000)).await.1["outcome"], "refund_debited");
    assert_eq!(app.balance_units(a).await, 55 * USD);
    assert_eq!(app.signed(&refund(5_000)).await.1["outcome"], "already_recorded", "a redelivery");
    // Meanwhile the customer spends $50 of what is left.
    let spend = ledger::deductions::DeductionRequest {
        account_id: a.into(),
        amount_units: 50 * USD,
        idempotency_key: "spend".into(),
        description: "calls".into(),
        created_by: None,
    };
    ledger::deductions::deduct(&app.env.pool, &spend).await.unwrap();
    // A second partial refund (to $75 in all), then the full refund, then the first again
    // out of order: each cumulative amount once; the whole refund takes back the whole $110,
    // into overdraft because $50 of it was spent.
    assert_eq!(app.signed(&refund(7_500)).await.1["outcome"], "refund_debited");
    assert_eq!(app.balance_units(a).await, 5 * USD - (8_250_000_000 - 55 * USD));
    assert_eq!(app.signed(&refund(10_000)).await.1["outcome"], "refund_debited");
    assert_eq!(app.signed(&refund(7_500)).await.1["outcome"], "already_recorded", "out of order");
    assert_eq!(app.balance_units(a).await, -50 * USD);
    let debits: Vec<i64> = sqlx::query_scalar(
        "SELECT amount_units FROM ledger_entries WHERE account_id = $1 AND kind = 'payment_refund' ORDER BY entry_id",
    )
    .bind(a)
    .fetch_all(&app.env.pool)
    .await
    .unwrap();
    assert_eq!(debits, vec![-55 * USD, -2_750_000_000, -2_750_000_000]);
    // The payment's own grants paid back first: nothing left of them.
    let left: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(remaining_units), 0)::bigint FROM credit_grants WHERE account_id = $1",
    )
    .bind(a)
    .fetch_one(&app.env.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    let unknown = refund(100).replace("pi_rf", "pi_never");
    assert_eq!(app.signed(&unknown).await.1["outcome"], "unknown_payment");
    let report = ledger::verify(&app.env.pool).await.unwrap();
    assert_eq!(report.overdrawn_accounts, 1);
}

/// Polar (Struere): order.paid credits the order's subtotal once per order id, whatever
/// the delivery (a redelivery has a new webhook-id); signatures are Standard Webhooks'.
#[tokio::test]
async fn polar_orders_credit_once_with_verified_signatures() {
    let app = spawn_app().await;
    let a = "acct-polar";
    let post = |body: String, signature: Option<String>, id: &str| {
        let now = chrono::Utc::now().timestamp();
        let sig =
            signature.unwrap_or_else(|| tally::api::polar::sign(id, now, body.as_bytes(), POLAR_SECRET));
        app.http
            .post(format!("{}/v1/webhooks/polar", app.base))
            .header("webhook-id", id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", sig)
            .body(body)
            .send()
    };
    let order = |kind: &str, id: &str, cents: i64, status: &str| {
        serde_json::json!({"type": kind, "data": {"id": id, "status": status, "subtotal_amount": cents,
            "total_amount": cents + 200, "currency": "usd", "metadata": {"account_id": a}}})
        .to_string()
    };
    let outcome = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        (status, body["outcome"].as_str().unwrap_or_default().to_string())
    };
    // $25.00, before tax: 25,000,000 microdollars.
    let paid = order("order.paid", "ord_1", 2_500, "paid");
    assert_eq!(outcome(post(paid.clone(), None, "msg_1").await.unwrap()).await, (200, "credited".into()));
    assert_eq!(app.balance_units(a).await, 25 * USD);
    let updated = order("order.updated", "ord_1", 2_500, "paid");
    assert_eq!(outcome(post(updated, None, "msg_2").await.unwrap()).await, (200, "already_recorded".into()));
    assert_eq!(app.balance_units(a).await, 25 * USD, "once per order id");
    // Not paid yet: nothing; a forged signature: 400 and nothing.
    let pending = order("order.updated", "ord_2", 5_000, "pending");
    assert_eq!(outcome(post(pending, None, "msg_3").await.unwrap()).await, (200, "ignored".into()));
    let forged = order("order.paid", "ord_3", 100_000, "paid");
    let r = post(forged, Some("v1,AAAA".into()), "msg_4").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Below Brievio's $10 minimum: captured money is recorded for review, not refused.
    let small = order("order.paid", "ord_4", 500, "paid");
    assert_eq!(outcome(post(small, None, "msg_5").await.unwrap()).await, (200, "needs_review".into()));
    assert_eq!(app.balance_units(a).await, 25 * USD);
    ledger::verify(&app.env.pool).await.unwrap();
}
