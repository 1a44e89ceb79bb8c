-- The shared weight files under $PGDATA/pg_llm_cache, all databases together (their total is
-- bounded by pg_llm.weight_cache_size). File names and model names of every database are
-- visible here, so the view is for superusers and members of pg_monitor.
CREATE VIEW llm_weight_cache AS
SELECT c.database, d.datname AS database_name, c.model, c.version, c.bytes, c.last_used, c.state, c.file
  FROM pg_llm_weight_cache() c
  LEFT JOIN pg_catalog.pg_database d ON d.oid = c.database;
REVOKE ALL ON FUNCTION pg_llm_weight_cache() FROM PUBLIC;
REVOKE ALL ON llm_weight_cache FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_llm_weight_cache() TO pg_monitor;
GRANT SELECT ON llm_weight_cache TO pg_monitor;
