//! The authenticated HTTP API against real Postgres and ClickHouse: every role on every
//! endpoint (table-driven), missing / unknown / revoked tokens, cross-account access,
//! malformed input (JSON errors, never a 500), transaction pages, usage from the usage log,
//! reservations and deductions (single, batch, replay, conflict), the token CLI.
//!
//! Every response a test receives is checked against `schemas/openapi.yaml` (path, method
//! and status must be documented, and the body must match the schema): see `spec`.

mod common;

use common::spec;

use chrono::{Duration as ChronoDuration, Utc};
use common::*;
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tally::api::auth::{self, NewToken, Role, TokenCache};
use tally::api::{self, AppState};
use tally::batch::{Batch, Item, SourcePos};
use tally::event::{RawUsageEvent, UsageEvent};
use tally::ledger::ops::{self, ManualKind, ManualRequest};
use tally::ledger::reservations::{self, ReserveRequest};
use tally::ledger::{self, usage};
use tally::pipeline::reader::Transformer;
use tally::pricing::Catalog;
use tokio_util::sync::CancellationToken;

const USD: i64 = tally::money::UNITS_PER_USD;

struct App {
    env: TestEnv,
    base: String,
    http: reqwest::Client,
    auth: Arc<TokenCache>,
    _stop: tokio_util::sync::DropGuard,
}

async fn spawn_app(token_ttl: Duration) -> App {
    spawn_app_with(token_ttl, "examples/brievio.toml").await
}

async fn spawn_app_with(token_ttl: Duration, catalog: &str) -> App {
    let env = TestEnv::new(1).await;
    let catalog = repo().join(catalog);
    let auth = Arc::new(TokenCache::new(env.pool.clone(), token_ttl));
    let state = AppState {
        pool: env.pool.clone(),
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle(),
        ledger_config: Arc::new(ledger::config::LedgerConfig::load(&catalog).unwrap()),
        stripe_webhook_secret: None,
        polar_webhook_secret: None,
        auth: auth.clone(),
        clickhouse: env.clickhouse(),
        quota: Default::default(),
        quota_config: Arc::new(tally::quota::config::QuotaConfig::load(&catalog).unwrap()),
        payments: Default::default(),
        catalog: Arc::new(Catalog::load(&catalog).unwrap()),
        holds: Arc::new(tally::ledger::holds::HoldQueue::new(env.pool.clone())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(api::serve(listener, state, stop.clone()));
    App { env, base, http: reqwest::Client::new(), auth, _stop: stop.drop_guard() }
}

/// A body to send: JSON, or raw text (for malformed input).
enum Body {
    None,
    Json(Value),
    Raw(String),
}

impl App {
    /// Send a request; check the answer against the OpenAPI spec; return (status, body).
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Body) -> (u16, Value) {
        let mut r = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r = match body {
            Body::None => r,
            Body::Json(v) => r.json(&v),
            Body::Raw(s) => r.header("content-type", "application/json").body(s),
        };
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        if status == 401 {
            assert_eq!(resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
        }
        let text = resp.text().await.unwrap();
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} -> {status}: body is not JSON ({e}): {text}"));
        spec::check_response(method.as_str(), path, status, &json);
        assert!(status < 500, "{method} {path} -> {status} {json}");
        (status, json)
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(Method::GET, path, Some(token), Body::None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(token), Body::Json(body)).await
    }

    async fn token(&self, account: Option<&str>, role: Role) -> auth::CreatedToken {
        let req = NewToken { account_id: account.map(str::to_string), role, name: "test".into() };
        auth::create_token(&self.env.pool, &req).await.unwrap()
    }

    async fn credit(&self, account: &str, units: i64, key: &str) {
        let req = ManualRequest {
            account_id: account.into(),
            idempotency_key: key.into(),
            kind: ManualKind::Addition(units),
            created_by: "ops@example.com".into(),
            reason: format!("credit {key}"),
        };
        ops::manual(&self.env.pool, &req).await.unwrap();
    }

    async fn reserve(&self, account: &str, id: &str, units: i64) {
        let req = ReserveRequest {
            account_id: account.into(),
            reservation_id: id.into(),
            amount_units: units,
            ttl_secs: 600,
            overdraft_units: 0,
        };
        reservations::reserve(&self.env.pool, &req).await.unwrap();
    }

    async fn balance_units(&self, account: &str) -> i64 {
        ledger::balance(&self.env.pool, account).await.unwrap().map_or(0, |b| b.balance_units)
    }
}

/// Who calls, in the order of the matrix columns.
struct Callers {
    tokens: Vec<(&'static str, Option<String>)>,
}

async fn callers(app: &App) -> Callers {
    let owner = app.token(Some("acct-a"), Role::Owner).await.token;
    let builder = app.token(Some("acct-a"), Role::Builder).await.token;
    let bankroller = app.token(Some("acct-a"), Role::Bankroller).await.token;
    let service = app.token(Some("acct-a"), Role::Service).await.token;
    let platform = app.token(None, Role::Service).await.token;
    let other = app.token(Some("acct-b"), Role::Owner).await.token;
    let revoked = app.token(Some("acct-a"), Role::Owner).await;
    assert!(auth::revoke_token(&app.env.pool, &revoked.token_id).await.unwrap());
    let unknown = format!("tly_{}", "0".repeat(64));
    let tokens = vec![
        ("owner", Some(owner)),
        ("builder", Some(builder)),
        ("bankroller", Some(bankroller)),
        ("service", Some(service)),
        ("platform service", Some(platform)),
        ("owner of another account", Some(other)),
        ("no token", None),
        ("unknown token", Some(unknown)),
        ("revoked token", Some(revoked.token)),
    ];
    Callers { tokens }
}

/// The matrix: endpoint -> expected status for each caller column of [`callers`].
#[tokio::test]
async fn every_role_on_every_endpoint() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let who = callers(&app).await;
    app.credit("acct-a", 100 * USD, "seed-a").await;
    // One order in review, so the topups answer carries an order to check against the spec.
    let eur = tally::ledger::topup::CapturedPayment {
        order_id: "pi_matrix".into(),
        account_id: Some("acct-a".into()),
        currency: "eur".into(),
        amount_minor: 1_000,
        source: "stripe",
    };
    tally::ledger::topup::record_captured(&app.env.pool, &Default::default(), &eur).await.unwrap();
    const U: u16 = 401;
    #[rustfmt::skip]
    let table: [(&str, [u16; 9]); 9] = [
        //                  owner builder bankr service platform other none unknown revoked
        ("transactions",   [200,  403,    200,  403,    403,     404,  U,   U,      U]),
        ("topups",         [200,  403,    200,  403,    403,     404,  U,   U,      U]),
        ("usage",          [200,  200,    403,  403,    403,     404,  U,   U,      U]),
        ("usage_events",   [200,  200,    403,  403,    403,     404,  U,   U,      U]),
        ("reserve",        [201,  403,    403,  201,    201,     404,  U,   U,      U]),
        ("settle",         [200,  403,    403,  200,    200,     404,  U,   U,      U]),
        ("release",        [200,  403,    403,  200,    200,     404,  U,   U,      U]),
        ("deduct",         [200,  403,    403,  200,    200,     404,  U,   U,      U]),
        ("deduct_batch",   [200,  403,    403,  200,    200,     404,  U,   U,      U]),
    ];
    for (endpoint, expected) in table {
        for ((name, token), want) in who.tokens.iter().zip(expected) {
            let n = format!("{endpoint}-{}", name.replace(' ', "-"));
            let (method, path, body) = match endpoint {
                "transactions" => (Method::GET, "/v1/accounts/acct-a/transactions".to_string(), Body::None),
                "topups" => (Method::GET, "/v1/accounts/acct-a/topups".to_string(), Body::None),
                "usage" => (Method::GET, "/v1/accounts/acct-a/usage".to_string(), Body::None),
                "usage_events" => (Method::GET, "/v1/accounts/acct-a/usage/events".to_string(), Body::None),
                "reserve" => {
                    let body = json!({"account_id": "acct-a", "reservation_id": n, "amount_usd": "0.01"});
                    (Method::POST, "/v1/reservations".to_string(), Body::Json(body))
                }
                "settle" => {
                    app.reserve("acct-a", &n, USD / 100).await;
                    let body = json!({"actual_usd": "0.005"});
                    (Method::POST, format!("/v1/reservations/{n}/settle"), Body::Json(body))
                }
                "release" => {
                    app.reserve("acct-a", &n, USD / 100).await;
                    (Method::POST, format!("/v1/reservations/{n}/release"), Body::None)
                }
                "deduct" => {
                    let body = json!({"account_id": "acct-a", "amount": "0.01", "idempotency_key": n});
                    (Method::POST, "/v1/deductions".to_string(), Body::Json(body))
                }
                "deduct_batch" => {
                    let item = json!({"account_id": "acct-a", "amount": 0.01, "idempotency_key": n});
                    (
                        Method::POST,
                        "/v1/deductions/batch".to_string(),
                        Body::Json(json!({"deductions": [item]})),
                    )
                }
                other => unreachable!("{other}"),
            };
            let (status, json) = app.call(method, &path, token.as_deref(), body).await;
            assert_eq!(status, want, "{endpoint} as {name}: {json}");
            let code = json["error"]["code"].as_str();
            match status {
                401 => assert_eq!(code, Some("unauthorized")),
                403 => assert_eq!(code, Some("forbidden")),
                404 => assert!(matches!(code, Some("account_not_found" | "reservation_not_found")), "{json}"),
                _ => {}
            }
        }
    }
    ledger::verify(&app.env.pool).await.unwrap();
}

/// The balance route with the capability `Billing` (its handler is the quota work's; the
/// matrix is the same).
#[tokio::test]
async fn every_role_on_the_balance() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let who = callers(&app).await;
    let expected = [200, 403, 200, 403, 403, 404, 401, 401, 401];
    for ((name, token), want) in who.tokens.iter().zip(expected) {
        let (status, json) =
            app.call(Method::GET, "/v1/accounts/acct-a/balance", token.as_deref(), Body::None).await;
        assert_eq!(status, want, "balance as {name}: {json}");
    }
}

