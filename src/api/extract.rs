//! Extractors that turn every malformed request into the API's JSON error shape.
//!
//! axum's own `Json`, `Query` and `Path` reject with a plain-text body; these wrappers
//! answer `{"error": {"code", "message"}}` instead:
//! - [`ApiJson`]: unparsable JSON -> 400 `malformed_json`; JSON of the wrong shape (missing
//!   or unknown field, wrong type) -> 422 `invalid_body`; body over the limit -> 413
//!   `body_too_large`. The `Content-Type` is not checked: a bearer token is required on
//!   every JSON endpoint, and browsers cannot send one cross-site without CORS, so a lax
//!   content type opens nothing.
//! - [`ApiQuery`]: 400 `invalid_query`; [`ApiPath`]: 400 `invalid_path`.
//! - [`ExactDecimal`]: a USD amount given as a JSON string (`"0.05"`) or a JSON number
//!   (`0.05`), parsed from its literal text, never through `f64`.

use super::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use rust_decimal::Decimal;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// A JSON body whose rejections are JSON errors.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            let code =
                if status == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "invalid_body" };
            ApiError::new(status, code, e.body_text())
        })?;
        parse_json(&body).map(ApiJson)
    }
}

/// Parse a JSON body: syntax errors are 400, shape errors 422. A string holding a NUL
/// character (`\u0000`) is refused (422): Postgres text cannot store it, and no id, key,
/// reason or description needs one.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    use serde_json::error::Category;
    if has_nul_escape(body) {
        return Err(ApiError::unprocessable("invalid_body", NUL_REFUSED));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        Category::Data => ApiError::unprocessable("invalid_body", e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request("malformed_json", format!("body is not valid JSON: {e}"))
        }
    })
}

const NUL_REFUSED: &str = "text must not contain the NUL character (\\u0000)";

/// A `\u0000` escape in JSON text: a `\` that is not itself escaped, then `u0000`. (A raw
/// NUL byte is not valid JSON at all.)
fn has_nul_escape(body: &[u8]) -> bool {
    let mut backslashes = 0usize;
    for (i, b) in body.iter().enumerate() {
        if *b == b'\\' {
            backslashes += 1;
            continue;
        }
        if *b == b'u' && backslashes % 2 == 1 && body[i + 1..].starts_with(b"0000") {
            return true;
        }
        backslashes = 0;
    }
    false
}

/// A percent-encoded NUL (`%00`) in a path or query: refused like a NUL in a body.
fn has_encoded_nul(s: &str) -> bool {
    s.as_bytes().windows(3).any(|w| w == b"%00")
}

/// Query string parameters whose rejections are JSON errors.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        if parts.uri.query().is_some_and(has_encoded_nul) {
            return Err(ApiError::bad_request("invalid_query", NUL_REFUSED));
        }
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

/// Path parameters whose rejections are JSON errors (e.g. percent-encoded invalid UTF-8).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if has_encoded_nul(parts.uri.path()) {
            return Err(ApiError::bad_request("invalid_path", NUL_REFUSED));
        }
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

/// Longest id (account, reservation, idempotency key) the API accepts, as the event's ids.
pub const ID_LEN_MAX: usize = crate::event::ID_LEN_MAX;

/// An account id from a path: 1..=128 bytes, else 400 (as the balance route answers).
pub fn path_account_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > ID_LEN_MAX {
        return Err(ApiError::bad_request("invalid_account_id", "account id must be 1..=128 bytes"));
    }
    Ok(())
}

/// An id inside a body: 1..=128 bytes, else 422 naming the field.
pub fn body_id(field: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > ID_LEN_MAX {
        return Err(ApiError::unprocessable("invalid_id", format!("{field} must be 1..=128 bytes")));
    }
    Ok(())
}

/// Longest decimal literal accepted: far more digits than any real amount needs, and a
/// bound on what a client can make us parse.
const DECIMAL_TEXT_LEN_MAX: usize = 64;

/// A decimal given as a JSON string or number, kept exactly as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactDecimal(pub Decimal);

impl<'de> Deserialize<'de> for ExactDecimal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // RawValue hands over the literal text of the JSON value: a number never becomes
        // an f64 on the way, so 12345678.12345678 stays exact.
        let raw = Box::<RawValue>::deserialize(d)?;
        parse_decimal_json(raw.get()).map(ExactDecimal).map_err(D::Error::custom)
    }
}

