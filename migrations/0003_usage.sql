-- 0003: the usage ledger (SPEC §10). Depends only on 0001.
--
-- One row per forwarded request, unique on (org_id, request_id): the proxy's spool delivers at
-- least once and `INSERT … ON CONFLICT DO NOTHING` makes a second delivery a no-op.
--
-- Hash chain, per org and per shipped batch (not per row), so that thousands of records per
-- second per org cost one locked row update per batch rather than one per record:
--   * every record carries `row_hash` = SHA-256 of its canonical content (length-prefixed fields,
--     built by authd in Rust, `ledger::canonical`; `ibexctl usage verify` rebuilds it) and
--     `batch_seq`, the batch of its org that stored it;
--   * every batch actually inserting rows writes one `usage_batches` row: `records` (how many of
--     its rows were new), `content_hash` = SHA-256 of the new rows' `row_hash`es in `request_id`
--     order, `prev_hash` = the org's previous batch hash (32 zero bytes for the first) and
--     `batch_hash` = SHA-256 over ("ibex-usage-batch-v1", org, seq, records, content_hash,
--     prev_hash);
--   * `usage_chain_head` holds each org's last seq and hash; a batch locks its org's head row
--     FOR UPDATE (one lock per org per batch, in org order so two authd never deadlock), so
--     batches of one org are serialised and seqs are gap-free in commit order.
-- An edited row breaks its `row_hash`; a deleted, added or re-hashed row breaks its batch's
-- `records`/`content_hash`; an edited or removed batch breaks the next batch's `prev_hash` or
-- the head. `ibexctl usage verify` checks all three and names the first bad record.
--
-- No foreign key to organizations: a record must never be refused (and block its spool) over a
-- row elsewhere; the org comes from a token authd validated.
--
-- Append-only for everyone (owner included) unless the session sets
-- `ibex.audit_maintenance = 'on'` (the audit_log rule); ibex_app has no UPDATE/DELETE grant on the
-- records or batches at all.

CREATE TABLE ibex_core.usage_records (
    org_id                uuid NOT NULL,
    request_id            text NOT NULL CHECK (length(request_id) BETWEEN 1 AND 128),
    agent_id              uuid NOT NULL,
    token_id              uuid NOT NULL,
    model                 text NOT NULL CHECK (length(model) <= 256),
    route                 text NOT NULL CHECK (length(route) <= 128),
    status                integer NOT NULL CHECK (status BETWEEN 0 AND 999),
    prompt_tokens         bigint NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens     bigint NOT NULL CHECK (completion_tokens >= 0),
    total_tokens          bigint NOT NULL CHECK (total_tokens >= 0),
    cache_read_tokens     bigint NOT NULL DEFAULT 0 CHECK (cache_read_tokens >= 0),
    cache_creation_tokens bigint NOT NULL DEFAULT 0 CHECK (cache_creation_tokens >= 0),
    usage_source          text NOT NULL CHECK (usage_source IN ('provider', 'estimated')),
    streamed              boolean NOT NULL,
    started_at            timestamptz NOT NULL,
    duration_ms           bigint NOT NULL CHECK (duration_ms >= 0),
    -- USD at 10 decimal places; NULL for a model IBEX_PRICES_FILE does not price.
    cost_usd              numeric(20, 10),
    -- SPEC §12: the provider that answered and how many attempts it took (NULL before routes).
    provider              text CHECK (length(provider) <= 128),
    attempts              integer CHECK (attempts >= 0),
    batch_seq             bigint NOT NULL,
    row_hash              bytea NOT NULL CHECK (length(row_hash) = 32),
    recorded_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, request_id)
);
-- GetUsage / export: an org's records over a time range (and by day).
CREATE INDEX usage_records_org_started_idx ON ibex_core.usage_records (org_id, started_at);
-- verify: an org's records batch by batch.
CREATE INDEX usage_records_org_batch_idx ON ibex_core.usage_records (org_id, batch_seq, request_id);

CREATE TABLE ibex_core.usage_batches (
    org_id        uuid NOT NULL,
    seq           bigint NOT NULL CHECK (seq >= 1),
    records       integer NOT NULL CHECK (records >= 1),
    content_hash  bytea NOT NULL CHECK (length(content_hash) = 32),
    prev_hash     bytea NOT NULL CHECK (length(prev_hash) = 32),
    batch_hash    bytea NOT NULL CHECK (length(batch_hash) = 32),
    committed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, seq)
);

CREATE TABLE ibex_core.usage_chain_head (
    org_id     uuid PRIMARY KEY,
    last_seq   bigint NOT NULL CHECK (last_seq >= 0),
    last_hash  bytea NOT NULL CHECK (length(last_hash) = 32)
);

CREATE FUNCTION ibex_core.usage_append_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF current_setting('ibex.audit_maintenance', true) = 'on' THEN
        IF TG_LEVEL = 'STATEMENT' THEN RETURN NULL; END IF;
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER usage_records_append_only BEFORE UPDATE OR DELETE ON ibex_core.usage_records
    FOR EACH ROW EXECUTE FUNCTION ibex_core.usage_append_only();
CREATE TRIGGER usage_records_no_truncate BEFORE TRUNCATE ON ibex_core.usage_records
    FOR EACH STATEMENT EXECUTE FUNCTION ibex_core.usage_append_only();
CREATE TRIGGER usage_batches_append_only BEFORE UPDATE OR DELETE ON ibex_core.usage_batches
    FOR EACH ROW EXECUTE FUNCTION ibex_core.usage_append_only();
CREATE TRIGGER usage_batches_no_truncate BEFORE TRUNCATE ON ibex_core.usage_batches
    FOR EACH STATEMENT EXECUTE FUNCTION ibex_core.usage_append_only();
-- The head only moves forward, one batch at a time.
CREATE FUNCTION ibex_core.usage_head_forward() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.org_id <> OLD.org_id OR NEW.last_seq <> OLD.last_seq + 1 THEN
        IF current_setting('ibex.audit_maintenance', true) = 'on' THEN
            IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'usage_chain_head only advances by one batch: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER usage_chain_head_forward BEFORE UPDATE OR DELETE ON ibex_core.usage_chain_head
    FOR EACH ROW EXECUTE FUNCTION ibex_core.usage_head_forward();
CREATE TRIGGER usage_chain_head_no_truncate BEFORE TRUNCATE ON ibex_core.usage_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION ibex_core.usage_append_only();

ALTER TABLE ibex_core.usage_records ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.usage_records FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.usage_records
    USING (org_id = ibex_core.current_org_id())
    WITH CHECK (org_id = ibex_core.current_org_id());

ALTER TABLE ibex_core.usage_batches ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.usage_batches FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.usage_batches
    USING (org_id = ibex_core.current_org_id())
    WITH CHECK (org_id = ibex_core.current_org_id());

ALTER TABLE ibex_core.usage_chain_head ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.usage_chain_head FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.usage_chain_head
    USING (org_id = ibex_core.current_org_id())
    WITH CHECK (org_id = ibex_core.current_org_id());

REVOKE ALL ON ibex_core.usage_records, ibex_core.usage_batches, ibex_core.usage_chain_head
    FROM PUBLIC;
GRANT SELECT, INSERT ON ibex_core.usage_records TO ibex_app;
GRANT SELECT, INSERT ON ibex_core.usage_batches TO ibex_app;
GRANT SELECT, INSERT ON ibex_core.usage_chain_head TO ibex_app;
GRANT UPDATE (last_seq, last_hash) ON ibex_core.usage_chain_head TO ibex_app;
