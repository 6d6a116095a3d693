-- Custom plan terms per account (issue 11.6, BroomVA's enterprise: "custom credit
-- allocation ... configured during provisioning, typically warning-only with custom
-- ceilings"). Set only by an operator (`tally plan ACCOUNT enterprise --allocation-usd ...`);
-- customers cannot self-upgrade to a plan that is not self-serve. NULL: the catalog's
-- terms for the plan. All three are set together or not at all.
ALTER TABLE account_plans
    ADD COLUMN custom_allocation_units   BIGINT CHECK (custom_allocation_units >= 0),
    ADD COLUMN custom_overage_policy     TEXT CHECK (custom_overage_policy IN ('hard_limit', 'soft_limit', 'warn')),
    ADD COLUMN custom_soft_limit_percent INTEGER CHECK (custom_soft_limit_percent BETWEEN 100 AND 1000),
    ADD CONSTRAINT account_plans_custom_terms_together CHECK (
        (custom_allocation_units IS NULL) = (custom_overage_policy IS NULL)
        AND (custom_allocation_units IS NULL) = (custom_soft_limit_percent IS NULL));
