-- The privilege model (docs/security.md): llm_reader uses every model, llm_writer registers
-- models and writes those it owns, row-level security keeps everyone else's rows out of
-- reach, every writing function refuses up front with 42501, server files stay restricted
-- like COPY. Every refused attempt leaves the model bit for bit as it was.
\pset footer off
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
-- The model's weights, moments and step counts as one digest.
CREATE FUNCTION pg_temp.params_md5(model_name text) RETURNS text LANGUAGE sql AS $$
    SELECT md5(string_agg(name || chunk || md5(data) || coalesce(md5(m), '-') || coalesce(md5(v), '-') || step,
                          ',' ORDER BY name, chunk))
      FROM llm_param WHERE model = model_name
$$;

-- 1. The extension's group roles: cluster-wide, no login, writers are readers
SELECT rolname, rolcanlogin, rolinherit, pg_has_role(rolname, 'llm_reader', 'MEMBER') AS is_reader
  FROM pg_roles WHERE rolname IN ('llm_reader', 'llm_writer') ORDER BY 1;
SELECT c.relname, c.relrowsecurity AS rls, c.relforcerowsecurity AS forced,
       has_table_privilege('llm_reader', c.oid, 'SELECT') AS reader_selects,
       has_table_privilege('llm_reader', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') AS reader_writes,
       has_table_privilege('llm_writer', c.oid, 'INSERT') AS writer_inserts,
       has_table_privilege('llm_writer', c.oid, 'UPDATE') AS writer_updates,
       has_table_privilege('llm_writer', c.oid, 'TRUNCATE') AS writer_truncates
  FROM pg_class c JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
 WHERE c.relkind IN ('r', 'v') ORDER BY 1;
-- the seeded GPT-3 family belongs to the installing role
SELECT DISTINCT owner = current_user AS seeded_by_installer FROM llm_model_config;

CREATE ROLE regress_llm_reader IN ROLE llm_reader;
CREATE ROLE regress_llm_alice IN ROLE llm_writer;
CREATE ROLE regress_llm_bob IN ROLE llm_writer;
CREATE ROLE regress_llm_nobody;

-- 2. Alice registers a model (she becomes its owner), initialises it, gives it a tokenizer
-- of 64 tokens (letters, space-letter pairs, doubled letters) and a dataset, and trains it
SET ROLE regress_llm_alice;
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('sec-alice', 1, 2, 8, 4, 16, 16, 64);
SELECT model, owner FROM llm_model_config WHERE model = 'sec-alice';
SELECT llm_init_params('sec-alice', 1) AS params;
WITH t(token, id) AS (
    SELECT chr(97 + i), i FROM generate_series(0, 25) i
    UNION ALL SELECT 'Ġ', 26
    UNION ALL SELECT 'Ġ' || chr(97 + i), 27 + i FROM generate_series(0, 25) i
    UNION ALL SELECT repeat(chr(97 + i), 2), 53 + i FROM generate_series(0, 9) i
    UNION ALL SELECT '<|endoftext|>', 63)
SELECT jsonb_object_agg(token, id)::text AS vocab FROM t \gset
SELECT '#version: 0.2' || E'\n' || string_agg('Ġ ' || chr(97 + i), E'\n' ORDER BY i) || E'\n'
       || (SELECT string_agg(chr(97 + i) || ' ' || chr(97 + i), E'\n' ORDER BY i) FROM generate_series(0, 9) i)
       || E'\n' AS merges
  FROM generate_series(0, 25) i \gset
SELECT llm_load_tokenizer('sec-alice', :'vocab', :'merges') AS vocab_size;
SELECT llm_dataset_from_text('sec-alice', 'a bad cab had a bead and a decade of faded beads', 8) AS rows;
SELECT count(*) AS steps FROM llm_train('sec-alice', 2);
SELECT llm_checkpoint_save('sec-alice', 'alice''s first') AS checkpoint \gset
SELECT pg_llm_export_safetensors_bytes('sec-alice') AS alice_bytes \gset
RESET ROLE;
SELECT pg_temp.params_md5('sec-alice') AS alice_md5,
       (SELECT version FROM llm_model_config WHERE model = 'sec-alice') AS alice_version \gset

-- 3. A reader uses the model: generation, streaming, beam search, logits, loss, evaluation,
-- the tokenizer, exports as bytes and pieces, and every table and view
SET ROLE regress_llm_reader;
SELECT llm_encode('a bad cab', 'sec-alice') AS ids,
       llm_decode(llm_encode('a bad cab', 'sec-alice'), 'sec-alice') AS decoded;
SELECT length(llm_generate('a bad', 4, 0.0, 1, 1.0, 'sec-alice', -1)) > 0 AS generated,
       cardinality(llm_generate_ids('{0,1,2}', 4, 0.0, 1, 1.0, 'sec-alice', -1)) AS generated_ids,
       (SELECT count(*) FROM llm_generate_stream('a bad', 3, 0.0, 1, 1.0, 'sec-alice', -1)) AS streamed,
       (SELECT count(*) FROM llm_beam_search('a bad', 2, 3, 'sec-alice')) AS beams;
SELECT length(llm_logits('{0,1,2}', 'sec-alice')) AS logits_bytes,
       llm_loss('sec-alice', '{0,1,2}', '{1,2,3}') > 0 AS loss,
       (SELECT sequences FROM llm_eval('sec-alice', 'train')) AS eval_sequences;
SELECT pg_llm_export_safetensors_bytes('sec-alice') = :'alice_bytes'::bytea AS same_export,
       (SELECT count(*) > 0 FROM pg_llm_export_safetensors_pieces('sec-alice')) AS pieces,
       pg_llm_export_config('sec-alice')->>'n_layer' AS config_layers;
SELECT (SELECT count(*) FROM llm_param_info WHERE model = 'sec-alice') AS tensors,
       (SELECT count(*) FROM llm_bpe_vocab WHERE model = 'sec-alice') AS vocab,
       (SELECT count(*) FROM llm_bpe_merges WHERE model = 'sec-alice') AS merges,
       (SELECT count(*) FROM llm_dataset WHERE model = 'sec-alice') AS dataset,
       (SELECT count(*) FROM llm_train_log WHERE model = 'sec-alice') AS log,
       (SELECT count(*) FROM llm_checkpoint_param p JOIN llm_checkpoint c ON c.id = p.checkpoint_id
         WHERE c.model = 'sec-alice') AS checkpoint_tensors;

-- ... and changes nothing, registers nothing (42501 every time)
SELECT pg_temp.err($$UPDATE llm_param SET data = data WHERE model = 'sec-alice'$$) AS update_param;
SELECT pg_temp.err($$DELETE FROM llm_model_config WHERE model = 'sec-alice'$$) AS delete_model;
SELECT pg_temp.err($$SELECT llm_init_params('sec-alice', 2)$$) AS init;
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L)', :'alice_bytes', 'sec-alice')) AS import;
SELECT pg_temp.err($$SELECT llm_train_step('sec-alice', '{0,1,2}', '{1,2,3}', 0.1)$$) AS train_step;
SELECT pg_temp.err($$SELECT * FROM llm_train('sec-alice', 1)$$) AS train;
SELECT pg_temp.err($$CALL llm_train_run('sec-alice', 10)$$) AS train_run;
SELECT pg_temp.err($$SELECT llm_checkpoint_load('sec-alice', $$ || :checkpoint || $$)$$) AS checkpoint_load;
SELECT pg_temp.err($$SELECT llm_dataset_from_text('sec-alice', 'a bad cab', 4)$$) AS dataset;
SELECT pg_temp.err($$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
                     VALUES ('sec-reader', 1, 2, 8, 4, 16, 16, 64)$$) AS register_by_insert;
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L, %L::jsonb)',
                          :'alice_bytes', 'sec-reader', pg_llm_export_config('sec-alice'))) AS register_by_import;
