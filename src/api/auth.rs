//! Authentication and roles: bearer tokens, the role -> capability matrix, the [`Caller`]
//! extractor, and the token store behind `tally token create|revoke|list`.
//!
//! **Tokens.** `tly_` + 64 hex digits (256 random bits from the OS), shown once at
//! creation. Postgres keeps only SHA-256(token) (`api_tokens.token_hash`); the token
//! itself is never stored or logged. A plain hash is enough because the token is random,
//! not a password.
//!
//! **Capabilities** (the single source of truth is [`Role::capabilities`]):
//!
//! | role | Billing | Usage | Gateway | scope |
//! |---|---|---|---|---|
//! | owner | yes | yes | yes | one account |
//! | builder | | yes | | one account |
//! | bankroller | yes | | | one account |
//! | service | | | yes | one account, or platform-wide (`--platform`) |
//! | operator | yes | yes | | platform-wide only, plus `Operate` |
//!
//! - `Billing`: balance, transactions, limits, plan, top-ups, credit grants (read).
//! - `Operate`: what only the platform's staff may do: create promotional grants.
//! - `Usage`: usage, quotas.
//! - `Gateway`: authorize, reservations, deductions.
//!
//! **Answers.** No token, or an unknown or revoked one: 401 `unauthorized`. A token of
//! another account asking about an account: 404 `account_not_found`, exactly as for an
//! account that does not exist, so a token never learns which accounts exist. The right
//! account but a role without the capability: 403 `forbidden`.
//!
//! **Cache.** Verified tokens are kept in memory for [`TOKEN_CACHE_TTL`] (30 s), so the
//! authorize fast path does not query Postgres on every request. The price: a token
//! revoked by another process (`tally token revoke`) keeps working for up to 30 s on a
//! running server; [`TokenCache::revoke`] (same process) takes effect at once. Unknown
//! tokens are not cached (a token created a second ago must work at once), so a flood of
//! bad tokens costs one indexed lookup each.

use super::{ApiError, AppState};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// How long a verified token is trusted without asking Postgres again: the longest a
/// revocation by another process takes to apply.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(30);

/// Most tokens kept in memory. Far above the live tokens of one deployment; when full,
/// expired entries are dropped, and if that frees nothing the cache starts over (a burst
/// of lookups, never a wrong answer).
pub const TOKEN_CACHE_ENTRIES_MAX: usize = 10_000;

/// Longest `Authorization` token considered; ours are 68 bytes.
const TOKEN_LEN_MAX: usize = 256;

/// What a role may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Balance, transactions, limits, plan, top-ups.
    Billing,
    /// Usage and quotas.
    Usage,
    /// Authorize, reservations, deductions (gateways).
    Gateway,
    /// The platform's staff: create promotional credit grants.
    Operate,
}

impl Capability {
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Billing => "billing",
            Capability::Usage => "usage",
            Capability::Gateway => "gateway",
            Capability::Operate => "operate",
        }
    }
}

/// A token's role (Brokr's roles, plus service tokens for gateways).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Owner,
    /// Usage and quotas; no billing.
    Builder,
    /// Billing and spend limits only.
    Bankroller,
    /// Gateways: authorize, reserve, deduct. Not even a balance read.
    Service,
    /// The platform's staff (platform-wide only): billing and usage reads of every
    /// account, and grants. Not a gateway.
    Operator,
}

impl Role {
    /// The capability matrix: the one place that says what each role may do.
    pub const fn capabilities(self) -> &'static [Capability] {
        use Capability::*;
        match self {
            Role::Owner => &[Billing, Usage, Gateway],
            Role::Builder => &[Usage],
            Role::Bankroller => &[Billing],
            Role::Service => &[Gateway],
            Role::Operator => &[Billing, Usage, Operate],
        }
    }

    pub fn can(self, cap: Capability) -> bool {
        self.capabilities().contains(&cap)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Builder => "builder",
            Role::Bankroller => "bankroller",
            Role::Service => "service",
            Role::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "owner" => Ok(Role::Owner),
            "builder" => Ok(Role::Builder),
            "bankroller" => Ok(Role::Bankroller),
            "service" => Ok(Role::Service),
            "operator" => Ok(Role::Operator),
            other => Err(format!("unknown role {other:?} (owner, builder, bankroller, service, operator)")),
        }
    }
}

/// A verified token: who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub token_id: String,
    /// `None` only for a platform-wide service token.
    pub account_id: Option<String>,
    pub role: Role,
}

/// The authenticated caller of a request. Handlers call [`Caller::check`] with the
/// account they are about to read or change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub TokenInfo);

impl Caller {
    /// May this caller use `cap` on `account_id`? Another account's data: 404 (its
    /// existence is not revealed); a role without the capability: 403.
    pub fn check(&self, account_id: &str, cap: Capability) -> Result<(), ApiError> {
        if !self.can_see(account_id) {
            return Err(account_not_found(account_id));
        }
        self.require(cap)
    }