#[tokio::test]
async fn revocation_applies_after_the_cache_ttl_or_at_once_in_process() {
    let ttl = Duration::from_secs(3);
    let app = spawn_app(ttl).await;
    let t = app.token(Some("acct-r"), Role::Builder).await;
    let path = "/v1/accounts/acct-r/usage";
    assert_eq!(app.get(path, &t.token).await.0, 200);
    // Revoked by another process (`tally token revoke`): the cached verification holds
    // until the TTL passes, then the token is refused.
    assert!(auth::revoke_token(&app.env.pool, &t.token_id).await.unwrap());
    assert_eq!(app.get(path, &t.token).await.0, 200, "still cached within the TTL");
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(app.get(path, &t.token).await.0, 401);
    assert!(!auth::revoke_token(&app.env.pool, &t.token_id).await.unwrap(), "already revoked");

    // Revoked through the server's own cache: refused at once.
    let t2 = app.token(Some("acct-r"), Role::Builder).await;
    assert_eq!(app.get(path, &t2.token).await.0, 200);
    assert!(app.auth.revoke(&t2.token_id).await.unwrap());
    assert_eq!(app.get(path, &t2.token).await.0, 401);

    // Bearer scheme only; tokens never stored in clear.
    let t3 = app.token(Some("acct-r"), Role::Owner).await;
    let r =
        app.http.get(format!("{}{path}", app.base)).basic_auth(&t3.token, None::<&str>).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let in_clear = app
        .env
        .count(&format!("SELECT count(*) FROM api_tokens t WHERE row_to_json(t)::text LIKE '%{}%'", t3.token))
        .await;
    assert_eq!(in_clear, 0, "no column holds the token");
    let stored: (Vec<u8>,) = sqlx::query_as("SELECT token_hash FROM api_tokens WHERE token_id = $1")
        .bind(&t3.token_id)
        .fetch_one(&app.env.pool)
        .await
        .unwrap();
    assert_eq!(stored.0, auth::hash_token(&t3.token).to_vec());
}

