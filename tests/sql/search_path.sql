-- The extension's internal queries and triggers always reach its own tables, functions and
-- operators, whatever the calling session's search_path and whatever it has created:
-- temporary tables, or tables, functions and operators in a schema of its own placed before
-- pg_catalog. (PostgreSQL's guidance for extension scripts and security-definer code: pin
-- search_path with pg_catalog first and pg_temp last.)
\pset footer off
\getenv srcdir PG_ABS_SRCDIR
\set fixtures :srcdir/fixtures
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- 1. Every function of the extension that runs SQL pins its search_path ...
SELECT p.proname, p.proconfig
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
 WHERE p.proconfig IS NOT NULL
 ORDER BY 1;
-- ... and the others run no SQL at all (tensor kernels, conversions, this backend's state)
SELECT DISTINCT p.proname AS runs_no_sql
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
 WHERE p.proconfig IS NULL AND p.prokind <> 'p'
 ORDER BY 1;
-- ... except procedures that commit, which PostgreSQL does not let pin a search_path: they
-- name every function and operator with its schema instead.
SELECT p.proname AS commits_so_names_its_schemas, p.prosrc ~ 'OPERATOR\(pg_catalog\.' AS qualified_operators
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
 WHERE p.prokind = 'p'
 ORDER BY 1;

-- 2. A small model with the real tokenizer, and what it computes in a plain session
\set vocab `cat :fixtures/tokenizer/encoder.json`
\set merges `cat :fixtures/tokenizer/vocab.bpe`
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('sp-tiny', 1, 2, 16, 8, 64, 32, 50257);
SELECT llm_init_params('sp-tiny', 1) AS params;
SELECT llm_load_tokenizer('sp-tiny', :'vocab', :'merges') AS vocab_size;
CREATE TEMP TABLE reference AS
SELECT llm_encode('Hello world', 'sp-tiny') AS ids,
       llm_logits('{1,2,3}', 'sp-tiny') AS logits,
       llm_generate_ids('{1,2,3}', 5, 0, 0, 1, 'sp-tiny', NULL) AS generated,
       (SELECT version FROM llm_model_config WHERE model = 'sp-tiny') AS version;

CREATE ROLE llm_shadow_user;
SELECT format('GRANT CREATE ON DATABASE %I TO llm_shadow_user', current_database()) \gexec
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO llm_shadow_user;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO llm_shadow_user;
GRANT SELECT ON reference TO llm_shadow_user;
UPDATE llm_model_config SET owner = 'llm_shadow_user' WHERE model = 'sp-tiny';
SET ROLE llm_shadow_user;

-- 3. Temporary tables named like the extension's (pg_temp is searched first for relations
-- unless a search_path names it)
CREATE TEMP TABLE llm_model_config (LIKE public.llm_model_config INCLUDING DEFAULTS);
INSERT INTO pg_temp.llm_model_config SELECT * FROM public.llm_model_config WHERE model = 'sp-tiny';
INSERT INTO pg_temp.llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, version)
VALUES ('invented', 1, 1, 8, 8, 8, 8, 8, 1);
UPDATE pg_temp.llm_model_config SET ln_eps = 0.5, version = 1;
CREATE TEMP TABLE llm_param (LIKE public.llm_param);
CREATE TEMP TABLE llm_model_tokenizer (LIKE public.llm_model_tokenizer);
SELECT ln_eps AS registry_sees_the_real_row FROM llm_get_model_config('sp-tiny');
SELECT llm_logits('{1,2,3}', 'sp-tiny') = (SELECT logits FROM reference) AS same_logits,
       llm_encode('Hello world', 'sp-tiny') = (SELECT ids FROM reference) AS same_ids,
       llm_generate_ids('{1,2,3}', 5, 0, 0, 1, 'sp-tiny', NULL) = (SELECT generated FROM reference) AS same_generation;
SELECT pg_temp.err($$SELECT llm_init_params('invented', 1)$$) AS invented_model;
SELECT pg_temp.err($$SELECT llm_logits('{1}', 'invented')$$) AS invented_model_logits;