RESET ROLE;

-- A role without either group cannot even read the registry
SET ROLE regress_llm_nobody;
SELECT pg_temp.err($$SELECT llm_init_params('sec-alice', 2)$$) AS init_by_nobody;
SELECT pg_temp.err($$SELECT count(*) FROM llm_model_config$$) AS read_by_nobody;
RESET ROLE;

-- 4. Bob, another writer, reads and generates with Alice's model ...
SET ROLE regress_llm_bob;
SELECT llm_generate('a bad', 4, 0.0, 1, 1.0, 'sec-alice', -1) IS NOT NULL AS bob_generates,
       pg_llm_export_safetensors_bytes('sec-alice') = :'alice_bytes'::bytea AS bob_exports;
-- ... but every writing function refuses before doing anything
SELECT pg_temp.err($$SELECT llm_init_params('sec-alice', 2)$$) AS init;
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L)', :'alice_bytes', 'sec-alice')) AS import;
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L, %L::jsonb)',
                          :'alice_bytes', 'sec-alice', pg_llm_export_config('sec-alice'))) AS import_with_config;
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors_lo('{}', '{}', 'sec-alice')$$) AS import_lo;
SELECT pg_temp.err($$SELECT pg_llm_import_npz_bytes('\x00', 'sec-alice')$$) AS import_npz;
SELECT pg_temp.err($$SELECT llm_train_step('sec-alice', '{0,1,2}', '{1,2,3}', 0.1)$$) AS train_step;
SELECT pg_temp.err($$SELECT * FROM llm_train('sec-alice', 1)$$) AS train;
SELECT pg_temp.err($$CALL llm_train_run('sec-alice', 10)$$) AS train_run;
SELECT pg_temp.err($$SELECT llm_checkpoint_save('sec-alice')$$) AS checkpoint_save;
SELECT pg_temp.err($$SELECT llm_checkpoint_load('sec-alice', $$ || :checkpoint || $$)$$) AS checkpoint_load;
SELECT pg_temp.err($$SELECT llm_checkpoint_prune('sec-alice', 0)$$) AS checkpoint_prune;
SELECT pg_temp.err(format('SELECT llm_load_tokenizer(%L, %L, %L)', 'sec-alice', :'vocab', :'merges')) AS tokenizer;
SELECT pg_temp.err($$SELECT llm_dataset_from_text('sec-alice', 'a bad cab', 4)$$) AS dataset;
SELECT pg_temp.err($$SELECT llm_dataset_retokenize('sec-alice', 'sec-alice')$$) AS retokenize;
SELECT pg_temp.err($$SELECT llm_require_writer('sec-alice')$$) AS require_writer;
-- Plain SQL on Alice's rows: row-level security hides them from writes (no row changes) and
-- refuses new rows for her model
WITH u AS (UPDATE llm_param SET data = '\x0000803f' WHERE model = 'sec-alice' RETURNING 1)
SELECT count(*) AS params_updated FROM u;
WITH d AS (DELETE FROM llm_param WHERE model = 'sec-alice' RETURNING 1) SELECT count(*) AS params_deleted FROM d;
WITH d AS (DELETE FROM llm_model_config WHERE model = 'sec-alice' RETURNING 1) SELECT count(*) AS models_deleted FROM d;
WITH u AS (UPDATE llm_model_config SET owner = 'regress_llm_bob' WHERE model = 'sec-alice' RETURNING 1)
SELECT count(*) AS models_taken FROM u;
WITH d AS (DELETE FROM llm_dataset WHERE model = 'sec-alice' RETURNING 1) SELECT count(*) AS rows_deleted FROM d;
WITH d AS (DELETE FROM llm_checkpoint WHERE model = 'sec-alice' RETURNING 1) SELECT count(*) AS checkpoints_deleted FROM d;
WITH d AS (DELETE FROM llm_checkpoint_param RETURNING 1) SELECT count(*) AS checkpoint_tensors_deleted FROM d;
WITH d AS (DELETE FROM llm_train_log WHERE model = 'sec-alice' RETURNING 1) SELECT count(*) AS log_deleted FROM d;
WITH d AS (DELETE FROM llm_model_tokenizer WHERE model = 'sec-alice' RETURNING 1) SELECT count(*) AS tokenizer_detached FROM d;
SELECT pg_temp.err($$INSERT INTO llm_param (model, name, shape, data) VALUES ('sec-alice', 'extra', '{1}', '\x00000000')$$) AS insert_param;
SELECT pg_temp.err($$INSERT INTO llm_dataset (model, tokens) VALUES ('sec-alice', '{1,2,3}')$$) AS insert_dataset;
SELECT pg_temp.err($$INSERT INTO llm_checkpoint_param (checkpoint_id, name, chunk, shape, elem_offset, data, step)
                     VALUES ($$ || :checkpoint || $$, 'extra', 0, '{1}', 0, '\x00000000', 0)$$) AS insert_checkpoint_param;