#[tokio::test]
async fn malformed_input_is_a_json_error_never_a_500() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let owner = app.token(Some("acct-m"), Role::Owner).await.token;
    app.credit("acct-m", USD, "seed-m").await;
    let long = "x".repeat(200);
    let deduct = |v: Value| Body::Json(v);
    let batch_of = |n: usize| {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"account_id": "acct-m", "amount": "0.01", "idempotency_key": format!("b{i}")}))
            .collect();
        Body::Json(json!({"deductions": items}))
    };
    let cases: Vec<(&str, Method, String, Body, u16, &str)> = vec![
        (
            "bad json",
            Method::POST,
            "/v1/deductions".into(),
            Body::Raw("{\"account_id\": ".into()),
            400,
            "malformed_json",
        ),
        ("empty body", Method::POST, "/v1/deductions".into(), Body::Raw("".into()), 400, "malformed_json"),
        (
            "not an object",
            Method::POST,
            "/v1/deductions".into(),
            Body::Raw("[1, 2]".into()),
            422,
            "invalid_body",
        ),
        (
            "wrong type",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": 5, "amount": "1", "idempotency_key": "k"})),
            422,
            "invalid_body",
        ),
        (
            "amount as a boolean",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": true, "idempotency_key": "k"})),
            422,
            "invalid_body",
        ),
        (
            "missing key",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": "1"})),
            422,
            "invalid_body",
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": "1", "idempotency_key": "k", "amount_usd": 1})),
            422,
            "invalid_body",
        ),
        (
            "negative amount",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": "-0.05", "idempotency_key": "k"})),
            422,
            "invalid_amount",
        ),
        (
            "zero amount",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": 0, "idempotency_key": "k"})),
            422,
            "invalid_amount",
        ),
        (
            "finer than the ledger unit",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": "0.000000001", "idempotency_key": "k"})),
            422,
            "invalid_amount",
        ),
        (
            "over the per-deduction maximum",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": "1000000.01", "idempotency_key": "k"})),
            422,
            "invalid_amount",
        ),
        (
            "over-long idempotency key",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": "acct-m", "amount": "1", "idempotency_key": long})),
            422,
            "invalid_id",
        ),
        (
            "over-long account in a body",
            Method::POST,
            "/v1/deductions".into(),
            deduct(json!({"account_id": long, "amount": "1", "idempotency_key": "k"})),
            422,
            "invalid_id",
        ),
        (
            "batch too large",
            Method::POST,
            "/v1/deductions/batch".into(),
            batch_of(1001),
            422,
            "invalid_batch_size",
        ),
        ("empty batch", Method::POST, "/v1/deductions/batch".into(), batch_of(0), 422, "invalid_batch_size"),
        (
            "bad item in a batch",
            Method::POST,
            "/v1/deductions/batch".into(),
            Body::Json(json!({"deductions": [
                {"account_id": "acct-m", "amount": "1", "idempotency_key": "ok"},
                {"account_id": "acct-m", "amount": "-1", "idempotency_key": "bad"}]})),
            422,
            "invalid_amount",
        ),
        (
            "reservation with two amounts",
            Method::POST,
            "/v1/reservations".into(),
            Body::Json(json!({"account_id": "acct-m", "amount_usd": "1", "amount_units": 5})),
            422,
            "invalid_amount",
        ),
        (
            "reservation with a negative amount",
            Method::POST,
            "/v1/reservations".into(),
            Body::Json(json!({"account_id": "acct-m", "amount_units": -5})),
            422,
            "invalid_amount",
        ),
        (
            "reservation with a fractional unit count",
            Method::POST,
            "/v1/reservations".into(),
            Body::Json(json!({"account_id": "acct-m", "amount_units": 1.5})),
            422,
            "invalid_body",
        ),
        (
            "reservation ttl out of range",
            Method::POST,
            "/v1/reservations".into(),
            Body::Json(json!({"account_id": "acct-m", "amount_units": 5, "ttl_secs": 0})),
            422,
            "invalid_ttl",
        ),
        (
            "settle of an unknown reservation",
            Method::POST,
            "/v1/reservations/nope/settle".into(),
            Body::Json(json!({})),
            404,
            "reservation_not_found",
        ),
        (
            "over-long account in a path",
            Method::GET,
            format!("/v1/accounts/{long}/transactions"),
            Body::None,
            400,
            "invalid_account_id",
        ),
        (
            "limit zero",
            Method::GET,
            "/v1/accounts/acct-m/transactions?limit=0".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "limit not a number",
            Method::GET,
            "/v1/accounts/acct-m/transactions?limit=abc".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "limit too large",
            Method::GET,
            "/v1/accounts/acct-m/transactions?limit=1001".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "negative cursor",
            Method::GET,
            "/v1/accounts/acct-m/transactions?before=-1".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "unknown parameter",
            Method::GET,
            "/v1/accounts/acct-m/transactions?page=2".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "bad time",
            Method::GET,
            "/v1/accounts/acct-m/usage?from=yesterday".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "usage events: a cursor this endpoint never returned",
            Method::GET,
            "/v1/accounts/acct-m/usage/events?cursor=zz".into(),
            Body::None,
            400,
            "invalid_cursor",
        ),
        (
            "usage events: limit 0",
            Method::GET,
            "/v1/accounts/acct-m/usage/events?limit=0".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "usage events: unknown modality",
            Method::GET,
            "/v1/accounts/acct-m/usage/events?modality=hologram".into(),
            Body::None,
            400,
            "invalid_query",
        ),
        (
            "window over 400 days",
            Method::GET,
            "/v1/accounts/acct-m/usage?from=2024-01-01T00:00:00Z&to=2026-01-01T00:00:00Z".into(),
            Body::None,
            400,
            "invalid_range",
        ),
        (
            "window backwards",
            Method::GET,
            "/v1/accounts/acct-m/usage?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z".into(),
            Body::None,
            400,
            "invalid_range",
        ),
        (
            "body over the 2 MB limit",
            Method::POST,
            "/v1/deductions/batch".into(),
            Body::Raw(format!("{{\"deductions\": [\"{}\"]}}", "x".repeat(3 << 20))),
            413,
            "body_too_large",
        ),
        (
            "unknown account",
            Method::GET,
            "/v1/accounts/nobody/transactions".into(),
            Body::None,
            404,
            "account_not_found",
        ),
    ];
    for (name, method, path, body, want, code) in cases {
        let (status, json) = app.call(method, &path, Some(&owner), body).await;
        assert_eq!((status, json["error"]["code"].as_str()), (want, Some(code)), "{name}: {json}");
    }
    // A wrong method: JSON too (not in the spec, so sent outside `call`).
    let r = app.http.get(format!("{}/v1/deductions", app.base)).bearer_auth(&owner).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "method_not_allowed");
    // The reservation exists but the body is wrong: now the body's error shows.
    app.reserve("acct-m", "res-m", 1).await;
    let (status, json) = app.post("/v1/reservations/res-m/settle", &owner, json!({})).await;
    assert_eq!((status, json["error"]["code"].as_str()), (422, Some("invalid_amount")));
    assert_eq!(app.balance_units("acct-m").await, USD, "nothing malformed was applied");
}