/// The text of one JSON value -> a decimal. Strings and numbers follow JSON's number
/// grammar (`-?int(.frac)?(e[+-]?exp)?`); anything else is refused.
pub fn parse_decimal_json(raw: &str) -> Result<Decimal, String> {
    let raw = raw.trim();
    let text: String = if raw.starts_with('"') {
        serde_json::from_str::<String>(raw).map_err(|e| e.to_string())?
    } else if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        raw.to_string()
    } else {
        return Err(format!("expected a decimal string or number, got {}", excerpt(raw)));
    };
    if text.len() > DECIMAL_TEXT_LEN_MAX || !is_json_number(&text) {
        return Err(format!("not a decimal number: {}", excerpt(&text)));
    }
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(&text)
    } else {
        // from_str_exact refuses what it would have to round.
        Decimal::from_str_exact(&text)
    };
    parsed.map_err(|e| format!("decimal {} out of range: {e}", excerpt(&text)))
}

fn excerpt(s: &str) -> String {
    let cut: String = s.chars().take(24).collect();
    if cut.len() < s.len() { format!("{cut}...") } else { cut }
}

/// JSON's number grammar (RFC 8259 section 6), checked by hand so a string amount obeys
/// the same rules as a numeric one (no "+5", ".5", "5.", "NaN", " 5").
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 || (n > 1 && b[int_start] == b'0') {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[derive(Deserialize)]
    struct Body {
        amount: ExactDecimal,
        other: Option<ExactDecimal>,
    }

    fn amount(json: &str) -> Result<Decimal, String> {
        serde_json::from_str::<Body>(json).map(|b| b.amount.0).map_err(|e| e.to_string())
    }

    #[test]
    fn numbers_and_strings_parse_exactly() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(amount(r#"{"amount": 0.05}"#), Ok(d("0.05")));
        assert_eq!(amount(r#"{"amount": "0.05"}"#), Ok(d("0.05")));
        // 17 significant digits: an f64 would turn this into 12345678.123456780.
        assert_eq!(amount(r#"{"amount": 12345678.123456789}"#), Ok(d("12345678.123456789")));
        assert_eq!(amount(r#"{"amount": 5e-2}"#), Ok(d("0.05")));
        assert_eq!(amount(r#"{"amount": -1}"#), Ok(d("-1")));
        let b: Body = serde_json::from_str(r#"{"amount": 1, "other": null}"#).unwrap();
        assert!(b.other.is_none());
        let b: Body = serde_json::from_str(r#"{"amount": 1, "other": 2.5}"#).unwrap();
        assert_eq!(b.other, Some(ExactDecimal(d("2.5"))));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            r#"{"amount": true}"#,
            r#"{"amount": null}"#,
            r#"{"amount": [1]}"#,
            r#"{"amount": "abc"}"#,
            r#"{"amount": "+5"}"#,
            r#"{"amount": ".5"}"#,
            r#"{"amount": "5."}"#,
            r#"{"amount": " 5"}"#,
            r#"{"amount": "NaN"}"#,
            r#"{"amount": "01"}"#,
            r#"{"amount": 1e400}"#,
        ] {
            assert!(amount(bad).is_err(), "{bad} must be refused");
        }
        let long = format!(r#"{{"amount": "{}"}}"#, "1".repeat(100));
        assert!(amount(&long).is_err());
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-0", "1.5", "10", "1e5", "1E+5", "2.5e-3"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in ["", "-", "1.", ".1", "1e", "00", "1.5.5", "0x1", "1 "] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod nul_tests {
    use super::*;

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(has_nul_escape(br#"{"a": "x\u0000y"}"#));
        assert!(has_nul_escape(br#"{"a\u0000": 1}"#));
        assert!(has_nul_escape(br#"{"a": "\\\u0000"}"#), "an escaped backslash, then a NUL escape");
        assert!(!has_nul_escape(br#"{"a": "\\u0000"}"#), "a literal backslash followed by u0000");
        assert!(!has_nul_escape(br#"{"a": "\u00e9 u0000"}"#));
        assert!(
            has_encoded_nul("/v1/accounts/a%00b/balance") && !has_encoded_nul("/v1/accounts/a%2500/balance")
        );
    }
}