SELECT pg_temp.err($$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, owner)
                     VALUES ('sec-for-alice', 1, 2, 8, 4, 16, 16, 64, 'regress_llm_alice')$$) AS register_for_alice;
SELECT pg_temp.err($$UPDATE llm_tokenizer SET vocab = '{}'$$) AS update_shared_tokenizer;
SELECT pg_temp.err($$TRUNCATE llm_param$$) AS truncate_params;
-- a forged tokenizer row (found by digest by whoever loads those files later) is refused
SELECT pg_temp.err(format('INSERT INTO llm_tokenizer (digest, vocab, merges, n_tokens) VALUES (md5(%L || E''\x1f'' || %L), %L, %L, 1)',
                          :'vocab', :'merges', '{"a": 0}', :'merges')) AS forged_tokenizer;

-- Bob's own model: he owns it, writes it, and cannot hand it to a role he is no member of
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('sec-bob', 1, 2, 8, 4, 16, 16, 64);
SELECT llm_init_params('sec-bob', 7) AS bob_params;
SELECT version AS bob_version FROM llm_model_config WHERE model = 'sec-bob' \gset
-- the llm_param trigger gives the owner's model a new version, as the owner
UPDATE llm_param SET step = step WHERE model = 'sec-bob' AND name = 'wpe.weight';
SELECT version > :bob_version AS bob_version_advanced FROM llm_model_config WHERE model = 'sec-bob';
SELECT pg_temp.err($$UPDATE llm_model_config SET owner = 'regress_llm_alice' WHERE model = 'sec-bob'$$) AS give_to_alice;
-- nor move his rows into Alice's model (the trigger would then touch her version)
SELECT pg_temp.err($$UPDATE llm_param SET model = 'sec-alice' WHERE model = 'sec-bob' AND name = 'wpe.weight'$$) AS move_into_alice;
RESET ROLE;

