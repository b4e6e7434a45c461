-- 0001: the ibex_core schema (SPEC §8).
--
-- Applied by `ibexctl migrate` as the owner role (IBEX_DATABASE_ADMIN_URL), inside one
-- transaction. `ibexctl migrate` creates the runtime role `ibex_app` before this runs.
-- The owner must be a superuser or have BYPASSRLS: the two SECURITY DEFINER functions below
-- (token lookup by id, audit chaining) read across orgs on purpose and nothing else does.

CREATE SCHEMA IF NOT EXISTS ibex_core;

-- The org of the current transaction, from `SET LOCAL ibex.org_id` / set_config(.., true).
-- Unset or empty → NULL → every policy below matches no row (fail closed).
CREATE FUNCTION ibex_core.current_org_id() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('ibex.org_id', true), '')::uuid $$;

CREATE TABLE ibex_core.organizations (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    rpm_limit   integer NOT NULL CHECK (rpm_limit > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ibex_core.users (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES ibex_core.organizations (id),
    email       text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, id),
    UNIQUE (org_id, email)
);

CREATE TABLE ibex_core.agents (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES ibex_core.organizations (id),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status      text NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'paused', 'archived', 'suspended')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, id)
);

CREATE TABLE ibex_core.tokens (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES ibex_core.organizations (id),
    user_id      uuid,
    agent_id     uuid,
    name         text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    -- Argon2id PHC string of the secret; the plaintext is never stored.
    secret_hash  text NOT NULL CHECK (secret_hash LIKE '$argon2id$%'),
    permissions  bigint NOT NULL CHECK (permissions >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    -- A bound user or agent must belong to the token's own org.
    FOREIGN KEY (org_id, user_id) REFERENCES ibex_core.users (org_id, id),
    FOREIGN KEY (org_id, agent_id) REFERENCES ibex_core.agents (org_id, id)
);
CREATE INDEX tokens_org_idx ON ibex_core.tokens (org_id);

-- Append-only, hash-chained. `id` and the hashes are set by the trigger, never by the writer.
CREATE TABLE ibex_core.audit_log (
    id         bigint PRIMARY KEY,
    org_id     uuid,
    at         timestamptz NOT NULL,
    actor      text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL DEFAULT '',
    details    jsonb NOT NULL DEFAULT '{}',
    prev_hash  bytea NOT NULL,
    row_hash   bytea NOT NULL
);
CREATE INDEX audit_log_org_idx ON ibex_core.audit_log (org_id);

-- The chain head: one row, locked FOR UPDATE by every append, so appends are serialised and
-- ids are gap-free in commit order. Owner-only (no grant to ibex_app).
CREATE TABLE ibex_core.audit_head (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id    bigint NOT NULL,
    last_hash  bytea NOT NULL
);
INSERT INTO ibex_core.audit_head VALUES (true, 0, decode(repeat('00', 32), 'hex'));

-- The exact bytes hashed for an audit row; `ibexctl audit verify` rebuilds them in Rust.
-- Each field is length-prefixed (`<octets>:<text>`) so no value can forge a field boundary.
CREATE FUNCTION ibex_core.audit_canonical(
    p_id bigint, p_org uuid, p_at timestamptz, p_actor text, p_action text, p_target text,
    p_details jsonb, p_prev bytea
) RETURNS bytea
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT convert_to(string_agg(octet_length(f)::text || ':' || f, '' ORDER BY n), 'UTF8')
    FROM unnest(ARRAY[
        'ibex-audit-v1',
        p_id::text,
        coalesce(p_org::text, ''),
        ((extract(epoch FROM p_at) * 1000000)::bigint)::text,
        p_actor,
        p_action,
        p_target,
        p_details::text,
        encode(p_prev, 'hex')
    ]) WITH ORDINALITY AS t(f, n)
$$;

CREATE FUNCTION ibex_core.audit_chain() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, ibex_core
    AS $$
DECLARE
    head record;
BEGIN
    SELECT last_id, last_hash INTO head FROM ibex_core.audit_head WHERE singleton FOR UPDATE;
    NEW.id := head.last_id + 1;
    NEW.at := clock_timestamp();
    NEW.prev_hash := head.last_hash;
    NEW.row_hash := sha256(ibex_core.audit_canonical(
        NEW.id, NEW.org_id, NEW.at, NEW.actor, NEW.action, NEW.target, NEW.details, NEW.prev_hash));
    UPDATE ibex_core.audit_head SET last_id = NEW.id, last_hash = NEW.row_hash WHERE singleton;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_chain BEFORE INSERT ON ibex_core.audit_log
    FOR EACH ROW EXECUTE FUNCTION ibex_core.audit_chain();

-- UPDATE, DELETE and TRUNCATE are refused for everyone, the owner included, unless the session
-- sets `ibex.audit_maintenance = 'on'` (ibex_app has no UPDATE/DELETE grant at all).
CREATE FUNCTION ibex_core.audit_append_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF current_setting('ibex.audit_maintenance', true) = 'on' THEN
        IF TG_LEVEL = 'STATEMENT' THEN RETURN NULL; END IF;
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'ibex_core.audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON ibex_core.audit_log
    FOR EACH ROW EXECUTE FUNCTION ibex_core.audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON ibex_core.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION ibex_core.audit_append_only();

-- Token lookup by id for ValidateToken, before the org is known: only the org and the hash of
-- that one id. Everything else is read afterwards under RLS with the org set.
CREATE FUNCTION ibex_core.token_lookup(p_id uuid)
    RETURNS TABLE (org_id uuid, secret_hash text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, ibex_core
    AS $$ SELECT t.org_id, t.secret_hash FROM ibex_core.tokens t WHERE t.id = p_id $$;

-- Invalidation feed: every change that can make a cached credential stale, however it was made
-- (authd, ibexctl seed, plain SQL), is announced on channel `ibex_invalidation` at commit.
CREATE FUNCTION ibex_core.notify_invalidation() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    r record;
    payload json;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    IF TG_TABLE_NAME = 'tokens' THEN
        payload := json_build_object('kind', 'token', 'op', TG_OP, 'org_id', r.org_id, 'id', r.id);
    ELSIF TG_TABLE_NAME = 'agents' THEN
        payload := json_build_object('kind', 'agent', 'op', TG_OP, 'org_id', r.org_id, 'id', r.id);
    ELSE
        payload := json_build_object('kind', 'org', 'op', TG_OP, 'org_id', r.id, 'id', r.id);
    END IF;
    PERFORM pg_notify('ibex_invalidation', payload::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER tokens_notify_insert_delete AFTER INSERT OR DELETE ON ibex_core.tokens
    FOR EACH ROW EXECUTE FUNCTION ibex_core.notify_invalidation();
-- last_used_at (and name) updates are bookkeeping: they must not flush every cache.
CREATE TRIGGER tokens_notify_update AFTER UPDATE ON ibex_core.tokens
    FOR EACH ROW WHEN (
        (OLD.org_id, OLD.user_id, OLD.agent_id, OLD.secret_hash, OLD.permissions,
         OLD.expires_at, OLD.revoked_at)
        IS DISTINCT FROM
        (NEW.org_id, NEW.user_id, NEW.agent_id, NEW.secret_hash, NEW.permissions,
         NEW.expires_at, NEW.revoked_at))
    EXECUTE FUNCTION ibex_core.notify_invalidation();

CREATE TRIGGER agents_notify_insert_delete AFTER INSERT OR DELETE ON ibex_core.agents
    FOR EACH ROW EXECUTE FUNCTION ibex_core.notify_invalidation();
CREATE TRIGGER agents_notify_update AFTER UPDATE ON ibex_core.agents
    FOR EACH ROW WHEN ((OLD.org_id, OLD.status) IS DISTINCT FROM (NEW.org_id, NEW.status))
    EXECUTE FUNCTION ibex_core.notify_invalidation();

CREATE TRIGGER organizations_notify AFTER UPDATE OR DELETE ON ibex_core.organizations
    FOR EACH ROW EXECUTE FUNCTION ibex_core.notify_invalidation();

-- Row-level security: enabled and forced on every tenant table, keyed on ibex.org_id.
ALTER TABLE ibex_core.organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.organizations FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.organizations
    USING (id = ibex_core.current_org_id())
    WITH CHECK (id = ibex_core.current_org_id());

ALTER TABLE ibex_core.users ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.users FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.users
    USING (org_id = ibex_core.current_org_id())
    WITH CHECK (org_id = ibex_core.current_org_id());

ALTER TABLE ibex_core.agents ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.agents FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.agents
    USING (org_id = ibex_core.current_org_id())
    WITH CHECK (org_id = ibex_core.current_org_id());

ALTER TABLE ibex_core.tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.tokens
    USING (org_id = ibex_core.current_org_id())
    WITH CHECK (org_id = ibex_core.current_org_id());

ALTER TABLE ibex_core.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE ibex_core.audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ibex_core.audit_log
    USING (org_id = ibex_core.current_org_id())
    WITH CHECK (org_id = ibex_core.current_org_id());

-- Grants: ibex_app gets exactly what authd does, nothing more.
REVOKE ALL ON ALL TABLES IN SCHEMA ibex_core FROM PUBLIC;
REVOKE ALL ON FUNCTION ibex_core.token_lookup(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION ibex_core.audit_chain() FROM PUBLIC;
GRANT USAGE ON SCHEMA ibex_core TO ibex_app;
GRANT SELECT, INSERT ON ibex_core.organizations TO ibex_app;
GRANT SELECT ON ibex_core.users TO ibex_app;
GRANT SELECT, INSERT ON ibex_core.agents TO ibex_app;
GRANT UPDATE (status, updated_at) ON ibex_core.agents TO ibex_app;
GRANT SELECT, INSERT ON ibex_core.tokens TO ibex_app;
GRANT UPDATE (revoked_at, last_used_at) ON ibex_core.tokens TO ibex_app;
GRANT INSERT ON ibex_core.audit_log TO ibex_app;
GRANT EXECUTE ON FUNCTION ibex_core.token_lookup(uuid) TO ibex_app;
