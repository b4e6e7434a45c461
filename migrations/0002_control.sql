-- 0002: control-plane fixes (issue 11).
--
-- A token or agent moved to another org (`UPDATE ... SET org_id`) used to be announced for its
-- new org only, so the old (org, id) entry stayed trusted by every proxy until it was evicted.
-- Now a move is announced for both orgs: first the old, then the new. Receivers treat every
-- event as a hint (evict and re-read), so an extra or forged event costs a validation, never
-- trust.

CREATE OR REPLACE FUNCTION ibex_core.notify_invalidation() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    r record;
    kind text;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    IF TG_TABLE_NAME = 'tokens' THEN
        kind := 'token';
    ELSIF TG_TABLE_NAME = 'agents' THEN
        kind := 'agent';
    ELSE
        PERFORM pg_notify('ibex_invalidation', json_build_object(
            'kind', 'org', 'op', TG_OP, 'org_id', r.id, 'id', r.id)::text);
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.org_id IS DISTINCT FROM NEW.org_id THEN
        PERFORM pg_notify('ibex_invalidation', json_build_object(
            'kind', kind, 'op', TG_OP, 'org_id', OLD.org_id, 'id', OLD.id)::text);
    END IF;
    PERFORM pg_notify('ibex_invalidation', json_build_object(
        'kind', kind, 'op', TG_OP, 'org_id', r.org_id, 'id', r.id)::text);
    RETURN NULL;
END
$$;