-- After all that, Alice's model is bit for bit what it was, at the same version, with its
-- rows, tokenizer, checkpoint and owner
SELECT pg_temp.params_md5('sec-alice') = :'alice_md5' AS alice_unchanged,
       (SELECT version FROM llm_model_config WHERE model = 'sec-alice') = :alice_version AS same_version,
       (SELECT owner FROM llm_model_config WHERE model = 'sec-alice') AS owner,
       (SELECT count(*) FROM llm_dataset WHERE model = 'sec-alice') AS dataset,
       (SELECT count(*) FROM llm_model_tokenizer WHERE model = 'sec-alice') AS tokenizer,
       (SELECT count(*) FROM llm_checkpoint_param WHERE checkpoint_id = :checkpoint) > 0 AS checkpoint,
       (SELECT count(*) FROM llm_model_config WHERE model IN ('sec-reader', 'sec-for-alice')) AS strangers;

-- 5. Server files stay restricted like COPY, also for a model's owner
SET ROLE regress_llm_alice;
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors('/nonexistent/model.safetensors', 'sec-alice')$$) AS import_path;
SELECT pg_temp.err($$SELECT pg_llm_import_npz('/nonexistent/model.npz', 'sec-alice')$$) AS import_npz_path;
SELECT pg_temp.err($$SELECT pg_llm_load_bpe_vocab('/nonexistent/encoder.json', 'sec-alice')$$) AS vocab_path;
SELECT pg_temp.err($$SELECT pg_llm_load_bpe_merges('/nonexistent/vocab.bpe', 'sec-alice')$$) AS merges_path;
SELECT pg_temp.err($$SELECT pg_llm_export_safetensors('/nonexistent/export', 'sec-alice')$$) AS export_path;
SELECT pg_temp.err($$SELECT pg_llm_export_npz('/nonexistent/model.npz', 'sec-alice')$$) AS export_npz_path;
RESET ROLE;
-- with pg_read_server_files the path form gets as far as the file (which does not exist)
GRANT pg_read_server_files TO regress_llm_alice;
SET ROLE regress_llm_alice;
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors('/nonexistent/model.safetensors', 'sec-alice')$$) AS import_path_granted;
RESET ROLE;
REVOKE pg_read_server_files FROM regress_llm_alice;
-- ... and bob, even with pg_read_server_files, still cannot import into Alice's model
GRANT pg_read_server_files TO regress_llm_bob;
SET ROLE regress_llm_bob;
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors('/nonexistent/model.safetensors', 'sec-alice')$$) AS bob_import_path_granted;
RESET ROLE;
REVOKE pg_read_server_files FROM regress_llm_bob;

-- 6. Membership in the owner role shares the model: Bob, granted Alice's role, trains it
GRANT regress_llm_alice TO regress_llm_bob;
SET ROLE regress_llm_bob;
SELECT llm_train_step('sec-alice', '{0,1,2}', '{1,2,3}', 0.1) > 0 AS bob_trained;
SELECT llm_checkpoint_save('sec-alice', 'bob''s') > :checkpoint AS bob_checkpointed;
RESET ROLE;
SELECT pg_temp.params_md5('sec-alice') <> :'alice_md5' AS alice_changed_by_member,
       (SELECT version FROM llm_model_config WHERE model = 'sec-alice') > :alice_version AS version_advanced;
