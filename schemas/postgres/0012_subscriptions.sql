-- Stripe subscriptions drive plans (issue 12, BroomVA; see src/api/subscriptions.rs).
--
-- One row per account: the subscription that currently decides its plan, and the newest
-- Stripe event applied to it. Stripe does not deliver events in order; an event created
-- before the newest one applied is acknowledged and changes nothing, so a late
-- `customer.subscription.updated` cannot undo a later cancellation. Each plan change it
-- causes is the ordinary plan change (ledger entry + plan_changes audit row), keyed by the
-- Stripe event id.
CREATE TABLE subscription_state (
    account_id      TEXT PRIMARY KEY CHECK (length(account_id) BETWEEN 1 AND 128),
    subscription_id TEXT NOT NULL CHECK (length(subscription_id) BETWEEN 1 AND 255),
    status          TEXT NOT NULL CHECK (length(status) BETWEEN 1 AND 64),
    -- The plan the last applied event asked for (NULL: it changed nothing).
    plan            TEXT,
    last_event_id   TEXT NOT NULL CHECK (length(last_event_id) BETWEEN 1 AND 255),
    last_event_at   TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
