//! Local servers speaking the payment providers' checkout APIs (Stripe's
//! `POST /v1/checkout/sessions`, Polar's `POST /v1/checkouts/`) on loopback: they check the
//! credential, record each request, and answer as the providers do. No network.

use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode};
use axum::{Form, Json, Router, routing::post};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

pub const STRIPE_KEY: &str = "sk_test_tally";
pub const POLAR_TOKEN: &str = "polar_oat_tally";

/// What the local provider received: (path, Authorization header, Idempotency-Key, body
/// as pairs for a form or the JSON text).
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub form: Vec<(String, String)>,
    pub json: serde_json::Value,
}

#[derive(Clone, Default)]
pub struct Provider {
    pub received: Arc<Mutex<Vec<Received>>>,
}

/// Stripe's `POST /v1/checkout/sessions`: a form, a bearer secret key, `Idempotency-Key`
/// replaying the same session; errors are `{"error": {"message", "type"}}`.
async fn stripe_sessions(
    AxState(p): AxState<Provider>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let r = Received {
        path: "/v1/checkout/sessions".into(),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        form: form.clone(),
        json: serde_json::Value::Null,
    };
    if r.authorization.as_deref() != Some(&format!("Bearer {STRIPE_KEY}")) {
        let err = serde_json::json!({"error": {"message": "Invalid API Key provided", "type": "invalid_request_error"}});
        return (StatusCode::UNAUTHORIZED, Json(err));
    }
    let mut received = p.received.lock().unwrap();
    let previous = r
        .idempotency_key
        .as_ref()
        .and_then(|k| received.iter().position(|x| x.idempotency_key.as_ref() == Some(k)));
    let n = previous.unwrap_or(received.len());
    if previous.is_none() {
        received.push(r);
    }
    let id = format!("cs_test_{n}");
    (
        StatusCode::OK,
        Json(serde_json::json!({"id": id, "object": "checkout.session",
        "url": format!("https://checkout.stripe.test/c/pay/{id}")})),
    )
}

/// Polar's `POST /v1/checkouts/`: JSON, a bearer organization token.
async fn polar_checkouts(
    AxState(p): AxState<Provider>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    if auth.as_deref() != Some(&format!("Bearer {POLAR_TOKEN}")) {
        return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"detail": "Unauthorized"})));
    }
    let mut received = p.received.lock().unwrap();
    let n = received.len();
    received.push(Received {
        path: "/v1/checkouts/".into(),
        authorization: auth,
        idempotency_key: None,
        form: vec![],
        json: body,
    });
    let id = format!("00000000-0000-4000-8000-{n:012}");
    (
        StatusCode::CREATED,
        Json(serde_json::json!({"id": id, "url": format!("https://sandbox.polar.test/checkout/{id}")})),
    )
}

pub async fn spawn_provider() -> (String, Provider, tokio_util::sync::DropGuard) {
    let p = Provider::default();
    let app = Router::new()
        .route("/v1/checkout/sessions", post(stripe_sessions))
        .route("/v1/checkouts/", post(polar_checkouts))
        .with_state(p.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { s.cancelled().await }).await.unwrap();
    });
    (base, p, stop.drop_guard())
}
