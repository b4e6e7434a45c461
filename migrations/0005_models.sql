-- 0005: model allow-lists (SPEC §12, issue 15).
--
-- An org and a token may carry `allowed_models`: names or "*"-prefixes, stored trimmed and
-- lowercased by authd; empty = every model. The proxy gets both lists with the token's
-- validation. An org's list changes by UPDATE, which the existing organizations_notify trigger
-- announces (kind 'org'), so every proxy drops that org's cached tokens within the revocation
-- SLA. A token's list is set only at creation.

ALTER TABLE ibex_core.organizations
    ADD COLUMN allowed_models text[] NOT NULL DEFAULT '{}'
    CHECK (cardinality(allowed_models) <= 64);
ALTER TABLE ibex_core.tokens
    ADD COLUMN allowed_models text[] NOT NULL DEFAULT '{}'
    CHECK (cardinality(allowed_models) <= 64);

-- SetOrgModels (operator key) updates this column only, under RLS with the org set.
GRANT UPDATE (allowed_models) ON ibex_core.organizations TO ibex_app;
