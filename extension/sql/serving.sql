-- Metrics and the HTTP endpoint's API keys; see docs/serving.md.

CREATE VIEW llm_stats AS SELECT * FROM llm_stats();
REVOKE ALL ON FUNCTION llm_stats(), llm_metrics() FROM PUBLIC;
REVOKE ALL ON llm_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION llm_stats(), llm_metrics() TO pg_monitor, llm_reader;
GRANT SELECT ON llm_stats TO pg_monitor, llm_reader;

-- API keys of the HTTP endpoint: only a SHA-256 digest of each key is stored; a request
-- with the key runs as its role, so that role's privileges on models apply (docs/security.md).
-- The table is the extension owner's alone; roles manage their keys through the functions
-- below, which let a role create, list and revoke keys only for roles whose privileges it has.
CREATE TABLE llm_api_key (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_digest bytea NOT NULL UNIQUE,
    role_name name NOT NULL,
    label text,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON llm_api_key FROM PUBLIC;

-- A new key for `role` (returned once; only its digest is kept).
CREATE FUNCTION llm_create_api_key(role name, label text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, @extschema@, pg_temp AS $$
DECLARE
    key text;
BEGIN
    IF role IS NULL OR to_regrole(quote_ident(role)) IS NULL THEN
        RAISE EXCEPTION 'role "%" does not exist', role USING ERRCODE = '42704';
    END IF;
    IF NOT pg_has_role(session_user, to_regrole(quote_ident(role)), 'USAGE') THEN
        RAISE EXCEPTION 'permission denied to create an API key for role "%"', role
            USING ERRCODE = '42501',
                  HINT = 'A role creates keys for itself or for roles whose privileges it has.';
    END IF;
    key := 'sk-pgllm-' || encode(llm_random_bytes(24), 'hex');
    INSERT INTO llm_api_key (key_digest, role_name, label)
    VALUES (sha256(convert_to(key, 'UTF8')), role, label);
    RETURN key;
END
$$;

-- The keys of the roles whose privileges the caller has (digests are never shown).
CREATE FUNCTION llm_api_keys() RETURNS TABLE (id bigint, role_name name, label text, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, @extschema@, pg_temp AS $$
    SELECT k.id, k.role_name, k.label, k.created_at FROM llm_api_key k
     WHERE coalesce(pg_has_role(session_user, to_regrole(quote_ident(k.role_name)), 'USAGE'), false)
     ORDER BY k.id
$$;

-- Revokes key `key_id`; true when it existed and was the caller's to revoke.
CREATE FUNCTION llm_revoke_api_key(key_id bigint) RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, @extschema@, pg_temp AS $$
    WITH gone AS (
        DELETE FROM llm_api_key k WHERE k.id = key_id
           AND coalesce(pg_has_role(session_user, to_regrole(quote_ident(k.role_name)), 'USAGE'), false)
        RETURNING 1)
    SELECT EXISTS (SELECT FROM gone)
$$;
