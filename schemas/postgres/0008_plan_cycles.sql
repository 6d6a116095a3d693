-- One model of a plan (issue 11.4): a plan account's credits are its ledger balance, set
-- to the plan's allocation at the start of every cycle by a `plan_reset` entry keyed
-- `plan_cycle:<account>:<cycle start>` (`quota::store::post_due_cycles`, run by every
-- `tally run`; exactly once per account per cycle). `cycle_start` is the cycle whose
-- allocation was last posted; `next_cycle_at` is when the next one is due (NULL: a quota
-- tier without credits, or a plan no longer in the catalog).
ALTER TABLE account_plans
    ADD COLUMN cycle_start   TIMESTAMPTZ,
    ADD COLUMN next_cycle_at TIMESTAMPTZ;
CREATE INDEX account_plans_next_cycle ON account_plans (next_cycle_at) WHERE next_cycle_at IS NOT NULL;
