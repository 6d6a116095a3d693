-- Bearer tokens of the HTTP API (`tally token create|revoke|list`).
--
-- Only the SHA-256 of a token is stored: the token itself (256 random bits) is printed
-- once at creation and never stored or logged. A plain hash suffices because the token is
-- random, not a password: there is nothing to guess from the hash.
--
-- Each token has one role. owner / builder / bankroller tokens are scoped to one account;
-- a service token (gateways) is scoped to one account or, with account_id NULL, is
-- platform-wide. The role -> capability matrix lives in code (src/api/auth.rs).
CREATE TABLE api_tokens (
    token_id    TEXT PRIMARY KEY CHECK (length(token_id) BETWEEN 1 AND 64),
    token_hash  BYTEA NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    account_id  TEXT REFERENCES accounts (account_id),
    role        TEXT NOT NULL CHECK (role IN ('owner', 'builder', 'bankroller', 'service')),
    name        TEXT NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ,
    -- Only a service token may be platform-wide.
    CHECK (account_id IS NOT NULL OR role = 'service')
);
CREATE INDEX api_tokens_account ON api_tokens (account_id);