#[tokio::test]
async fn transactions_page_newest_first_by_cursor() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let bankroller = app.token(Some("acct-p"), Role::Bankroller).await.token;
    for i in 1..=7 {
        app.credit("acct-p", i * USD / 100, &format!("p{i}")).await;
    }
    let mut seen = Vec::new();
    let mut before: Option<i64> = None;
    let mut pages = 0;
    loop {
        let cursor = before.map(|b| format!("&before={b}")).unwrap_or_default();
        let (status, page) =
            app.get(&format!("/v1/accounts/acct-p/transactions?limit=3{cursor}"), &bankroller).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        let txs = page["transactions"].as_array().unwrap();
        seen.extend(txs.iter().cloned());
        match page["next_before"].as_i64() {
            Some(b) => {
                assert_eq!(txs.len(), 3, "a page with a cursor is full");
                before = Some(b);
            }
            None => break,
        }
        assert!(pages < 10, "pagination ends");
    }
    assert_eq!((pages, seen.len()), (3, 7));
    let ids: Vec<i64> = seen.iter().map(|t| t["entry_id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first, no repeats: {ids:?}");
    // The newest: the 7th credit of $0.07, on top of $0.01 + ... + $0.06 = $0.21.
    let newest = &seen[0];
    assert_eq!(newest["type"], "addition");
    assert_eq!(
        (newest["amount"].as_str(), newest["amount_units"].as_i64()),
        (Some("0.07000000"), Some(7 * USD / 100))
    );
    assert_eq!(newest["balance_after"], "0.28000000");
    assert_eq!(newest["description"], "credit p7");
    let oldest = &seen[6];
    assert_eq!(
        (oldest["amount"].as_str(), oldest["balance_after"].as_str()),
        (Some("0.01000000"), Some("0.01000000"))
    );
    // Default page size covers all 7.
    let (_, all) = app.get("/v1/accounts/acct-p/transactions", &bankroller).await;
    assert_eq!((all["transactions"].as_array().unwrap().len(), &all["next_before"]), (7, &Value::Null));
}

/// A chat call priced by the demo catalog.
fn chat(
    id: &str,
    account: &str,
    provider: &str,
    model: &str,
    input: i64,
    at: chrono::DateTime<Utc>,
) -> UsageEvent {
    UsageEvent::parse(RawUsageEvent {
        event_id: Some(id.into()),
        occurred_at: Some(at.to_rfc3339()),
        account_id: Some(account.into()),
        provider: Some(provider.into()),
        model: Some(model.into()),
        modality: Some("chat".into()),
        status: Some("success".into()),
        input_tokens: Some(input),
        cached_input_tokens: Some(input / 10),
        output_tokens: Some(1_000),
        ..Default::default()
    })
    .unwrap()
}

/// Apply events as the pipeline does (ledger, then the usage log rows of new events).
async fn apply_and_log(env: &TestEnv, events: &[UsageEvent]) -> HashMap<String, i64> {
    let t = Transformer {
        catalog: Arc::new(Catalog::load(&repo().join("examples/demo.toml")).unwrap()),
        schemas: std::sync::Arc::new(tally::codec::Schemas::new(None)),
        future_skew: chrono::Duration::seconds(300),
        age_max: chrono::Duration::days(400),
        cost_units_max: tally::pipeline::reader::EVENT_COST_UNITS_MAX_DEFAULT,
    };
    let items: Vec<Item> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let pos = SourcePos { partition: 0, offset: i as i64 };
            t.transform(pos, None, &tally::codec::encode(&e.to_raw()), Utc::now())
        })
        .collect();
    let mut tx = env.pool.begin().await.unwrap();
    let applied = usage::apply(&mut tx, "g", "t", &Batch { items }).await.unwrap();
    tx.commit().await.unwrap();
    let rows: Vec<_> =
        applied.new_events.iter().map(|v| tally::analytics::UsageRow::from_item(v, Utc::now())).collect();
    tally::analytics::insert(&env.clickhouse(), &rows).await.unwrap();
    applied.new_events.iter().map(|v| (v.event.event_id.clone(), v.charge.cost_units)).collect()
}

