//! Payments in, end to end, against real Postgres and local servers that speak the
//! providers' protocols (started here, on loopback; no network):
//! - checkout: the amount or pack checked before payment, the session created at the
//!   Stripe-compatible / Polar-compatible server (its requests recorded and checked), then
//!   the provider's signed webhook (Stripe's and Standard Webhooks' real schemes) credits
//!   the payment once (Reeve's packs, Brokr's $25 default, Struere's $1 minimum);
//! - Stripe subscriptions driving BroomVA's plans: created, upgraded, redelivered, out of
//!   order, payment failed, replaced, deleted.

mod common;

use common::providers::{POLAR_TOKEN, Provider, Received, STRIPE_KEY, spawn_provider};
use common::*;
use std::sync::Arc;
use tally::api::auth::{NewToken, Role, create_token};
use tally::api::{self, AppState};
use tally::ledger;
use tally::payments::client::{ProviderAccount, Providers};
use tokio_util::sync::CancellationToken;

const USD: i64 = tally::money::UNITS_PER_USD;
const STRIPE_WEBHOOK_SECRET: &str = "whsec_payments";
const POLAR_WEBHOOK_SECRET: &str = "polar_whs_payments";

struct App {
    env: TestEnv,
    base: String,
    http: reqwest::Client,
    provider: Provider,
    _stop: (tokio_util::sync::DropGuard, tokio_util::sync::DropGuard),
}