REVOKE regress_llm_alice FROM regress_llm_bob;
SET ROLE regress_llm_bob;
SELECT pg_temp.err($$SELECT llm_train_step('sec-alice', '{0,1,2}', '{1,2,3}', 0.1)$$) AS after_revoke;
RESET ROLE;

-- A group role can own a model for all its members; a model whose owner role is gone can
-- only be written by the tables' owner, and does not break anyone else's writes
CREATE ROLE regress_llm_team NOLOGIN;
GRANT regress_llm_team TO regress_llm_alice, regress_llm_bob;
SET ROLE regress_llm_alice;
UPDATE llm_model_config SET owner = 'regress_llm_team' WHERE model = 'sec-alice';
RESET ROLE;
SET ROLE regress_llm_bob;
SELECT llm_train_step('sec-alice', '{0,1,2}', '{1,2,3}', 0.1) > 0 AS team_member_trained;
RESET ROLE;
UPDATE llm_model_config SET owner = 'regress_llm_gone' WHERE model = 'sec-alice';
SET ROLE regress_llm_bob;
SELECT pg_temp.err($$SELECT llm_init_params('sec-alice', 3)$$) AS orphan_init;
WITH u AS (UPDATE llm_param SET step = step WHERE model IN ('sec-alice', 'sec-bob') RETURNING model)
SELECT model, count(*) > 0 AS updated FROM u GROUP BY model ORDER BY model;
RESET ROLE;

-- 6b. API keys of the HTTP endpoint: a role makes keys for itself (or roles whose privileges
-- it has), sees and revokes only those; only a digest of a key is stored
SET ROLE regress_llm_alice;
SELECT llm_create_api_key('regress_llm_alice', 'alice key') ~ '^sk-pgllm-[0-9a-f]{48}$' AS key_format;
SELECT pg_temp.err($$SELECT llm_create_api_key('regress_llm_bob')$$) AS key_for_bob;
SELECT pg_temp.err($$SELECT llm_create_api_key('regress_no_such_role')$$) AS key_for_nobody;
SELECT pg_temp.err($$INSERT INTO llm_api_key (key_digest, role_name) VALUES ('\x00', 'regress_llm_bob')$$) AS forged_key;
RESET ROLE;
SELECT id AS alice_key FROM llm_api_key WHERE role_name = 'regress_llm_alice' \gset
SELECT length(key_digest) AS digest_bytes FROM llm_api_key WHERE id = :alice_key;
SET ROLE regress_llm_bob;
SELECT count(*) AS keys_bob_sees FROM llm_api_keys();
SELECT llm_revoke_api_key(:alice_key) AS bob_revokes_alices_key;
RESET ROLE;
SET ROLE regress_llm_alice;
SELECT role_name, label FROM llm_api_keys();
SELECT llm_revoke_api_key(:alice_key) AS alice_revokes_her_key;
SELECT count(*) AS keys_left FROM llm_api_keys();
RESET ROLE;

-- 7. Clean up: the owner deletes its model (its rows go with it), then the roles go
SET ROLE regress_llm_bob;
DELETE FROM llm_model_config WHERE model = 'sec-bob';
RESET ROLE;
SELECT count(*) AS bob_rows_left FROM llm_param WHERE model = 'sec-bob';
DELETE FROM llm_model_config WHERE model = 'sec-alice';
DELETE FROM llm_tokenizer t WHERE NOT EXISTS (SELECT 1 FROM llm_model_tokenizer m WHERE m.tokenizer_id = t.id);
DROP ROLE regress_llm_reader, regress_llm_alice, regress_llm_bob, regress_llm_nobody, regress_llm_team;

-- 8. A second database: CREATE EXTENSION finds the roles and grants them its own tables;
-- DROP EXTENSION leaves the roles (they belong to the cluster)
\set first_db :DBNAME
SET client_min_messages = warning;
DROP DATABASE IF EXISTS regress_llm_second;
RESET client_min_messages;
CREATE DATABASE regress_llm_second;
\c regress_llm_second
CREATE EXTENSION pg_llm;
SELECT has_table_privilege('llm_reader', 'llm_param', 'SELECT') AS reader_selects,
       has_table_privilege('llm_writer', 'llm_param', 'UPDATE') AS writer_updates,
       (SELECT relrowsecurity FROM pg_class WHERE oid = 'llm_param'::regclass) AS rls;
DROP EXTENSION pg_llm;
SELECT count(*) AS roles_left FROM pg_roles WHERE rolname IN ('llm_reader', 'llm_writer');
\c :first_db
DROP DATABASE regress_llm_second;