#[tokio::test]
async fn usage_totals_from_the_usage_log() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let builder = app.token(Some("acct-u"), Role::Builder).await.token;
    let now = Utc::now();
    let events = [
        chat("u1", "acct-u", "xai", "grok-4-1-fast", 1_000_000, now - ChronoDuration::hours(1)),
        chat("u2", "acct-u", "xai", "grok-4-1-fast", 2_000_000, now - ChronoDuration::days(2)),
        chat("u3", "acct-u", "openai", "gpt-4o-mini", 500_000, now - ChronoDuration::days(2)),
        chat("u-old", "acct-u", "openai", "gpt-4o-mini", 500_000, now - ChronoDuration::days(40)),
        chat("u-other", "acct-other", "xai", "grok-4-1-fast", 1_000_000, now),
    ];
    let costs = apply_and_log(&app.env, &events).await;
    assert!(costs.len() == 5 && costs.values().all(|c| *c > 0), "{costs:?}");
    let recent: i64 = costs["u1"] + costs["u2"] + costs["u3"];

    // Default window: the last 30 days (u-old outside; another account's event never in).
    let (status, u) = app.get("/v1/accounts/acct-u/usage", &builder).await;
    assert_eq!(status, 200, "{u}");
    let t = &u["totals"];
    assert_eq!((t["events"].as_i64(), t["charged_events"].as_i64()), (Some(3), Some(3)));
    assert_eq!(t["tokens"]["input"].as_i64(), Some(3_500_000));
    assert_eq!(t["tokens"]["cached_input"].as_i64(), Some(350_000));
    assert_eq!(t["tokens"]["output"].as_i64(), Some(3_000));
    assert_eq!(t["cost_units"].as_i64(), Some(recent));
    assert_eq!(t["cost"].as_str(), Some(tally::money::units_to_usd_string(recent).as_str()));
    let keys = |list: &str| -> Vec<String> {
        u[list].as_array().unwrap().iter().map(|g| g["key"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(keys("by_model"), ["gpt-4o-mini", "grok-4-1-fast"]);
    assert_eq!(keys("by_provider"), ["openai", "xai"]);
    assert_eq!(keys("by_modality"), ["chat"]);
    assert_eq!(keys("by_day").len(), 2);
    let grok = &u["by_model"][1];
    assert_eq!(
        (grok["events"].as_i64(), grok["cost_units"].as_i64()),
        (Some(2), Some(costs["u1"] + costs["u2"]))
    );
    let day_sum: i64 =
        u["by_day"].as_array().unwrap().iter().map(|g| g["cost_units"].as_i64().unwrap()).sum();
    assert_eq!(day_sum, recent);

    // An explicit window: only the old event.
    let from = (now - ChronoDuration::days(45)).format("%Y-%m-%dT%H:%M:%SZ");
    let to = (now - ChronoDuration::days(35)).format("%Y-%m-%dT%H:%M:%SZ");
    let (_, old) = app.get(&format!("/v1/accounts/acct-u/usage?from={from}&to={to}"), &builder).await;
    assert_eq!(
        (old["totals"]["events"].as_i64(), old["totals"]["cost_units"].as_i64()),
        (Some(1), Some(costs["u-old"]))
    );

    // An account with no usage: zeros, empty lists.
    let idle = app.token(Some("acct-idle"), Role::Owner).await.token;
    let (status, none) = app.get("/v1/accounts/acct-idle/usage", &idle).await;
    assert_eq!(
        (status, none["totals"]["events"].as_i64(), none["totals"]["cost"].as_str()),
        (200, Some(0), Some("0.00000000"))
    );
    assert_eq!(none["by_day"], json!([]));
}

#[tokio::test]
async fn usage_events_page_through_the_calls() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let builder = app.token(Some("acct-e"), Role::Builder).await.token;
    let now = Utc::now();
    let mut events: Vec<UsageEvent> = (0..7)
        .map(|i| {
            let model = if i % 2 == 0 { "grok-4-1-fast" } else { "gpt-4o-mini" };
            let provider = if i % 2 == 0 { "xai" } else { "openai" };
            // Two calls share a second: the page order is (time, id), newest first.
            let at = now - ChronoDuration::minutes(10 * i64::from(i).max(1));
            chat(&format!("e{i}"), "acct-e", provider, model, 100_000 + i64::from(i), at)
        })
        .collect();
    let mut failed = events[3].clone();
    failed.event_id = "e-failed".into();
    failed.status = tally::event::Status::Error;
    failed.api_key_id = Some("key-2".into());
    events.push(failed);
    events.push(chat("e-other", "acct-other", "xai", "grok-4-1-fast", 100_000, now));
    let costs = apply_and_log(&app.env, &events).await;

    // Page through everything, two at a time: newest first, each call once.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/accounts/acct-e/usage/events?limit=2".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get(&path, &builder).await;
        assert_eq!(status, 200, "{page}");
        for e in page["events"].as_array().unwrap() {
            let id = e["event_id"].as_str().unwrap().to_string();
            assert_eq!(e["cost_units"].as_i64(), Some(costs[&id]), "{e}");
            assert_eq!(e["billed_cost_units"], e["cost_units"]);
            assert!(e["units"]["input_tokens"].as_i64().unwrap() >= 100_000, "{e}");
            seen.push((e["occurred_at"].as_str().unwrap().to_string(), id));
        }
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 8, "every call of the account, none of another: {seen:?}");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, ties by id");

    // Filters.
    let ids = |page: &Value| -> Vec<String> {
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, grok) = app.get("/v1/accounts/acct-e/usage/events?model=grok-4-1-fast", &builder).await;
    assert_eq!(ids(&grok), ["e0", "e2", "e4", "e6"]);
    let (_, errors) = app.get("/v1/accounts/acct-e/usage/events?status=error", &builder).await;
    assert_eq!(ids(&errors), ["e-failed"]);
    assert_eq!(errors["events"][0]["cost_units"].as_i64(), Some(0), "failed calls are free");
    let (_, key) =
        app.get("/v1/accounts/acct-e/usage/events?api_key_id=key-2&provider=openai", &builder).await;
    assert_eq!(ids(&key), ["e-failed"]);

    // A re-rating correction shows in the call's cost (billed cost unchanged).
    let insert = "INSERT INTO usage_corrections (run_id, event_id, occurred_at, account_id, cost_delta_units)
                  VALUES ('r1', 'e1', now(), 'acct-e', 12345)";
    app.env.clickhouse().query(insert).execute().await.unwrap();
    let (_, one) = app.get("/v1/accounts/acct-e/usage/events?model=gpt-4o-mini&limit=1", &builder).await;
    assert_eq!(ids(&one), ["e1"]);
    assert_eq!(one["events"][0]["cost_units"].as_i64(), Some(costs["e1"] + 12_345));
    assert_eq!(one["events"][0]["billed_cost_units"].as_i64(), Some(costs["e1"]));
}

#[tokio::test]
async fn reservations_over_http() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let gw = app.token(Some("acct-h"), Role::Service).await.token;
    app.credit("acct-h", USD, "seed-h").await;
    let reserve =
        |id: &str, usd: &str| json!({"account_id": "acct-h", "reservation_id": id, "amount_usd": usd});

    let (status, r) = app.post("/v1/reservations", &gw, reserve("r1", "0.50")).await;
    assert_eq!(
        (status, r["status"].as_str(), r["amount_units"].as_i64()),
        (201, Some("active"), Some(USD / 2))
    );
    let (status, again) = app.post("/v1/reservations", &gw, reserve("r1", "0.50")).await;
    assert_eq!((status, &again["created_at"]), (201, &r["created_at"]), "same request, same reservation");
    let (status, e) = app.post("/v1/reservations", &gw, reserve("r1", "0.40")).await;
    assert_eq!((status, e["error"]["code"].as_str()), (409, Some("idempotency_conflict")));
    let (status, e) = app.post("/v1/reservations", &gw, reserve("r2", "0.60")).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (402, Some("insufficient_quota")),
        "only $0.50 is free"
    );
    let (status, r2) = app
        .post(
            "/v1/reservations",
            &gw,
            json!({"account_id": "acct-h", "amount_units": USD / 4, "ttl_secs": 60}),
        )
        .await;
    assert_eq!(status, 201);
    let generated = r2["reservation_id"].as_str().unwrap().to_string();
    assert!(generated.starts_with("res_"));

    let (status, s) = app.post("/v1/reservations/r1/settle", &gw, json!({"actual_usd": 0.3})).await;
    assert_eq!(
        (status, s["status"].as_str(), s["pending_units"].as_i64()),
        (200, Some("settling"), Some(3 * USD / 10))
    );
    let b = ledger::balance(&app.env.pool, "acct-h").await.unwrap().unwrap();
    assert_eq!(
        (b.reserved_units, b.pending_units, b.effective_units),
        (USD / 4, 3 * USD / 10, USD - USD / 4 - 3 * USD / 10)
    );

    let path = format!("/v1/reservations/{generated}/release");
    let (status, rel) = app.call(Method::POST, &path, Some(&gw), Body::None).await;
    assert_eq!((status, rel["status"].as_str()), (200, Some("released")));
    assert_eq!(
        app.call(Method::POST, &path, Some(&gw), Body::None).await.0,
        200,
        "release twice is harmless"
    );
    let (status, e) =
        app.post(&format!("/v1/reservations/{generated}/settle"), &gw, json!({"actual_units": 1})).await;
    assert_eq!((status, e["error"]["code"].as_str()), (409, Some("invalid_state")));
    let (status, e) = app.call(Method::POST, "/v1/reservations/nope/release", Some(&gw), Body::None).await;
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("reservation_not_found")));
    // Another account's gateway cannot see these holds.
    let other = app.token(Some("acct-x"), Role::Service).await.token;
    let (status, e) = app.call(Method::POST, "/v1/reservations/r1/release", Some(&other), Body::None).await;
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("reservation_not_found")));
    assert_eq!(app.balance_units("acct-h").await, USD, "holds never debit; the usage event does");
}

