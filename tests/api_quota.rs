//! `POST /v1/authorize`, quotas, limits, plan changes and the plan part of balances over
//! HTTP, against real Postgres: every refusal code with its OverageResult, roles and
//! cross-account access, malformed input.

mod common;

use chrono::Utc;
use common::*;
use std::sync::Arc;
use tally::api::auth::{NewToken, Role, create_token};
use tally::api::{self, AppState};
use tally::event::{RawUsageEvent, UsageEvent};
use tally::quota::config::QuotaConfig;
use tally::quota::state::QuotaState;
use tokio_util::sync::CancellationToken;

/// BroomVA's plans and Reeve's quotas in one configuration.
const CONFIG: &str = r#"
[limits]
cycle = "calendar_month"
[plans.free]
rank = 0
allocation_usd = "0.50"
overage_policy = "hard_limit"
allowed_providers = ["openrouter", "ollama"]
allowed_model_tiers = ["small"]
[plans.pro]
rank = 1
allocation_usd = "50"
overage_policy = "soft_limit"
[plans.enterprise]
rank = 3
allocation_usd = "0"
overage_policy = "warn"
self_serve = false
[quotas.ad_generations]
free = 2
pro = 100
"#;

struct App {
    env: TestEnv,
    base: String,
    http: reqwest::Client,
    quota: Arc<QuotaState>,
    _stop: tokio_util::sync::DropGuard,
}

