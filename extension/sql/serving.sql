-- Metrics and the HTTP endpoint's API keys; see docs/serving.md.

CREATE VIEW llm_stats AS SELECT * FROM llm_stats();
REVOKE ALL ON FUNCTION llm_stats(), llm_metrics() FROM PUBLIC;
REVOKE ALL ON llm_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION llm_stats(), llm_metrics() TO pg_monitor, llm_reader;
GRANT SELECT ON llm_stats TO pg_monitor, llm_reader;

-- API keys of the HTTP endpoint: only a SHA-256 digest of each key is stored; a request
-- with the key runs as its role, so that role's privileges on models apply (docs/security.md).
-- Row-level security lets a role see, create and delete only the keys of roles whose
-- privileges it has (itself, roles it inherits from; superusers: all), so holding a key never
-- gives more than its creator already had. The HTTP workers read the table as a superuser.
CREATE TABLE llm_api_key (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_digest bytea NOT NULL UNIQUE,
    role_name name NOT NULL,
    label text,
    created_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, DELETE ON llm_api_key TO PUBLIC;
ALTER TABLE llm_api_key ENABLE ROW LEVEL SECURITY;
CREATE POLICY llm_own_keys ON llm_api_key USING (llm_has_privileges_of(role_name))
    WITH CHECK (llm_has_privileges_of(role_name));

-- A new key for `role` (returned once; only its digest is kept).
CREATE FUNCTION llm_create_api_key(role name, label text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
DECLARE
    key text;
BEGIN
    IF role IS NULL OR to_regrole(quote_ident(role)) IS NULL THEN
        RAISE EXCEPTION 'role "%" does not exist', role USING ERRCODE = '42704';
    END IF;
    IF NOT llm_has_privileges_of(role) THEN
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

-- The keys the caller may see (digests left out).
CREATE FUNCTION llm_api_keys() RETURNS TABLE (id bigint, role_name name, label text, created_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
    SELECT k.id, k.role_name, k.label, k.created_at FROM llm_api_key k ORDER BY k.id
$$;

-- Revokes key `key_id`; true when it existed and was the caller's to revoke.
CREATE FUNCTION llm_revoke_api_key(key_id bigint) RETURNS boolean
LANGUAGE sql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
    WITH gone AS (DELETE FROM llm_api_key k WHERE k.id = key_id RETURNING 1)
    SELECT EXISTS (SELECT FROM gone)
$$;