#[tokio::test]
async fn deductions_single_batch_replay_and_conflict() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let gw = app.token(Some("acct-d"), Role::Service).await.token;
    let platform = app.token(None, Role::Service).await.token;
    app.credit("acct-d", USD, "seed-d").await;

    // Reeve's shape: user_id, a JSON number; read exactly (0.1 is not 0.1000000000000000055).
    let body =
        json!({"user_id": "acct-d", "amount": 0.1, "idempotency_key": "call-1", "description": "gpt call"});
    let (status, d) = app.post("/v1/deductions", &gw, body.clone()).await;
    assert_eq!(status, 200, "{d}");
    let d = &d["deduction"];
    assert_eq!((d["amount"].as_str(), d["amount_units"].as_i64()), (Some("-0.10000000"), Some(-USD / 10)));
    assert_eq!(
        (d["balance_after_units"].as_i64(), d["replayed"].as_bool()),
        (Some(9 * USD / 10), Some(false))
    );
    let entry_id = d["entry_id"].as_i64().unwrap();

    // Replay: the original, once. Conflict: 409.
    let (status, again) = app.post("/v1/deductions", &gw, body).await;
    assert_eq!(
        (status, again["deduction"]["entry_id"].as_i64(), again["deduction"]["replayed"].as_bool()),
        (200, Some(entry_id), Some(true))
    );
    let conflict = json!({"account_id": "acct-d", "amount": "0.2", "idempotency_key": "call-1", "description": "gpt call"});
    let (status, e) = app.post("/v1/deductions", &gw, conflict).await;
    assert_eq!((status, e["error"]["code"].as_str()), (409, Some("idempotency_conflict")));
    assert!(e["error"]["message"].as_str().unwrap().contains("call-1"), "names the caller's key: {e}");
    assert_eq!(app.balance_units("acct-d").await, 9 * USD / 10);

    // The key is scoped to the account: another account's "call-1" is its own.
    let other = json!({"account_id": "acct-e", "amount": "0.5", "idempotency_key": "call-1"});
    let (status, e) = app.post("/v1/deductions", &platform, other).await;
    assert_eq!((status, e["deduction"]["replayed"].as_bool()), (200, Some(false)), "{e}");

    // Batch: new, a replay of the single call, a conflict with it, a repeat inside the
    // batch, and one that takes the balance below zero (usage already happened).
    let items = json!({"deductions": [
        {"account_id": "acct-d", "amount": "0.25", "idempotency_key": "b-1"},
        {"user_id": "acct-d", "amount": 0.1, "idempotency_key": "call-1", "description": "gpt call"},
        {"account_id": "acct-d", "amount": "0.3", "idempotency_key": "call-1"},
        {"account_id": "acct-d", "amount": "0.25", "idempotency_key": "b-1"},
        {"account_id": "acct-d", "amount": "2", "idempotency_key": "b-2"},
        {"account_id": "acct-e", "amount": "0.01", "idempotency_key": "b-1"}
    ]});
    let (status, r) = app.post("/v1/deductions/batch", &platform, items.clone()).await;
    assert_eq!(status, 200, "{r}");
    let statuses: Vec<&str> =
        r["results"].as_array().unwrap().iter().map(|i| i["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["deducted", "replayed", "failed", "replayed", "deducted", "deducted"]);
    assert_eq!(r["results"][2]["error"]["code"], "idempotency_conflict");
    assert_eq!(r["results"][1]["deduction"]["entry_id"].as_i64(), Some(entry_id));
    assert_eq!(r["results"][3]["deduction"]["entry_id"], r["results"][0]["deduction"]["entry_id"]);
    assert_eq!(
        (r["deducted"].as_i64(), r["replayed"].as_i64(), r["failed"].as_i64()),
        (Some(3), Some(2), Some(1))
    );
    let after = 9 * USD / 10 - USD / 4 - 2 * USD;
    assert_eq!(r["results"][4]["deduction"]["balance_after_units"].as_i64(), Some(after));
    assert_eq!(app.balance_units("acct-d").await, after, "negative: deductions are never refused for funds");

    // The whole batch again: all replays (the conflict stays a conflict), nothing moves.
    let (_, r) = app.post("/v1/deductions/batch", &platform, items).await;
    assert_eq!(
        (r["deducted"].as_i64(), r["replayed"].as_i64(), r["failed"].as_i64()),
        (Some(0), Some(5), Some(1))
    );
    assert_eq!(app.balance_units("acct-d").await, after);

    // A scoped token cannot deduct from another account, even inside a batch.
    let mixed = json!({"deductions": [
        {"account_id": "acct-d", "amount": "0.01", "idempotency_key": "m-1"},
        {"account_id": "acct-e", "amount": "0.01", "idempotency_key": "m-2"}]});
    let (status, e) = app.post("/v1/deductions/batch", &gw, mixed).await;
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("account_not_found")));
    assert_eq!(app.balance_units("acct-d").await, after, "nothing of a refused batch is applied");

    // Entries: consume, recorded by the token, visible in the history.
    let owner = app.token(Some("acct-d"), Role::Owner).await.token;
    let (_, page) = app.get("/v1/accounts/acct-d/transactions", &owner).await;
    let consume: Vec<&Value> =
        page["transactions"].as_array().unwrap().iter().filter(|t| t["type"] == "consume").collect();
    assert_eq!(consume.len(), 3);
    assert!(consume.iter().all(|t| t["created_by"].as_str().is_some_and(|c| c.starts_with("tok_"))));
    let report = ledger::verify(&app.env.pool).await.unwrap();
    assert_eq!(report.accounts, 2);
}