    /// The role check alone (for routes whose account is known only after a lookup,
    /// e.g. a reservation id).
    pub fn require(&self, cap: Capability) -> Result<(), ApiError> {
        if self.0.role.can(cap) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("role {} lacks the {} capability", self.0.role.as_str(), cap.as_str()),
        ))
    }

    /// The scope check alone: an account token sees its account, a platform token all.
    pub fn can_see(&self, account_id: &str) -> bool {
        self.0.account_id.as_deref().is_none_or(|own| own == account_id)
    }

    pub fn token_id(&self) -> &str {
        &self.0.token_id
    }

    pub fn role(&self) -> Role {
        self.0.role
    }
}

/// The answer for an account the caller may not see, identical to a missing account.
pub fn account_not_found(account_id: &str) -> ApiError {
    ApiError::not_found("account_not_found", format!("no account {account_id}"))
}

/// [`Caller::check`], then 404 if the account does not exist (it may have been named by a
/// platform-wide token, or a token's account may be gone).
pub async fn check_existing(
    caller: &Caller,
    pool: &PgPool,
    account_id: &str,
    cap: Capability,
) -> Result<(), ApiError> {
    caller.check(account_id, cap)?;
    let found: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM accounts WHERE account_id = $1")
        .bind(account_id)
        .fetch_optional(pool)
        .await
        .map_err(ApiError::internal)?;
    found.map(|_| ()).ok_or_else(|| account_not_found(account_id))
}

impl FromRequestParts<AppState> for Caller {
    /// A response rather than an [`ApiError`]: a 401 carries `WWW-Authenticate`.
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let token = bearer_token(&parts.headers).ok_or_else(|| unauthorized("a bearer token is required"))?;
        match state.auth.lookup(token).await {
            Ok(Some(info)) => Ok(Caller(info)),
            Ok(None) => Err(unauthorized("unknown or revoked token")),
            Err(e) => {
                tracing::error!(error = %e, "token lookup failed");
                Err(ApiError::unavailable("cannot verify the token now").into_response())
            }
        }
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let plausible = !token.is_empty() && token.len() <= TOKEN_LEN_MAX;
    (scheme.eq_ignore_ascii_case("bearer") && plausible).then_some(token)
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// SHA-256 of a token: what Postgres stores and the cache is keyed by.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

struct Cached {
    info: TokenInfo,
    verified_at: Instant,
}

/// Verified tokens in memory, each trusted for `ttl`. A `std` lock, not a tokio one:
/// it is never held across an await, only for a map read or write.
pub struct TokenCache {
    pool: PgPool,
    ttl: Duration,
    entries: RwLock<HashMap<[u8; 32], Cached>>,
}

impl TokenCache {
    pub fn new(pool: PgPool, ttl: Duration) -> TokenCache {
        TokenCache { pool, ttl, entries: RwLock::new(HashMap::new()) }
    }