-- 4. A schema of the role's own before pg_catalog: tables, and functions and operators that
-- would win over pg_catalog's (same argument types, earlier in the path)
CREATE SCHEMA shadow;
CREATE TABLE shadow.llm_model_config (LIKE public.llm_model_config);
INSERT INTO shadow.llm_model_config SELECT * FROM pg_temp.llm_model_config;
CREATE TABLE shadow.llm_param (LIKE public.llm_param);
CREATE TABLE shadow.llm_model_tokenizer (LIKE public.llm_model_tokenizer);
CREATE TABLE shadow.llm_tokenizer (LIKE public.llm_tokenizer);
CREATE FUNCTION shadow.nextval(regclass) RETURNS bigint LANGUAGE sql AS 'SELECT 1::bigint';
CREATE FUNCTION shadow.md5(text) RETURNS text LANGUAGE sql AS $$SELECT 'shadowed'$$;
CREATE FUNCTION shadow.never_equal(text, text) RETURNS bool LANGUAGE sql AS 'SELECT false';
CREATE OPERATOR shadow.= (LEFTARG = text, RIGHTARG = text, FUNCTION = shadow.never_equal);
DROP TABLE pg_temp.llm_model_config, pg_temp.llm_param, pg_temp.llm_model_tokenizer;
SET search_path = shadow, public, pg_catalog;
SELECT 'a'::text = 'a'::text AS shadow_operator_is_live_here;
SELECT ln_eps AS registry_sees_the_real_row FROM llm_get_model_config('sp-tiny');
SELECT llm_logits('{1,2,3}', 'sp-tiny') = (SELECT logits FROM reference) AS same_logits,
       llm_encode('Hello world', 'sp-tiny') = (SELECT ids FROM reference) AS same_ids,
       llm_generate_ids('{1,2,3}', 5, 0, 0, 1, 'sp-tiny', NULL) = (SELECT generated FROM reference) AS same_generation;
SELECT count(*) AS beams FROM llm_beam_search('Hello', 2, 3, 'sp-tiny');
SELECT count(*) AS streamed FROM llm_generate_stream('Hello', 3, 0, 50, 0.95, 'sp-tiny', NULL);
-- writes go to the real tables, and their triggers use the real sequence
SELECT llm_init_params('sp-tiny', 2) AS reinitialised;
UPDATE public.llm_param SET step = step WHERE model OPERATOR(pg_catalog.=) 'sp-tiny' AND name OPERATOR(pg_catalog.=) 'wpe.weight';
SELECT llm_load_tokenizer('sp-tiny', :'vocab', :'merges') AS tokenizer_reloaded;
SELECT (SELECT version FROM public.llm_model_config WHERE model OPERATOR(pg_catalog.=) 'sp-tiny')
         > (SELECT version FROM reference) AS real_version_advanced,
       (SELECT count(*) FROM shadow.llm_param) AS shadow_params,
       (SELECT count(*) FROM shadow.llm_tokenizer) AS shadow_tokenizers,
       (SELECT count(*) FROM public.llm_tokenizer WHERE digest OPERATOR(pg_catalog.=) 'shadowed') AS shadowed_digests;
SELECT pg_temp.err($$SELECT llm_init_params('invented', 1)$$) AS invented_model;

RESET search_path;
RESET ROLE;
SET client_min_messages = warning;
DROP SCHEMA shadow CASCADE;
RESET client_min_messages;
SELECT format('REVOKE CREATE ON DATABASE %I FROM llm_shadow_user', current_database()) \gexec
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM llm_shadow_user;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM llm_shadow_user;
REVOKE ALL ON reference FROM llm_shadow_user;
DROP ROLE llm_shadow_user;
DELETE FROM llm_model_config WHERE model = 'sp-tiny';
DELETE FROM llm_tokenizer t WHERE NOT EXISTS (SELECT 1 FROM llm_model_tokenizer m WHERE m.tokenizer_id = t.id);