/// Concurrent batches over the same accounts, in different orders and with shared keys:
/// no deadlock, no 5xx, every distinct key deducted exactly once.
#[tokio::test]
async fn concurrent_batches_deduct_each_key_once() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let platform = app.token(None, Role::Service).await.token;
    let accounts = ["c1", "c2", "c3", "c4"];
    let batch = |b: usize| {
        // Batch b walks the accounts from a different start; keys k0..k9 are shared by all
        // batches (same payload: one deducts, the rest replay), u-* are its own.
        let items: Vec<Value> = (0..20)
            .map(|i| {
                let account = accounts[(b + i) % accounts.len()];
                let key = if i < 10 { format!("k{i}") } else { format!("u-{b}-{i}") };
                let account = if i < 10 { accounts[i % accounts.len()] } else { account };
                json!({"account_id": account, "amount": "0.01", "idempotency_key": key})
            })
            .collect();
        json!({"deductions": items})
    };
    let calls = (0..8).map(|b| app.post("/v1/deductions/batch", &platform, batch(b)));
    let results = futures::future::join_all(calls).await;
    let mut deducted = 0;
    for (status, r) in &results {
        assert_eq!(*status, 200, "{r}");
        assert_eq!(r["failed"].as_i64(), Some(0), "{r}");
        deducted += r["deducted"].as_i64().unwrap();
    }
    assert_eq!(deducted, 10 + 8 * 10, "shared keys once, own keys each");
    let mut total = 0;
    for a in accounts {
        total += app.balance_units(a).await;
    }
    assert_eq!(total, -(10 + 8 * 10) * USD / 100);
    ledger::verify(&app.env.pool).await.unwrap();
}

#[tokio::test]
async fn token_cli_creates_prints_once_and_revokes() {
    let app = spawn_app(Duration::from_millis(1)).await;
    let tally = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .args(["--database-url", &app.env.database_url])
            .output()
            .unwrap()
    };
    let out = tally(&["token", "create", "--account", "acct-cli", "--role", "builder", "--name", "ci"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (token, id) = (created["token"].as_str().unwrap(), created["token_id"].as_str().unwrap());
    assert!(token.starts_with("tly_") && token.len() == 68, "{token}");
    assert_eq!(
        (created["role"].as_str(), created["account_id"].as_str()),
        (Some("builder"), Some("acct-cli"))
    );
    assert_eq!(app.get("/v1/accounts/acct-cli/usage", token).await.0, 200);

    let listed = tally(&["token", "list", "--account", "acct-cli"]);
    let text = String::from_utf8(listed.stdout).unwrap();
    assert!(text.contains(id) && !text.contains(token), "list shows ids, never tokens: {text}");

    assert!(tally(&["token", "revoke", id]).status.success());
    assert_eq!(tally(&["token", "revoke", id]).status.code(), Some(4), "no live token");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(app.get("/v1/accounts/acct-cli/usage", token).await.0, 401);

    let platform = tally(&["token", "create", "--platform", "--role", "service"]);
    assert!(platform.status.success());
    let created: Value = serde_json::from_slice(&platform.stdout).unwrap();
    assert_eq!(created["account_id"], Value::Null);
    assert!(!tally(&["token", "create", "--platform", "--role", "owner"]).status.success());
    assert!(!tally(&["token", "create", "--role", "owner"]).status.success(), "a scope is required");
    assert!(!tally(&["token", "create", "--account", "a", "--role", "admin"]).status.success());
}

/// Credit grants over HTTP: only operator tokens create them (an account's owner cannot
/// grant itself credit); billing roles and operators list them; bad bodies are 4xx; the
/// balance names the next deadline and each transaction the grants it changed.
#[tokio::test]
async fn grants_over_http() {
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let owner = app.token(Some("acct-g"), Role::Owner).await.token;
    let bankroller = app.token(Some("acct-g"), Role::Bankroller).await.token;
    let builder = app.token(Some("acct-g"), Role::Builder).await.token;
    let platform = app.token(None, Role::Service).await.token;
    let operator = app.token(None, Role::Operator).await;
    let refused = NewToken { account_id: Some("acct-g".into()), role: Role::Operator, name: "x".into() };
    assert!(auth::create_token(&app.env.pool, &refused).await.is_err(), "an operator token is platform-wide");
    app.credit("acct-g", 10 * USD, "seed-g").await;
    let path = "/v1/accounts/acct-g/grants";
    let body =
        json!({"amount": "2.5", "reason": "launch", "idempotency_key": "promo-1", "expires_in_days": 7});
    for (token, want) in [(&owner, 403), (&bankroller, 403), (&builder, 403), (&platform, 403)] {
        assert_eq!(app.post(path, token, body.clone()).await.0, want);
    }
    let (status, created) = app.post(path, &operator.token, body.clone()).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["balance_after_units"], 12 * USD + USD / 2);
    let (_, again) = app.post(path, &operator.token, body.clone()).await;
    assert_eq!(again["grant_id"], created["grant_id"], "the same key is a replay");
    let mut other = body.clone();
    other["amount"] = json!("3");
    assert_eq!(app.post(path, &operator.token, other).await.0, 409);
    for bad in [
        json!({"amount": "-1", "reason": "r", "idempotency_key": "k1"}),
        json!({"amount": "1", "reason": "", "idempotency_key": "k2"}),
        json!({"amount": "1", "reason": "r", "idempotency_key": "k3", "source": "purchase"}),
        json!({"amount": "1", "reason": "r", "idempotency_key": "k4", "expires_at": "2020-01-01T00:00:00Z"}),
        json!({"amount": "1", "reason": "r", "idempotency_key": "k5", "expires_in_days": 0}),
        json!({"amount": "1", "reason": "r", "idempotency_key": "k6", "priority": 5000}),
        json!({"amount": "1", "reason": "r", "idempotency_key": "k7", "expires_in_days": 3,
               "expires_at": "2099-01-01T00:00:00Z"}),
        json!({"amount": "1", "reason": "r", "idempotency_key": "k8", "source": "gift"}),
        json!({"amount": "0.000000001", "reason": "r", "idempotency_key": "k9"}),
    ] {
        let (status, json) = app.post(path, &operator.token, bad.clone()).await;
        assert!((400..500).contains(&status), "{bad} -> {status} {json}");
    }
    assert_eq!(app.balance_units("acct-g").await, 12 * USD + USD / 2, "refused bodies credit nothing");

    for token in [&owner, &bankroller, &operator.token] {
        let (status, list) = app.get(path, token).await;
        assert_eq!(status, 200);
        let grants = list["grants"].as_array().unwrap();
        assert_eq!(grants.len(), 2, "the seed addition and the promotion: {list}");
        assert_eq!(
            (grants[0]["source"].as_str(), grants[0]["remaining"].as_str()),
            (Some("promotion"), Some("2.50000000"))
        );
        assert_eq!(grants[1]["source"], "operator");
    }
    assert_eq!(app.get(path, &builder).await.0, 403);
    assert_eq!(app.get(&format!("{path}?limit=0"), &owner).await.0, 400);
    let (_, page) = app.get(&format!("{path}?limit=1"), &owner).await;
    let (_, older) = app.get(&format!("{path}?limit=1&before={}", page["next_before"]), &owner).await;
    assert_eq!(older["grants"][0]["source"], "operator");

    let (_, b) = app.get("/v1/accounts/acct-g/balance", &owner).await;
    assert_eq!(b["next_expiry"]["units"], USD * 5 / 2, "{b}");
    // A deduction burns the promotion first (priority 100 before operator's 400).
    let deduct = json!({"account_id": "acct-g", "amount": "3", "idempotency_key": "d1"});
    assert_eq!(app.post("/v1/deductions", &owner, deduct).await.0, 200);
    let (_, tx) = app.get("/v1/accounts/acct-g/transactions?limit=1", &owner).await;
    let grants = &tx["transactions"][0]["grants"];
    assert_eq!(grants[0]["grant_id"], created["grant_id"]);
    assert_eq!(
        (grants[0]["units"].as_i64(), grants[1]["units"].as_i64()),
        (Some(-(USD * 5 / 2)), Some(-USD / 2))
    );
    ledger::verify(&app.env.pool).await.unwrap();
}