async fn spawn_app() -> App {
    let env = TestEnv::new(1).await;
    let quota = Arc::new(QuotaState::default());
    let state = AppState {
        pool: env.pool.clone(),
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle(),
        ledger_config: Arc::new(Default::default()),
        stripe_webhook_secret: None,
        polar_webhook_secret: None,
        auth: Arc::new(tally::api::auth::TokenCache::new(
            env.pool.clone(),
            std::time::Duration::from_secs(30),
        )),
        clickhouse: env.clickhouse(),
        quota: quota.clone(),
        quota_config: Arc::new(QuotaConfig::from_toml_str(CONFIG, "test").unwrap()),
        payments: Default::default(),
        catalog: Arc::new(tally::pricing::Catalog::load(&repo().join("examples/broomva.toml")).unwrap()),
        holds: Arc::new(tally::ledger::holds::HoldQueue::new(env.pool.clone())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(api::serve(listener, state, stop.clone()));
    App { env, base, http: reqwest::Client::new(), quota, _stop: stop.drop_guard() }
}

impl App {
    async fn token(&self, account: Option<&str>, role: Role) -> String {
        let req = NewToken { account_id: account.map(str::to_string), role, name: "t".into() };
        create_token(&self.env.pool, &req).await.unwrap().token
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(url),
            "PUT" => self.http.put(url),
            _ => self.http.post(url),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let json = r.json().await.unwrap_or(serde_json::Value::Null);
        // Every answer must be what schemas/openapi.yaml documents.
        common::spec::check_response(method, path, status, &json);
        (status, json)
    }

    async fn authorize(&self, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call("POST", "/v1/authorize", Some(token), Some(&body.to_string())).await
    }
}

fn call(id: &str, account: &str, feature: Option<&str>, millions: i64) -> UsageEvent {
    UsageEvent::parse(RawUsageEvent {
        event_id: Some(id.into()),
        occurred_at: Some(Utc::now().to_rfc3339()),
        account_id: Some(account.into()),
        api_key_id: Some("key-1".into()),
        provider: Some("xai".into()),
        model: Some("grok-4-1-fast".into()),
        modality: Some("chat".into()),
        feature: feature.map(str::to_string),
        status: Some("success".into()),
        input_tokens: Some(millions * 1_000_000),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn authorize_answers_every_code_with_an_overage_result() {
    let app = spawn_app().await;
    let gw = app.token(None, Role::Service).await;
    // Prepaid, never funded: 402 insufficient_quota.
    let (s, b) = app.authorize(&gw, serde_json::json!({"account_id": "acct-p"})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str(), b["overage"]["policy"].as_str()),
        (402, Some("insufficient_quota"), Some("prepaid"))
    );
    // The same account's bring-your-own-key call is not charged: never refused for the
    // wallet (it used to get this 402 too).
    let (s, b) =
        app.authorize(&gw, serde_json::json!({"account_id": "acct-p", "billing_mode": "byok"})).await;
    assert_eq!(
        (s, b["allowed"].as_bool(), b["overage"]["policy"].as_str()),
        (200, Some(true), Some("byok")),
        "{b}"
    );
    // Free plan ($0.50, hard limit), $0.44 used: $0.06 exactly is allowed, one unit more is not.
    let owner = app.token(Some("acct-f"), Role::Owner).await;
    let (s, _) = app.call("POST", "/v1/accounts/acct-f/plan", Some(&owner), Some(r#"{"plan":"free"}"#)).await;
    assert_eq!(s, 200);
    apply_usage(
        &app.env,
        vec![call("f1", "acct-f", Some("ad_generations"), 1), call("f2", "acct-f", None, 1)],
        0,
    )
    .await;
    app.quota.refresh(&app.env.pool).await.unwrap();
    let ask = |units: i64| serde_json::json!({"account_id": "acct-f", "estimated_cost_units": units});
    let (s, b) = app.authorize(&gw, ask(6_000_000)).await;
    assert_eq!((s, b["allowed"].as_bool()), (200, Some(true)), "{b}");
    let (s, b) = app.authorize(&gw, ask(6_000_001)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (402, Some("credits_exhausted")), "{b}");
    let o = &b["overage"];
    assert_eq!(
        (o["in_overage"].as_bool(), o["overage_amount"].as_i64(), o["blocked"].as_bool()),
        (Some(true), Some(1), Some(true))
    );
    assert_eq!(o["policy"], "hard_limit");
    // BroomVA's OverageResult in its own unit: 1 internal unit past the allocation is
    // 0.000001 credits (1 credit = 1 cent), shown with the catalog's 2 decimals.
    assert_eq!(o["display_unit"], "credit");
    assert_eq!(
        (o["overage_amount_display"]["value"].as_str(), o["overage_amount_display"]["shown"].as_str()),
        (Some("0.000001"), Some("0.00"))
    );
    let (_, b) = app.authorize(&gw, ask(106_000_000)).await;
    assert_eq!(b["overage"]["overage_amount_display"]["value"], "100", "$1.00 past it is 100 credits: {b}");
    // Quota: free tier allows 2 ad_generations; 1 used -> allowed; 2 used -> 429.
    let q =
        serde_json::json!({"account_id": "acct-f", "feature": "ad_generations", "estimated_cost_usd": "0"});
    assert_eq!(app.authorize(&gw, q.clone()).await.0, 200);
    apply_usage(&app.env, vec![call("f3", "acct-f", Some("ad_generations"), 0)], 2).await;
    app.quota.refresh(&app.env.pool).await.unwrap();
    let (s, b) = app.authorize(&gw, q).await;
    assert_eq!((s, b["error"]["code"].as_str()), (429, Some("quota_exceeded")));
    // Spend cap on the API key: 429 spend_limit_exceeded.
    let banker = app.token(Some("acct-f"), Role::Bankroller).await;
    let cap = r#"{"scope":"api_key","scope_id":"key-1","monthly_limit_usd":"0.44"}"#;
    let (s, b) = app.call("PUT", "/v1/accounts/acct-f/limits", Some(&banker), Some(cap)).await;
    assert_eq!((s, b["limits"][0]["spent_units"].as_i64()), (200, Some(44_000_000)), "{b}");
    let (s, b) = app
        .authorize(
            &gw,
            serde_json::json!({"account_id": "acct-f", "api_key_id": "key-1", "estimated_cost_units": 1}),
        )
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (429, Some("spend_limit_exceeded")), "{b}");
}

#[tokio::test]
async fn plans_gate_models_at_authorize() {
    let app = spawn_app().await;
    let gw = app.token(None, Role::Service).await;
    let owner = app.token(Some("acct-g"), Role::Owner).await;
    let (s, _) = app.call("POST", "/v1/accounts/acct-g/plan", Some(&owner), Some(r#"{"plan":"free"}"#)).await;
    assert_eq!(s, 200);
    app.quota.refresh(&app.env.pool).await.unwrap();
    let ask = |provider: &str, model: &str| serde_json::json!({"account_id": "acct-g", "provider": provider, "model": model, "hold": false});
    // Free (test config): providers openrouter and ollama, and the catalog's small tier.
    for (provider, model) in [
        ("openrouter", "meta-llama/llama-3.1-8b-instruct"),
        ("ollama", "llama3"),
        ("google", "gemini-2.5-flash"), // small tier in the BroomVA catalog
    ] {
        let (s, b) = app.authorize(&gw, ask(provider, model)).await;
        assert_eq!((s, b["allowed"].as_bool()), (200, Some(true)), "{model}: {b}");
    }
    for (provider, model) in
        [("anthropic", "claude-sonnet-4-5"), ("openai", "o1"), ("mystery", "unknown-model")]
    {
        let (s, b) = app.authorize(&gw, ask(provider, model)).await;
        assert_eq!((s, b["error"]["code"].as_str()), (403, Some("model_not_allowed")), "{model}: {b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.contains("plan free") && message.contains(model), "{message}");
    }
    // Refused before anything is held.
    let mut hold = ask("anthropic", "claude-sonnet-4-5");
    hold["hold"] = serde_json::json!(true);
    assert_eq!(app.authorize(&gw, hold).await.0, 403);
    assert_eq!(app.env.count("SELECT count(*) FROM reservations").await, 0);
    // A call that names no model is not gated; a plan without rules allows every model.
    let (s, _) = app.authorize(&gw, serde_json::json!({"account_id": "acct-g"})).await;
    assert_eq!(s, 200);
    let (s, _) = app.call("POST", "/v1/accounts/acct-g/plan", Some(&owner), Some(r#"{"plan":"pro"}"#)).await;
    assert_eq!(s, 200);
    app.quota.refresh(&app.env.pool).await.unwrap();
    let (s, b) = app.authorize(&gw, ask("anthropic", "claude-sonnet-4-5")).await;
    assert_eq!(s, 200, "{b}");
    // An empty model is a bad request, not a pass.
    let (s, b) = app.authorize(&gw, serde_json::json!({"account_id": "acct-g", "model": ""})).await;
    assert_eq!((s, b["error"]["code"].as_str()), (422, Some("invalid_request")));
}

#[tokio::test]
async fn quotas_limits_plans_and_balance_over_http() {
    let app = spawn_app().await;
    let owner = app.token(Some("acct-q"), Role::Owner).await;
    let builder = app.token(Some("acct-q"), Role::Builder).await;
    let banker = app.token(Some("acct-q"), Role::Bankroller).await;
    let other = app.token(Some("acct-other"), Role::Owner).await;
    apply_usage(&app.env, vec![call("q1", "acct-q", Some("ad_generations"), 1)], 0).await;
    app.quota.refresh(&app.env.pool).await.unwrap();
    // Reeve's shape.
    let (s, b) = app.call("GET", "/v1/accounts/acct-q/quotas", Some(&builder), None).await;
    assert_eq!(s, 200);
    assert_eq!(b["tier"], "free");
    assert_eq!(b["usage"]["ad_generations"], serde_json::json!({"used": 1, "limit": 2, "remaining": 1}));
    assert!(b["period_start"].is_string() && b["period_end"].is_string());
    // Roles: builder cannot see billing; bankroller cannot see usage; no token; other account.
    assert_eq!(app.call("GET", "/v1/accounts/acct-q/balance", Some(&builder), None).await.0, 403);
    assert_eq!(app.call("GET", "/v1/accounts/acct-q/quotas", Some(&banker), None).await.0, 403);
    assert_eq!(app.call("GET", "/v1/accounts/acct-q/limits", Some(&builder), None).await.0, 403);
    assert_eq!(
        app.call("POST", "/v1/accounts/acct-q/plan", Some(&builder), Some(r#"{"plan":"pro"}"#)).await.0,
        403
    );
    assert_eq!(
        app.call("POST", "/v1/authorize", Some(&builder), Some(r#"{"account_id":"acct-q"}"#)).await.0,
        403
    );
    assert_eq!(app.call("GET", "/v1/accounts/acct-q/quotas", None, None).await.0, 401);
    assert_eq!(app.call("GET", "/v1/accounts/acct-q/quotas", Some("tly_bogus"), None).await.0, 401);
    let (s, b) = app.call("GET", "/v1/accounts/acct-q/quotas", Some(&other), None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("account_not_found")));
    assert_eq!(
        app.call("POST", "/v1/authorize", Some(&other), Some(r#"{"account_id":"acct-q"}"#)).await.0,
        404
    );
    // Plans: free -> pro (upgrade), enterprise refused, unknown plan, then the balance shows the plan.
    let (s, b) =
        app.call("POST", "/v1/accounts/acct-q/plan", Some(&banker), Some(r#"{"plan":"free"}"#)).await;
    assert_eq!((s, b["direction"].as_str()), (200, Some("initial")));
    let (s, b) = app.call("POST", "/v1/accounts/acct-q/plan", Some(&owner), Some(r#"{"plan":"pro"}"#)).await;
    assert_eq!((s, b["direction"].as_str()), (200, Some("upgrade")), "{b}");
    let (s, b) =
        app.call("POST", "/v1/accounts/acct-q/plan", Some(&owner), Some(r#"{"plan":"enterprise"}"#)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (403, Some("plan_change_not_allowed")));
    let (s, b) = app.call("POST", "/v1/accounts/acct-q/plan", Some(&owner), Some(r#"{"plan":"gold"}"#)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (422, Some("unknown_plan")));
    let (s, b) = app.call("GET", "/v1/accounts/acct-q/balance", Some(&banker), None).await;
    assert_eq!(s, 200);
    // One model (issue 11.4): the plan's credits are the ledger balance (free's $0.50 +
    // the prorated upgrade - the $0.22 spent), so remaining = effective balance and consumed
    // = allocation - remaining; the period's spend is reported beside it.
    let effective = b["effective_units"].as_i64().unwrap();
    assert_eq!(
        (b["plan"]["plan"].as_str(), b["plan"]["remaining_units"].as_i64()),
        (Some("pro"), Some(effective)),
        "{b}"
    );
    assert!(
        effective > 50_000_000 && effective < 5_000_000_000,
        "free's allocation + a prorated upgrade: {b}"
    );
    assert_eq!(b["plan"]["consumed_units"].as_i64(), Some(5_000_000_000 - effective));
    assert_eq!(b["period_consumed_units"].as_i64(), Some(22_000_000));
    let percent = rust_decimal::Decimal::from(5_000_000_000 - effective) * rust_decimal::Decimal::from(100)
        / rust_decimal::Decimal::from(5_000_000_000i64);
    let percent = percent.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
    assert_eq!(b["plan"]["usage_percent"], percent.to_string());
    assert!(b["projected_days_remaining"].is_string(), "a burn rate exists: {b}");
    // The same change made again later applies (it used to replay the first pro -> free
    // under the default key and leave the account on pro); a true retry, same key, replays.
    let mut directions = Vec::new();
    for plan in ["free", "pro", "free"] {
        let body = format!(r#"{{"plan":"{plan}"}}"#);
        let (s, b) = app.call("POST", "/v1/accounts/acct-q/plan", Some(&owner), Some(&body)).await;
        assert_eq!(s, 200, "{b}");
        directions.push(b["direction"].as_str().map(String::from));
        let (_, bal) = app.call("GET", "/v1/accounts/acct-q/balance", Some(&banker), None).await;
        assert_eq!(bal["plan"]["plan"].as_str(), Some(plan), "{bal}");
    }
    assert_eq!(directions, [Some("downgrade".into()), Some("upgrade".into()), Some("downgrade".into())]);
    let keyed = r#"{"plan":"pro","idempotency_key":"k-1"}"#;
    let (_, first) = app.call("POST", "/v1/accounts/acct-q/plan", Some(&owner), Some(keyed)).await;
    let (_, retry) = app.call("POST", "/v1/accounts/acct-q/plan", Some(&owner), Some(keyed)).await;
    assert_eq!(first, retry, "a retry with the same key replays the first answer");
    // The audit log of those changes, newest first, two at a time (billing roles only).
    let mut audited = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/v1/accounts/acct-q/plan/changes?limit=2&before={b}"),
            None => "/v1/accounts/acct-q/plan/changes?limit=2".to_string(),
        };
        let (s, page) = app.call("GET", &path, Some(&banker), None).await;
        assert_eq!(s, 200, "{page}");
        for c in page["changes"].as_array().unwrap() {
            assert!(c["created_by"].as_str().unwrap().starts_with("token:"), "{c}");
            audited.push((
                c["old_plan"].as_str().unwrap().to_string(),
                c["new_plan"].as_str().unwrap().to_string(),
            ));
        }
        before = page["next_before"].as_i64();
        if before.is_none() {
            break;
        }
    }
    let want = [("free", "pro"), ("pro", "free"), ("free", "pro"), ("pro", "free"), ("free", "pro")];
    assert_eq!(audited, want.map(|(a, b)| (a.to_string(), b.to_string())));
    assert_eq!(app.call("GET", "/v1/accounts/acct-q/plan/changes", Some(&builder), None).await.0, 403);
    let (s, b) = app.call("GET", "/v1/accounts/acct-q/plan/changes?limit=0", Some(&owner), None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("invalid_query")));
}

#[tokio::test]
async fn malformed_requests_are_json_4xx_never_500() {
    let app = spawn_app().await;
    let gw = app.token(None, Role::Service).await;
    let cases: &[(&str, &str, &str, u16)] = &[
        ("POST", "/v1/authorize", "{not json", 400),
        ("POST", "/v1/authorize", r#"{"account_id": 7}"#, 422),
        ("POST", "/v1/authorize", r#"{"account_id": "a", "colour": "red"}"#, 422),
        ("POST", "/v1/authorize", r#"{"account_id": ""}"#, 422),
        ("POST", "/v1/authorize", r#"{"account_id": "a", "estimated_cost_units": -1}"#, 422),
        ("POST", "/v1/authorize", r#"{"account_id": "a", "billing_mode": "free_lunch"}"#, 422),
        ("POST", "/v1/authorize", r#"{"account_id": "a", "estimated_cost_usd": "1e3"}"#, 422),
        (
            "POST",
            "/v1/authorize",
            r#"{"account_id": "a", "estimated_cost_usd": "1", "estimated_cost_units": 1}"#,
            422,
        ),
        ("PUT", "/v1/accounts/a/limits", r#"{"scope": "planet", "monthly_limit_usd": "1"}"#, 422),
        ("PUT", "/v1/accounts/a/limits", r#"{"scope": "account", "monthly_limit_usd": "-1"}"#, 422),
        ("POST", "/v1/accounts/a/plan", r#"{}"#, 422),
    ];
    let owner = app.token(Some("a"), Role::Owner).await;
    for (method, path, body, want) in cases {
        let token = if path.starts_with("/v1/authorize") { &gw } else { &owner };
        let (s, b) = app.call(method, path, Some(token), Some(body)).await;
        assert_eq!(s, *want, "{method} {path} {body}: {b}");
        assert!(b["error"]["code"].is_string(), "{method} {path} {body}: JSON error body, got {b}");
    }
}

/// An ad_generations call (demo catalog: $0.02 flat) that names a hold.
fn feature_event(id: &str, account: &str, hold: &str, status: &str, at: chrono::DateTime<Utc>) -> UsageEvent {
    UsageEvent::parse(RawUsageEvent {
        event_id: Some(id.into()),
        occurred_at: Some(at.to_rfc3339()),
        account_id: Some(account.into()),
        provider: Some("platform".into()),
        model: Some("ad_generations".into()),
        modality: Some("feature".into()),
        feature: Some("ad_generations".into()),
        status: Some(status.into()),
        reservation_id: (!hold.is_empty()).then(|| hold.to_string()),
        ..Default::default()
    })
    .unwrap()
}

async fn reservation_status(app: &App, id: &str) -> (String, Option<i64>) {
    sqlx::query_as("SELECT status, actual_units FROM reservations WHERE reservation_id = $1")
        .bind(id)
        .fetch_one(&app.env.pool)
        .await
        .unwrap()
}

/// Issue 16, one instance: hold -> exactly at / one over the quota, a replay holds nothing
/// more, release frees the unit, an event settles at its real cost, a failed call frees the
/// unit, the counters' lag never frees a unit early, expiry frees it, BYOK holds no money.
#[tokio::test]
async fn holding_authorize_holds_settles_releases_and_expires() {
    let app = spawn_app().await;
    let gw = app.token(None, Role::Service).await;
    credit(&app.env, "acct-h", 1_000_000_000).await; // $10
    let hold = |id: &str| {
        serde_json::json!({"account_id": "acct-h", "feature": "ad_generations", "hold": true,
                           "estimated_cost_usd": "0.05", "authorization_id": id})
    };
    // Free tier: 2 ad_generations. A one-hour-past-the-window call never counts.
    let old = Utc::now() - chrono::Duration::days(30) - chrono::Duration::hours(1);
    apply_usage(&app.env, vec![feature_event("h-old", "acct-h", "", "success", old)], 0).await;
    app.quota.refresh(&app.env.pool).await.unwrap();
    let (s, a) = app.authorize(&gw, hold("auth-a")).await;
    assert_eq!(
        (s, a["authorization_id"].as_str(), a["held_units"].as_i64()),
        (200, Some("auth-a"), Some(5_000_000)),
        "{a}"
    );
    assert!(a["hold_expires_at"].is_string(), "{a}");
    assert_eq!(app.authorize(&gw, hold("auth-b")).await.0, 200, "exactly at the quota");
    let (s, b) = app.authorize(&gw, hold("auth-c")).await;
    assert_eq!((s, b["error"]["code"].as_str()), (429, Some("quota_exceeded")), "one over: {b}");
    // The same request again: the same answer, nothing more held.
    let (s, again) = app.authorize(&gw, hold("auth-a")).await;
    assert_eq!((s, &again), (200, &a));
    // The projection follows the holds in a transaction of its own (a holding authorize
    // never waits for the balance row a batch may hold).
    app.env
        .wait_for("the reserved projection", std::time::Duration::from_secs(10), || async {
            app.env.count("SELECT reserved_units FROM account_balances WHERE account_id = 'acct-h'").await
                == 10_000_000
        })
        .await;
    // Release B early: its unit is free again (once).
    let (s, r) = app.call("POST", "/v1/authorizations/auth-b/release", Some(&gw), None).await;
    assert_eq!(
        (s, r["status"].as_str(), r["kind"].as_str()),
        (200, Some("released"), Some("authorization")),
        "{r}"
    );
    assert_eq!(app.authorize(&gw, hold("auth-c")).await.0, 200);
    assert_eq!(app.authorize(&gw, hold("auth-d")).await.0, 429);
    // A's call happens and costs $0.02, not the $0.05 estimate: settled at its real cost.
    apply_usage(&app.env, vec![feature_event("h-a", "acct-h", "auth-a", "success", Utc::now())], 1).await;
    assert_eq!(reservation_status(&app, "auth-a").await, ("settled".into(), Some(2_000_000)));
    // The counters here have not read A's usage yet, and A is no longer open: A still
    // counts (as a hold closed into uncounted usage), so D is refused, not over-admitted.
    assert_eq!(app.authorize(&gw, hold("auth-d")).await.0, 429, "the counters' lag never frees a unit");
    app.quota.refresh(&app.env.pool).await.unwrap();
    assert_eq!(app.authorize(&gw, hold("auth-d")).await.0, 429, "A counts once, as usage now");
    // C's call fails: failed calls consume no quota, so its unit is free once counted.
    apply_usage(&app.env, vec![feature_event("h-c", "acct-h", "auth-c", "error", Utc::now())], 2).await;
    app.quota.refresh(&app.env.pool).await.unwrap();
    let (s, d) = app.authorize(&gw, hold("auth-d")).await;
    assert_eq!(s, 200, "{d}");
    let (balance,): (i64,) =
        sqlx::query_as("SELECT balance_units FROM account_balances WHERE account_id = 'acct-h'")
            .fetch_one(&app.env.pool)
            .await
            .unwrap();
    assert_eq!(balance, 1_000_000_000 - 2 * 2_000_000, "the old call and A at $0.02; the failed call free");
    // Expiry: a 1-second hold frees its unit when it expires.
    credit(&app.env, "acct-e", 100_000_000).await;
    let short = serde_json::json!({"account_id": "acct-e", "feature": "ad_generations", "hold": true,
                                   "hold_ttl_secs": 1, "authorization_id": "auth-e1"});
    assert_eq!(app.authorize(&gw, short).await.0, 200);
    let byok = serde_json::json!({"account_id": "acct-e", "feature": "ad_generations", "hold": true,
                                  "billing_mode": "byok", "estimated_cost_usd": "9"});
    let (s, b) = app.authorize(&gw, byok.clone()).await;
    assert_eq!((s, b["held_units"].as_i64()), (200, Some(0)), "BYOK holds its unit, no money: {b}");
    assert_eq!(app.authorize(&gw, byok.clone()).await.0, 429);
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert_eq!(app.authorize(&gw, byok).await.0, 200, "the expired hold's unit is free");
    // `tally run`'s housekeeping (every second) marks it expired, once.
    assert_eq!(tally::ledger::reservations::expire_due(&app.env.pool).await.unwrap(), 1);
    assert_eq!(reservation_status(&app, "auth-e1").await.0, "expired");
    // Bad input: 4xx with a JSON error, never a hold.
    let bad = serde_json::json!({"account_id": "acct-e", "hold": true, "hold_ttl_secs": 0});
    assert_eq!(app.authorize(&gw, bad).await.0, 422);
    let bad = serde_json::json!({"account_id": "acct-e", "authorization_id": "x"});
    assert_eq!(app.authorize(&gw, bad).await.0, 422, "an authorization id without a hold");
    let (s, _) = app.call("POST", "/v1/authorizations/nope/release", Some(&gw), None).await;
    assert_eq!(s, 404);
}
