//! `GET /v1/accounts/{id}/transactions?limit=&before=`: the account's journal, newest
//! first (Reeve's transaction history), one page at a time. Capability: `Billing`.
//!
//! Pagination is by entry id, not offset: `next_before` is the id to pass as `before` for
//! the next page (null on the last page), so entries appended meanwhile never shift a page.

use super::auth::{Caller, Capability, check_existing};
use super::extract::{ApiPath, ApiQuery, path_account_id};
use super::{ApiError, AppState};
use crate::ledger::ops::{self, HistoryEntry};
use crate::money::units_to_usd_string;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Entries per page when `limit` is absent.
pub const PAGE_LIMIT_DEFAULT: i64 = 50;
/// Most entries per page (what `ledger::ops::history` serves).
pub const PAGE_LIMIT_MAX: i64 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<i64>,
    before: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Transaction {
    pub entry_id: i64,
    /// The entry kind: topup, consume, refund, addition, adjustment, plan_allocation,
    /// plan_reset, plan_change, correction, reservation_settle, breakage (an expired
    /// grant's remainder written off).
    #[serde(rename = "type")]
    pub kind: String,
    /// Signed USD decimal string (debits are negative).
    pub amount: String,
    pub amount_units: i64,
    pub balance_after: String,
    pub balance_after_units: i64,
    pub description: String,
    pub event_id: Option<String>,
    pub created_by: Option<String>,
    pub corrects_entry_id: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    /// When the ledger recorded it.
    pub created_at: DateTime<Utc>,
    /// The credit grants this entry changed: which grants paid a debit (negative units), or
    /// the grants a credit created (what each starts with after repaying any overdraft).
    pub grants: Vec<GrantChange>,
    /// `amount` and `balance_after` in the catalog's display unit (`display_unit` of the
    /// page).
    pub display: TransactionDisplay,
}

#[derive(Debug, Serialize)]
pub struct TransactionDisplay {
    pub amount: crate::pricing::DisplayAmount,
    pub balance_after: crate::pricing::DisplayAmount,
}

#[derive(Debug, Serialize)]
pub struct GrantChange {
    pub grant_id: i64,
    pub units: i64,
    pub amount: String,
}

impl Transaction {
    fn new(h: HistoryEntry, unit: &crate::pricing::DisplayUnit) -> Transaction {
        Transaction {
            display: TransactionDisplay {
                amount: unit.amount(h.amount_units),
                balance_after: unit.amount(h.balance_after_units),
            },
            entry_id: h.entry_id,
            kind: h.kind,
            amount: units_to_usd_string(h.amount_units),
            amount_units: h.amount_units,
            balance_after: units_to_usd_string(h.balance_after_units),
            balance_after_units: h.balance_after_units,
            description: h.description,
            event_id: h.event_id,
            created_by: h.created_by,
            corrects_entry_id: h.corrects_entry_id,
            occurred_at: h.occurred_at,
            created_at: h.recorded_at,
            grants: h
                .grant_changes
                .map(|j| j.0)
                .unwrap_or_default()
                .into_iter()
                .map(|(grant_id, units)| GrantChange { grant_id, units, amount: units_to_usd_string(units) })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TransactionPage {
    /// The catalog's display unit of every `display` amount.
    pub display_unit: String,
    pub transactions: Vec<Transaction>,
    /// Pass as `before` for the next (older) page; null when this page is the last.
    pub next_before: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<TransactionPage>, ApiError> {
    path_account_id(&id)?;
    let limit = q.limit.unwrap_or(PAGE_LIMIT_DEFAULT);
    if !(1..=PAGE_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be within 1..={PAGE_LIMIT_MAX}"),
        ));
    }
    if q.before.is_some_and(|b| b <= 0) {
        return Err(ApiError::bad_request("invalid_query", "before must be a positive entry id"));
    }
    check_existing(&caller, &state.pool, &id, Capability::Billing).await?;
    let rows = ops::history(&state.pool, &id, q.before, limit).await.map_err(super::stripe::ledger_error)?;
    // A full page may have older entries behind it; a short one is the last.
    let full = i64::try_from(rows.len()).is_ok_and(|n| n == limit);
    let next_before = if full { rows.last().map(|r| r.entry_id) } else { None };
    let unit = state.catalog.display_unit();
    let transactions = rows.into_iter().map(|h| Transaction::new(h, unit)).collect();
    Ok(Json(TransactionPage { display_unit: unit.unit_name.clone(), transactions, next_before }))
}