    /// The token's owner if it exists and is not revoked.
    pub async fn lookup(&self, token: &str) -> Result<Option<TokenInfo>, sqlx::Error> {
        let hash = hash_token(token);
        if let Some(info) = self.cached(&hash) {
            return Ok(Some(info));
        }
        let row: Option<(String, Option<String>, String)> = sqlx::query_as(
            "SELECT token_id, account_id, role FROM api_tokens
             WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await?;
        let Some((token_id, account_id, role)) = row else { return Ok(None) };
        // The table's CHECK allows only these four; anything else is a corrupt row: refuse.
        let Ok(role) = role.parse::<Role>() else {
            tracing::error!(token_id, role, "api_tokens row with an unknown role");
            return Ok(None);
        };
        let info = TokenInfo { token_id, account_id, role };
        self.remember(hash, info.clone());
        Ok(Some(info))
    }

    /// Revoke in Postgres and forget at once in this process. Returns false if no live
    /// token has this id.
    pub async fn revoke(&self, token_id: &str) -> Result<bool, sqlx::Error> {
        let revoked = revoke_token(&self.pool, token_id).await?;
        self.write().retain(|_, c| c.info.token_id != token_id);
        Ok(revoked)
    }

    /// Forget every verified token (the next request of each asks Postgres again).
    pub fn clear(&self) {
        self.write().clear();
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<TokenInfo> {
        let entries = self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.get(hash).filter(|c| c.verified_at.elapsed() < self.ttl).map(|c| c.info.clone())
    }

    fn remember(&self, hash: [u8; 32], info: TokenInfo) {
        let mut entries = self.write();
        if entries.len() >= TOKEN_CACHE_ENTRIES_MAX {
            entries.retain(|_, c| c.verified_at.elapsed() < self.ttl);
            if entries.len() >= TOKEN_CACHE_ENTRIES_MAX {
                entries.clear();
            }
        }
        entries.insert(hash, Cached { info, verified_at: Instant::now() });
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<[u8; 32], Cached>> {
        // A panic while holding the lock cannot leave the map half-changed (each change
        // is one insert, retain or clear), so a poisoned lock is safe to keep using.
        self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What `tally token create` asks for.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// `None`: a platform-wide service token.
    pub account_id: Option<String>,
    pub role: Role,
    pub name: String,
}

/// A token just created: the only time `token` is ever seen.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedToken {
    pub token_id: String,
    pub token: String,
    pub account_id: Option<String>,
    pub role: Role,
    pub name: String,
}

/// A stored token, as `tally token list` shows it (never the token).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TokenRecord {
    pub token_id: String,
    pub account_id: Option<String>,
    pub role: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Create a token. The account is created if Tally has not seen it yet (an operator
/// naming it is enough to make it real; usage would create it the same way).
pub async fn create_token(pool: &PgPool, req: &NewToken) -> Result<CreatedToken, TokenError> {
    match (&req.account_id, req.role) {
        (None, Role::Service | Role::Operator) => {}
        (None, _) => {
            return Err(TokenError::Invalid("only a service or operator token can be platform-wide".into()));
        }
        (Some(_), Role::Operator) => {
            return Err(TokenError::Invalid("an operator token is platform-wide (--platform)".into()));
        }
        (Some(a), _) if a.is_empty() || a.len() > crate::event::ID_LEN_MAX => {
            return Err(TokenError::Invalid("account id must be 1..=128 bytes".into()));
        }
        (Some(_), _) => {}
    }
    if req.name.len() > 200 {
        return Err(TokenError::Invalid("name must be at most 200 bytes".into()));
    }
    let token = format!("tly_{}", hex::encode(random_bytes::<32>()));
    let token_id = format!("tok_{}", hex::encode(random_bytes::<8>()));
    let mut tx = pool.begin().await?;
    if let Some(account) = &req.account_id {
        sqlx::query("INSERT INTO accounts (account_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(account)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO api_tokens (token_id, token_hash, account_id, role, name) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&token_id)
    .bind(&hash_token(&token)[..])
    .bind(&req.account_id)
    .bind(req.role.as_str())
    .bind(&req.name)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(CreatedToken {
        token_id,
        token,
        account_id: req.account_id.clone(),
        role: req.role,
        name: req.name.clone(),
    })
}

/// Mark a token revoked. Returns false if no live token has this id. A running server
/// stops accepting it within [`TOKEN_CACHE_TTL`].
pub async fn revoke_token(pool: &PgPool, token_id: &str) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE token_id = $1 AND revoked_at IS NULL")
            .bind(token_id)
            .execute(pool)
            .await?
            .rows_affected();
    Ok(done == 1)
}

/// Tokens (all, or one account's), newest first.
pub async fn list_tokens(pool: &PgPool, account_id: Option<&str>) -> Result<Vec<TokenRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT token_id, account_id, role, name, created_at, revoked_at FROM api_tokens
         WHERE $1::text IS NULL OR account_id = $1 ORDER BY created_at DESC, token_id",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS generator directly: these bytes are secrets.
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(account: Option<&str>, role: Role) -> Caller {
        Caller(TokenInfo { token_id: "tok".into(), account_id: account.map(str::to_string), role })
    }

    #[test]
    fn the_matrix() {
        use Capability::*;
        let table = [
            (Role::Owner, [true, true, true, false]),
            (Role::Builder, [false, true, false, false]),
            (Role::Bankroller, [true, false, false, false]),
            (Role::Service, [false, false, true, false]),
            (Role::Operator, [true, true, false, true]),
        ];
        for (role, expected) in table {
            let got = [role.can(Billing), role.can(Usage), role.can(Gateway), role.can(Operate)];
            assert_eq!(got, expected, "{role:?}");
        }
    }

    #[test]
    fn another_account_is_404_before_a_missing_capability_is_403() {
        let builder = caller(Some("a"), Role::Builder);
        assert_eq!(builder.check("b", Capability::Billing).unwrap_err().status, StatusCode::NOT_FOUND);
        assert_eq!(builder.check("a", Capability::Billing).unwrap_err().status, StatusCode::FORBIDDEN);
        assert!(builder.check("a", Capability::Usage).is_ok());
        let platform = caller(None, Role::Service);
        assert!(platform.check("any", Capability::Gateway).is_ok());
        assert_eq!(platform.check("any", Capability::Billing).unwrap_err().status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn bearer_header_parsing() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(bearer_token(&h("Bearer tly_x")), Some("tly_x"));
        assert_eq!(bearer_token(&h("bearer  tly_x ")), Some("tly_x"));
        assert_eq!(bearer_token(&h("Basic dXNlcg==")), None);
        assert_eq!(bearer_token(&h("Bearer ")), None);
        assert_eq!(bearer_token(&h(&format!("Bearer {}", "x".repeat(300)))), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn roles_parse_and_print() {
        for r in [Role::Owner, Role::Builder, Role::Bankroller, Role::Service, Role::Operator] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("admin".parse::<Role>().is_err());
    }
}