/// Reservations that give the call's shape (issue 12 item 3): Struere's worst case (10,000
/// input + 40,960 output tokens x 10 iterations) held at the catalog's price; a shape of
/// the caller's own; two worst cases that the balance cannot both cover; a catalog that
/// cannot price the model refuses rather than letting the call run unreserved.
#[tokio::test]
async fn reservations_that_estimate() {
    let app = spawn_app_with(auth::TOKEN_CACHE_TTL, "examples/struere.toml").await;
    let gw = app.token(Some("acct-e"), Role::Service).await.token;
    app.credit("acct-e", 10 * USD, "seed-e").await;
    let shape =
        |model: &str| json!({"account_id": "acct-e", "estimate": {"provider": "anthropic", "model": model}});
    // claude-sonnet-4-5 with Struere's 10% markup: 100,000 x $3.30/M + 409,600 x $16.50/M = $7.0884.
    let (status, r) = app.post("/v1/reservations", &gw, shape("claude-sonnet-4-5")).await;
    assert_eq!((status, r["amount"].as_str()), (201, Some("7.08840000")), "{r}");
    let e = &r["estimate"];
    assert_eq!(
        (e["basis"].as_str(), e["priced_model"].as_str()),
        (Some("catalog"), Some("claude-sonnet-4-5"))
    );
    assert_eq!(
        (e["iterations"].as_i64(), e["input_tokens"].as_i64(), e["output_tokens"].as_i64()),
        (Some(10), Some(100_000), Some(409_600))
    );
    // A second worst case does not fit in what is left: the gateway must not make that call.
    let (status, err) = app.post("/v1/reservations", &gw, shape("claude-sonnet-4-5")).await;
    assert_eq!((status, err["error"]["code"].as_str()), (402, Some("insufficient_quota")));
    // The caller's own shape: 1,000 + 1,000 tokens, once, on claude-haiku-4-5 ($1.10 / $5.50).
    let own = json!({"account_id": "acct-e", "estimate": {"provider": "anthropic", "model": "claude-haiku-4-5",
        "input_tokens": 1000, "output_tokens": 1000, "iterations": 1}});
    let (status, r) = app.post("/v1/reservations", &gw, own).await;
    assert_eq!((status, r["amount_units"].as_i64()), (201, Some(660_000)), "{r}");
    // Struere prices unknown models as its default model: still an estimate, flagged by name.
    let (status, r) = app.post("/v1/reservations", &gw, shape("claude-next")).await;
    assert_eq!((status, r["estimate"]["priced_model"].as_str()), (201, Some("grok-4-1-fast")), "{r}");
    for bad in [
        json!({"account_id": "acct-e", "amount_usd": "1", "estimate": {"provider": "anthropic", "model": "claude-haiku-4-5"}}),
        json!({"account_id": "acct-e", "estimate": {"provider": "anthropic", "model": "claude-haiku-4-5", "iterations": 0}}),
        json!({"account_id": "acct-e", "estimate": {"provider": "anthropic", "model": "claude-haiku-4-5", "input_tokens": -5}}),
        json!({"account_id": "acct-e", "estimate": {"provider": "anthropic"}}),
        json!({"account_id": "acct-e", "estimate": {"provider": "anthropic", "model": "m", "colour": 1}}),
    ] {
        let (status, err) = app.post("/v1/reservations", &gw, bad.clone()).await;
        assert!((400..500).contains(&status), "{bad} -> {status} {err}");
    }

    // Amounts in Struere's own unit, integer microdollars, beside the internal units.
    let owner = app.token(Some("acct-e"), Role::Owner).await.token;
    let (_, b) = app.get("/v1/accounts/acct-e/balance", &owner).await;
    let d = &b["display"];
    assert_eq!(
        (d["unit"].as_str(), d["balance"]["shown"].as_str()),
        (Some("microdollar"), Some("10000000")),
        "{b}"
    );
    let held = b["reserved_units"].as_i64().unwrap();
    assert_eq!(
        d["reserved"]["value"].as_str().unwrap(),
        (Decimal::from(held) / Decimal::from(100)).normalize().to_string()
    );
    let (_, tx) = app.get("/v1/accounts/acct-e/transactions", &owner).await;
    assert_eq!(tx["display_unit"], "microdollar");
    assert_eq!(tx["transactions"][0]["display"]["amount"]["shown"], "10000000");

    // Brievio's catalog has no default model: an unknown model cannot be estimated.
    let app = spawn_app(auth::TOKEN_CACHE_TTL).await;
    let gw = app.token(Some("acct-u"), Role::Service).await.token;
    app.credit("acct-u", 10 * USD, "seed-u").await;
    let body = json!({"account_id": "acct-u", "estimate": {"provider": "acme", "model": "unheard-of", "input_tokens": 1000}});
    let (status, err) = app.post("/v1/reservations", &gw, body).await;
    assert_eq!((status, err["error"]["code"].as_str()), (422, Some("cannot_estimate")), "{err}");
    let b = ledger::balance(&app.env.pool, "acct-u").await.unwrap().unwrap();
    assert_eq!(b.reserved_units, 0, "nothing held");
    // Brievio shows USD with 2 decimals once past a cent, 6 below.
    let owner = app.token(Some("acct-u"), Role::Owner).await.token;
    let (_, b) = app.get("/v1/accounts/acct-u/balance", &owner).await;
    assert_eq!(
        (b["display"]["unit"].as_str(), b["display"]["balance"]["shown"].as_str()),
        (Some("USD"), Some("10.00"))
    );
}