/// Tally's API for `catalog`, its providers pointed at the local server (`stripe_key`:
/// the secret Tally was given).
async fn spawn_app(catalog: &str, stripe_key: &str) -> App {
    let env = TestEnv::new(1).await;
    let path = repo().join(catalog);
    let (provider_base, provider, provider_stop) = spawn_provider().await;
    let account =
        |secret: &str| Some(ProviderAccount { base_url: provider_base.clone(), secret: secret.into() });
    let state = AppState {
        pool: env.pool.clone(),
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle(),
        ledger_config: Arc::new(ledger::config::LedgerConfig::load(&path).unwrap()),
        stripe_webhook_secret: Some(STRIPE_WEBHOOK_SECRET.into()),
        polar_webhook_secret: Some(POLAR_WEBHOOK_SECRET.into()),
        auth: Arc::new(api::auth::TokenCache::new(env.pool.clone(), api::auth::TOKEN_CACHE_TTL)),
        clickhouse: env.clickhouse(),
        quota: Default::default(),
        quota_config: Arc::new(tally::quota::config::QuotaConfig::load(&path).unwrap()),
        catalog: Arc::new(tally::pricing::Catalog::load(&path).unwrap()),
        payments: Arc::new(Providers::new(account(stripe_key), account(POLAR_TOKEN)).unwrap()),
        holds: Arc::new(tally::ledger::holds::HoldQueue::new(env.pool.clone())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(api::serve(listener, state, stop.clone()));
    App { env, base, http: reqwest::Client::new(), provider, _stop: (stop.drop_guard(), provider_stop) }
}

impl App {
    async fn token(&self, account: &str) -> String {
        let req =
            NewToken { account_id: Some(account.into()), role: Role::Bankroller, name: "billing".into() };
        create_token(&self.env.pool, &req).await.unwrap().token
    }

    async fn checkout(
        &self,
        account: &str,
        token: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let path = format!("/v1/accounts/{account}/checkout");
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let json: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
        common::spec::check_response("POST", &path, status, &json);
        (status, json)
    }

    async fn stripe_event(&self, event: serde_json::Value) -> (u16, serde_json::Value) {
        let body = event.to_string();
        let signature =
            api::stripe::sign(body.as_bytes(), STRIPE_WEBHOOK_SECRET, chrono::Utc::now().timestamp());
        let r = self
            .http
            .post(format!("{}/v1/webhooks/stripe", self.base))
            .header("Stripe-Signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let json: serde_json::Value = r.json().await.unwrap();
        common::spec::check_response("POST", "/v1/webhooks/stripe", status, &json);
        (status, json)
    }

    async fn polar_event(&self, id: &str, event: serde_json::Value) -> (u16, serde_json::Value) {
        let body = event.to_string();
        let now = chrono::Utc::now().timestamp();
        let r = self
            .http
            .post(format!("{}/v1/webhooks/polar", self.base))
            .header("webhook-id", id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", api::polar::sign(id, now, body.as_bytes(), POLAR_WEBHOOK_SECRET))
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    fn received(&self) -> Vec<Received> {
        self.provider.received.lock().unwrap().clone()
    }

    async fn balance_units(&self, account: &str) -> i64 {
        ledger::balance(&self.env.pool, account).await.unwrap().map_or(0, |b| b.balance_units)
    }

    async fn plan(&self, account: &str) -> Option<String> {
        sqlx::query_scalar("SELECT plan FROM account_plans WHERE account_id = $1")
            .bind(account)
            .fetch_optional(&self.env.pool)
            .await
            .unwrap()
    }
}

fn field<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// What Stripe sends once the customer paid the session: the session, with what Tally
/// put in it (metadata), its payment intent and the amount.
fn session_completed(session: &Received, session_id: &str, payment_intent: &str) -> serde_json::Value {
    let cents: i64 = field(session, "line_items[0][price_data][unit_amount]").unwrap().parse().unwrap();
    serde_json::json!({"id": format!("evt_{session_id}"), "type": "checkout.session.completed",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {"id": session_id, "object": "checkout.session", "payment_intent": payment_intent,
            "amount_subtotal": cents, "amount_total": cents, "currency": "usd", "payment_status": "paid",
            "client_reference_id": field(session, "client_reference_id"),
            "metadata": {"account_id": field(session, "metadata[account_id]")}}}})
}

#[tokio::test]
async fn reeve_buys_a_pack_through_stripe_checkout_and_the_webhook_credits_it_once() {
    let app = spawn_app("examples/reeve.toml", STRIPE_KEY).await;
    let a = "acct-reeve-pack";
    let token = app.token(a).await;

    // Refused before payment: no session is created for any of these.
    for (body, code) in [
        (serde_json::json!({"pack": "mega"}), "unknown_pack"),
        (serde_json::json!({"amount_usd": "101"}), "amount_out_of_range"),
        (serde_json::json!({"amount_usd": "4.99"}), "amount_out_of_range"),
        (serde_json::json!({"amount_usd": "10.005"}), "invalid_amount"),
        (serde_json::json!({"amount_usd": "25", "pack": "standard"}), "amount_and_pack"),
        (serde_json::json!({}), "amount_required"),
    ] {
        let (status, json) = app.checkout(a, &token, body.clone()).await;
        assert_eq!((status, json["error"]["code"].as_str()), (422, Some(code)), "{body}");
    }
    assert!(app.received().is_empty(), "nothing reached the provider");
    // Another account's token cannot start a purchase here (404: not even its existence
    // is told), nor a token without the billing capability (403).
    let other = app.token("acct-someone-else").await;
    assert_eq!(app.checkout(a, &other, serde_json::json!({"pack": "standard"})).await.0, 404);
    let builder = NewToken { account_id: Some(a.into()), role: Role::Builder, name: "ci".into() };
    let builder = create_token(&app.env.pool, &builder).await.unwrap().token;
    assert_eq!(app.checkout(a, &builder, serde_json::json!({"pack": "standard"})).await.0, 403);

    let (status, json) = app.checkout(a, &token, serde_json::json!({"pack": "standard"})).await;
    assert_eq!(status, 201, "{json}");
    assert_eq!(
        (json["provider"].as_str(), json["amount_usd"].as_str(), json["pack"].as_str()),
        (Some("stripe"), Some("25"), Some("standard"))
    );
    let session_id = json["session_id"].as_str().unwrap().to_string();
    assert_eq!(json["checkout_url"], format!("https://checkout.stripe.test/c/pay/{session_id}"));
    let sent = app.received();
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s.authorization.as_deref(), Some("Bearer sk_test_tally"));
    assert_eq!(field(s, "mode"), Some("payment"));
    assert_eq!(field(s, "line_items[0][price_data][unit_amount]"), Some("2500"));
    assert_eq!(field(s, "line_items[0][price_data][currency]"), Some("usd"));
    assert_eq!(field(s, "metadata[account_id]"), Some(a));
    assert_eq!(field(s, "payment_intent_data[metadata][account_id]"), None);
    assert_eq!(field(s, "success_url"), Some("https://reeve.example/cockpit/settings/billing?purchase=done"));
    assert_eq!(app.balance_units(a).await, 0, "nothing is credited before payment");

    // The customer pays. Stripe sends the payment intent's event (here first) and the
    // session's: the session's credits $25 (its subtotal), once, redelivered or not.
    let intent = serde_json::json!({"id": "evt_pi_reeve_1", "type": "payment_intent.succeeded",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {"id": "pi_reeve_1", "amount_received": 2_675, "currency": "usd",
            "metadata": {"tally_checkout": field(s, "payment_intent_data[metadata][tally_checkout]")}}}});
    assert_eq!(app.stripe_event(intent).await.1["outcome"], "settled_by_checkout");
    assert_eq!(app.balance_units(a).await, 0, "not the taxed total, not a review");
    let done = session_completed(s, &session_id, "pi_reeve_1");
    assert_eq!(app.stripe_event(done.clone()).await.1["outcome"], "credited");
    assert_eq!(app.stripe_event(done).await.1["outcome"], "already_recorded");
    assert_eq!(app.balance_units(a).await, 25 * USD);

    // The same idempotency key twice: one Stripe session (Stripe's own idempotency).
    let body = serde_json::json!({"pack": "power", "idempotency_key": "buy-power-1"});
    let first = app.checkout(a, &token, body.clone()).await.1;
    let again = app.checkout(a, &token, body).await.1;
    assert_eq!(first["session_id"], again["session_id"]);
    assert_eq!(app.received().len(), 2);
    assert_eq!(
        app.received()[1].idempotency_key.as_deref(),
        Some("tally-checkout:acct-reeve-pack:buy-power-1")
    );
}

#[tokio::test]
async fn brokr_tops_up_25_by_default_and_a_provider_refusal_is_a_502() {
    let app = spawn_app("examples/brokr.toml", STRIPE_KEY).await;
    let a = "acct-brokr";
    let token = app.token(a).await;
    let (status, json) = app.checkout(a, &token, serde_json::json!({})).await;
    assert_eq!((status, json["amount_usd"].as_str(), json["pack"].is_null()), (201, Some("25"), true));
    assert_eq!(field(&app.received()[0], "line_items[0][price_data][unit_amount]"), Some("2500"));
    let (status, json) = app.checkout(a, &token, serde_json::json!({"amount_usd": 1000})).await;
    assert_eq!((status, json["amount_usd"].as_str()), (201, Some("1000")));
    assert_eq!(app.checkout(a, &token, serde_json::json!({"amount_usd": "1000.01"})).await.0, 422);

    // Tally holding a key Stripe does not accept: Stripe's refusal, as 502 with its message.
    let app = spawn_app("examples/brokr.toml", "sk_test_revoked").await;
    let token = app.token(a).await;
    let (status, json) = app.checkout(a, &token, serde_json::json!({})).await;
    assert_eq!((status, json["error"]["code"].as_str()), (502, Some("payment_provider_error")));
    assert!(json["error"]["message"].as_str().unwrap().contains("Invalid API Key"), "{json}");
}

/// The answer says what the payment will credit, bonus tiers included, also in the
/// catalog's display unit: Brievio's $100 credits $110 (+10%), Reeve's credits are dollars.
#[tokio::test]
async fn a_checkout_says_what_it_will_credit_in_the_platforms_unit() {
    let app = spawn_app("examples/brievio.toml", STRIPE_KEY).await;
    let token = app.token("acct-brievio").await;
    let (status, json) = app.checkout("acct-brievio", &token, serde_json::json!({"amount_usd": "100"})).await;
    assert_eq!(status, 201, "{json}");
    assert_eq!(
        (json["amount_usd"].as_str(), json["credit_usd"].as_str()),
        (Some("100"), Some("110.00000000"))
    );
    assert_eq!(json["display"]["credit"]["shown"], "110.00");
    assert_eq!(json["display"]["amount"]["shown"], "100.00");
    let reeve = spawn_app("examples/reeve.toml", STRIPE_KEY).await;
    let token = reeve.token("acct-reeve").await;
    let (_, json) = reeve.checkout("acct-reeve", &token, serde_json::json!({"pack": "starter"})).await;
    assert_eq!(json["credit_usd"], "5.00000000");
    assert_eq!(
        (json["display"]["unit"].as_str(), json["display"]["credit"]["value"].as_str()),
        (Some("credit"), Some("5"))
    );
}

#[tokio::test]
async fn struere_buys_through_polar_at_a_dollar_or_more_credited_once_per_order() {
    let app = spawn_app("examples/struere.toml", STRIPE_KEY).await;
    let a = "org-struere";
    let token = app.token(a).await;
    let (status, json) = app.checkout(a, &token, serde_json::json!({"amount_usd": "0.99"})).await;
    assert_eq!((status, json["error"]["code"].as_str()), (422, Some("amount_out_of_range")));
    assert!(app.received().is_empty(), "the minimum is enforced before payment");

    let (status, json) = app.checkout(a, &token, serde_json::json!({"amount_usd": "12.34"})).await;
    assert_eq!((status, json["provider"].as_str()), (201, Some("polar")), "{json}");
    let sent = app.received();
    assert_eq!(sent[0].path, "/v1/checkouts/");
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer polar_oat_tally"));
    assert_eq!(sent[0].json["amount"], 1234);
    assert_eq!(sent[0].json["products"][0], "00000000-0000-4000-8000-000000000001");
    assert_eq!(sent[0].json["metadata"]["account_id"], a);
    assert_eq!(sent[0].json["external_customer_id"], a);

    // Polar copies the checkout's metadata onto the order; order.updated (paid) credits it,
    // cents -> microdollars exactly, once per order id whatever the delivery.
    let order = serde_json::json!({"type": "order.updated", "data": {"id": "ord_1", "status": "paid",
        "currency": "usd", "subtotal_amount": 1234, "amount": 1234, "metadata": sent[0].json["metadata"]}});
    assert_eq!(app.polar_event("msg_1", order.clone()).await.1["outcome"], "credited");
    assert_eq!(app.polar_event("msg_2", order).await.1["outcome"], "already_recorded");
    assert_eq!(app.balance_units(a).await, 1234 * USD / 100);
}

fn subscription_event(
    id: &str,
    kind: &str,
    created: i64,
    subscription: &str,
    account: &str,
    status: &str,
    price: &str,
) -> serde_json::Value {
    serde_json::json!({"id": id, "type": kind, "created": created,
        "data": {"object": {"id": subscription, "object": "subscription", "status": status,
            "customer": "cus_1", "metadata": {"account_id": account},
            "items": {"data": [{"price": {"id": price}}]}}}})
}

#[tokio::test]
async fn broomva_subscriptions_drive_plans_once_in_order_with_the_plan_rules() {
    let app = spawn_app("examples/broomva.toml", STRIPE_KEY).await;
    let a = "org-broomva";
    let t0 = chrono::Utc::now().timestamp() - 1_000;
    let sub = |id: &str, kind: &str, dt: i64, status: &str, price: &str| {
        subscription_event(id, kind, t0 + dt, "sub_1", a, status, price)
    };
    let outcome = |r: (u16, serde_json::Value)| {
        assert_eq!(r.0, 200, "{}", r.1);
        r.1["outcome"].as_str().unwrap().to_string()
    };

    // Created, not paid yet: nothing. Then active on pro: the plan and its $50 allocation.
    let e = sub("evt_1", "customer.subscription.created", 0, "incomplete", "price_broomva_pro_monthly");
    assert_eq!(outcome(app.stripe_event(e).await), "incomplete");
    assert_eq!(app.plan(a).await, None);
    let e = sub("evt_2", "customer.subscription.updated", 10, "active", "price_broomva_pro_monthly");
    assert_eq!(outcome(app.stripe_event(e.clone()).await), "plan_set");
    assert_eq!(app.plan(a).await.as_deref(), Some("pro"));
    assert_eq!(app.balance_units(a).await, 50 * USD);
    // Redelivered: the same change, once.
    assert_eq!(outcome(app.stripe_event(e).await), "plan_set");
    assert_eq!(app.balance_units(a).await, 50 * USD);

    // Upgraded to team: the allocation difference, prorated over the rest of the period
    // (the plan rules; here the whole period remains, so within a cent of $150).
    let e = sub("evt_3", "customer.subscription.updated", 20, "active", "price_broomva_team_monthly");
    assert_eq!(outcome(app.stripe_event(e).await), "plan_upgraded");
    assert_eq!(app.plan(a).await.as_deref(), Some("team"));
    let after_upgrade = app.balance_units(a).await;
    assert!((199 * USD..=200 * USD).contains(&after_upgrade), "{after_upgrade}");
    let audit = app.env.count("SELECT count(*) FROM plan_changes WHERE account_id = 'org-broomva' AND created_by = 'stripe:evt_3'").await;
    assert_eq!(audit, 1, "audited as Stripe's change");

    // Out of order: an update created before evt_3 arriving now changes nothing.
    let late = sub("evt_late", "customer.subscription.updated", 15, "active", "price_broomva_pro_monthly");
    assert_eq!(outcome(app.stripe_event(late).await), "stale_event");
    assert_eq!(app.plan(a).await.as_deref(), Some("team"));

    // A failed renewal: noted (counted, logged); the plan stays while Stripe retries.
    let failed = serde_json::json!({"id": "evt_4", "type": "invoice.payment_failed", "created": t0 + 30,
        "data": {"object": {"id": "in_1", "object": "invoice", "subscription": "sub_1",
            "subscription_details": {"metadata": {"account_id": a}}}}});
    assert_eq!(outcome(app.stripe_event(failed).await), "payment_failed_noted");
    let e = sub("evt_5", "customer.subscription.updated", 40, "past_due", "price_broomva_team_monthly");
    assert_eq!(outcome(app.stripe_event(e).await), "past_due");
    assert_eq!(app.plan(a).await.as_deref(), Some("team"));

    // A price the catalog does not map: acknowledged, nothing changed.
    let e = sub("evt_6", "customer.subscription.updated", 50, "active", "price_unknown");
    assert_eq!(outcome(app.stripe_event(e).await), "unknown_price");
    assert_eq!(app.plan(a).await.as_deref(), Some("team"));

    // The customer moves to a new subscription (pro); the old one's deletion afterwards
    // must not take the account to free.
    let e = subscription_event(
        "evt_7",
        "customer.subscription.created",
        t0 + 60,
        "sub_2",
        a,
        "active",
        "price_broomva_pro_monthly",
    );
    assert_eq!(outcome(app.stripe_event(e).await), "plan_downgraded");
    assert_eq!(app.balance_units(a).await, 50 * USD, "a downgrade caps the balance at pro's allocation");
    let e = subscription_event(
        "evt_8",
        "customer.subscription.deleted",
        t0 + 70,
        "sub_1",
        a,
        "canceled",
        "price_broomva_team_monthly",
    );
    assert_eq!(outcome(app.stripe_event(e).await), "not_current_subscription");
    assert_eq!(app.plan(a).await.as_deref(), Some("pro"));

    // The current subscription ends: free, its balance capped at free's $0.50.
    let e = subscription_event(
        "evt_9",
        "customer.subscription.deleted",
        t0 + 80,
        "sub_2",
        a,
        "canceled",
        "price_broomva_pro_monthly",
    );
    assert_eq!(outcome(app.stripe_event(e).await), "plan_downgraded");
    assert_eq!(app.plan(a).await.as_deref(), Some("free"));
    assert_eq!(app.balance_units(a).await, USD / 2);

    // An event that names no account, or has no id: 422 (Stripe keeps retrying, visibly).
    let mut e = sub("evt_10", "customer.subscription.updated", 90, "active", "price_broomva_pro_monthly");
    e["data"]["object"]["metadata"] = serde_json::json!({});
    assert_eq!(app.stripe_event(e).await.1["error"]["code"], "missing_account");
    let mut e = sub("evt_11", "customer.subscription.updated", 90, "active", "price_broomva_pro_monthly");
    e.as_object_mut().unwrap().remove("id");
    assert_eq!(app.stripe_event(e).await.1["error"]["code"], "missing_event_id");
    ledger::verify(&app.env.pool).await.expect("ledger verify passes");
}
