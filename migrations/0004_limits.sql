-- 0004: token limits and budgets (SPEC §11, issue 14). Depends on 0001.
--
-- Org: `tpm_limit` (NULL = IBEX_DEFAULT_TPM of the proxy, 0 = no limit), `monthly_token_budget`
-- and `monthly_usd_budget` (0 = none). Agent: `tpm_limit` and `monthly_token_budget` (0 = none).
-- The proxies get them with each validation; a change is announced on the invalidation feed in
-- the same transaction (the organizations trigger of 0001 fires on any UPDATE; the agents
-- trigger below on a limit change), so every proxy re-reads them within the revocation SLA.

ALTER TABLE ibex_core.organizations
    ADD COLUMN tpm_limit            bigint CHECK (tpm_limit >= 0),
    ADD COLUMN monthly_token_budget bigint NOT NULL DEFAULT 0 CHECK (monthly_token_budget >= 0),
    ADD COLUMN monthly_usd_budget   numeric(20, 6) NOT NULL DEFAULT 0 CHECK (monthly_usd_budget >= 0);

ALTER TABLE ibex_core.agents
    ADD COLUMN tpm_limit            bigint NOT NULL DEFAULT 0 CHECK (tpm_limit >= 0),
    ADD COLUMN monthly_token_budget bigint NOT NULL DEFAULT 0 CHECK (monthly_token_budget >= 0);

CREATE TRIGGER agents_notify_limits AFTER UPDATE ON ibex_core.agents
    FOR EACH ROW WHEN ((OLD.tpm_limit, OLD.monthly_token_budget)
                       IS DISTINCT FROM (NEW.tpm_limit, NEW.monthly_token_budget))
    EXECUTE FUNCTION ibex_core.notify_invalidation();

-- The month re-seed (`GetMonthUsage`): an org's and an agent's records since a time.
CREATE INDEX usage_records_org_agent_started_idx
    ON ibex_core.usage_records (org_id, agent_id, started_at);

GRANT UPDATE (rpm_limit, tpm_limit, monthly_token_budget, monthly_usd_budget)
    ON ibex_core.organizations TO ibex_app;
GRANT UPDATE (tpm_limit, monthly_token_budget, updated_at) ON ibex_core.agents TO ibex_app;
