-- Checkpoint export: bytes and path forms, config.json, sharding, GPT-3 models in GPT-2 /
-- GPT-Neo layouts, refusals, privileges. Round trips are checked by importing the export into
-- a new model and comparing logits (the tensors' equality with transformers' is checked in
-- the engine's tests on committed fixtures).
\pset footer off
\getenv srcdir PG_ABS_SRCDIR
\set fixtures :srcdir/fixtures
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    -- server paths differ between machines
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '"/[^"]*"', '"<path>"', 'g');
END $$;
CREATE FUNCTION pg_temp.same_logits(a text, b text) RETURNS boolean LANGUAGE sql AS $$
    SELECT llm_logits('{1,5,9,2,7,3}', a) = llm_logits('{1,5,9,2,7,3}', b)
$$;

-- 1. Bytes form: an imported GPT-Neo and OPT model export and re-import with identical logits
\set cfg `cat :fixtures/models/gpt_neo/config.json`
\set st `base64 -w0 :fixtures/models/gpt_neo/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'ex-neo', :'cfg'::jsonb) AS neo_params;
\set cfg `cat :fixtures/models/opt_post_ln/config.json`
\set st `base64 -w0 :fixtures/models/opt_post_ln/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'ex-opt', :'cfg'::jsonb) AS opt_params;
SELECT m AS model, c->>'model_type' AS model_type, c->'architectures'->>0 AS architecture,
       c->>'tie_word_embeddings' AS tied, coalesce(c->>'window_size', '-') AS window_size,
       coalesce(c->>'do_layer_norm_before', '-') AS pre_ln
  FROM (VALUES ('ex-neo'), ('ex-opt')) v(m), LATERAL (SELECT pg_llm_export_config(m) AS c) x;
SELECT pg_llm_import_safetensors_bytes(pg_llm_export_safetensors_bytes(m), m || '-copy', pg_llm_export_config(m)) AS params,
       pg_temp.same_logits(m, m || '-copy') AS same_logits
  FROM (VALUES ('ex-neo'), ('ex-opt')) v(m);
-- the export is a safetensors file with transformers' metadata
SELECT convert_from(substring(b FROM 9 FOR 31), 'UTF8') LIKE '{"__metadata__":{"format":"pt"}%' AS pt_metadata
  FROM (SELECT pg_llm_export_safetensors_bytes('ex-neo') AS b) x;

-- 2. GPT-3 models: all dense → GPT-2's layout; dense + banded → GPT-Neo's
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab,
                              attention_pattern, local_window)
VALUES ('ex-gpt3-dense', 2, 2, 16, 8, 64, 32, 50, '{dense}', NULL),
       ('ex-gpt3-banded', 2, 2, 16, 8, 64, 32, 50, '{dense,local}', 4);
SELECT llm_init_params('ex-gpt3-dense', 3) AS dense_params, llm_init_params('ex-gpt3-banded', 3) AS banded_params;
-- non-zero biases everywhere (q/k/v included) for the GPT-2 layout, which has them all;
-- the banded model gets non-zero key and value biases, which fold away exactly
UPDATE llm_param SET data = pg_llm_from_array(array(SELECT sin(i)::real FROM generate_series(1, shape[1]) i))
 WHERE model = 'ex-gpt3-dense' AND name LIKE '%bias';
UPDATE llm_param SET data = pg_llm_from_array(array(SELECT (0.3 * cos(i))::real FROM generate_series(1, shape[1]) i))
 WHERE model = 'ex-gpt3-banded' AND (name LIKE '%k_proj.bias' OR name LIKE '%v_proj.bias' OR name LIKE '%out_proj.bias');
SELECT m AS model, c->>'model_type' AS model_type, c->'attention_layers' AS layers,
       coalesce(c->>'scale_attn_weights', '-') AS scaled
  FROM (VALUES ('ex-gpt3-dense'), ('ex-gpt3-banded')) v(m), LATERAL (SELECT pg_llm_export_config(m) AS c) x;
-- re-imported as GPT-2 / GPT-Neo models: the logits agree to float32 rounding (folding the
-- score scale and the value biases reorders a few operations)
SELECT m AS model,
       pg_llm_import_safetensors_bytes(pg_llm_export_safetensors_bytes(m), m || '-hf', pg_llm_export_config(m)) AS params
  FROM (VALUES ('ex-gpt3-dense'), ('ex-gpt3-banded')) v(m);
SELECT m AS model, (SELECT family FROM llm_model_config WHERE model = m || '-hf') AS family,
       (SELECT max(abs(a - b)) < 1e-4 FROM unnest(pg_llm_to_array(llm_logits('{1,5,9,2,7,3}', m)),
                                                pg_llm_to_array(llm_logits('{1,5,9,2,7,3}', m || '-hf'))) u(a, b)) AS same_logits
  FROM (VALUES ('ex-gpt3-dense'), ('ex-gpt3-banded')) v(m);
-- without a config.json a dense model registered with pg_gpt3's own names takes its export back
CREATE TEMP TABLE exported_back AS
SELECT m, llm_logits('{1,5,9,2,7,3}', m) AS logits FROM (VALUES ('ex-gpt3-dense')) v(m);
SELECT m AS model, pg_llm_import_safetensors_bytes(pg_llm_export_safetensors_bytes(m), m) AS params
  FROM exported_back;
SELECT m AS model, (SELECT family FROM llm_model_config WHERE model = m) AS family,
       (SELECT max(abs(a - b)) < 1e-4 FROM unnest(pg_llm_to_array(llm_logits('{1,5,9,2,7,3}', m)),
                                                pg_llm_to_array(logits)) u(a, b)) AS same_logits
  FROM exported_back;
-- a query bias has no GPT-Neo equivalent: refused, nothing written
UPDATE llm_param SET data = pg_llm_from_array(array_fill(0.5::real, ARRAY[shape[1]]))
 WHERE model = 'ex-gpt3-banded' AND name = 'layers.1.attn.q_proj.bias';
SELECT pg_temp.err($$SELECT pg_llm_export_safetensors_bytes('ex-gpt3-banded')$$) AS query_bias;
SELECT pg_temp.err($$SELECT pg_llm_export_config('ex-gpt3-banded')$$) AS query_bias_config;

-- 3. Path form (a folder from_pretrained loads): single file, shards, re-import from the folder
SELECT current_setting('data_directory') || '/pg_llm_regress_export' AS dir \gset
SELECT pg_llm_export_safetensors(:'dir', 'ex-neo') > 0 AS exported;
SELECT f FROM pg_ls_dir(:'dir') f WHERE f = 'config.json' OR f LIKE 'model%' ORDER BY f;  -- the export's files (others may be left from earlier runs)
SELECT pg_llm_import_safetensors(:'dir', 'ex-neo-dir', pg_read_file(:'dir' || '/config.json')::jsonb) AS params,
       pg_temp.same_logits('ex-neo', 'ex-neo-dir') AS same_logits;
-- shards of at most 40 kB (a larger tensor gets one of its own); the single file is replaced
SELECT pg_llm_export_safetensors(:'dir', 'ex-neo', 40000) > 0 AS exported_sharded;
SELECT f FROM pg_ls_dir(:'dir') f WHERE f = 'config.json' OR f LIKE 'model%' ORDER BY f;  -- the export's files (others may be left from earlier runs)
SELECT count(*) AS indexed_tensors FROM jsonb_object_keys((pg_read_file(:'dir' || '/model.safetensors.index.json')::jsonb)->'weight_map');
SELECT pg_llm_import_safetensors(:'dir', 'ex-neo-shards', pg_read_file(:'dir' || '/config.json')::jsonb) AS params,
       pg_temp.same_logits('ex-neo', 'ex-neo-shards') AS same_logits;
-- a path ending in .safetensors is one file
SELECT pg_llm_export_safetensors(:'dir' || '/single.safetensors', 'ex-opt') > 0 AS exported_file;
SELECT pg_llm_import_safetensors(:'dir' || '/single.safetensors', 'ex-opt-file', pg_llm_export_config('ex-opt')) AS params,
       pg_temp.same_logits('ex-opt', 'ex-opt-file') AS same_logits;

-- a folder export carries a tensor manifest: each tensor's file, byte range and sha256
SELECT count(*) AS manifest_lines,
       bool_and(l::jsonb ? 'sha256' AND length(l::jsonb->>'sha256') = 64) AS every_line_has_a_digest
  FROM regexp_split_to_table(rtrim(pg_read_file(:'dir' || '/model.manifest.jsonl'), E'\n'), E'\n') l;
SELECT pg_llm_import_safetensors(:'dir' || '/model.manifest.jsonl', 'ex-neo-manifest', pg_read_file(:'dir' || '/config.json')::jsonb) AS params,
       pg_temp.same_logits('ex-neo', 'ex-neo-manifest') AS same_logits;
-- a manifest whose checksums do not match: refused, and the model is not created
\set bad :dir/bad.manifest.jsonl
COPY (SELECT regexp_replace(l, '"sha256":"[0-9a-f]{64}"', '"sha256":"' || repeat('0', 64) || '"')
        FROM regexp_split_to_table(rtrim(pg_read_file(:'dir' || '/model.manifest.jsonl'), E'\n'), E'\n') WITH ORDINALITY AS t(l, n)
       ORDER BY n) TO :'bad';
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors(%L, %L, %L::jsonb)', :'bad',
                          'ex-neo-bad', pg_read_file(:'dir' || '/config.json'))) AS bad_checksum,
       (SELECT count(*) FROM llm_model_config WHERE model = 'ex-neo-bad') AS created;

-- Megatron-LM GPT checkpoints in each fused-QKV ordering give the same model; exported, it is
-- a GPT-2 checkpoint
\set cfg `cat :fixtures/megatron/v0/config.json`
\set st `base64 -w0 :fixtures/megatron/v0/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'ex-megatron-v0', :'cfg'::jsonb) AS v0_params;
\set cfg `cat :fixtures/megatron/v1/config.json`
\set st `base64 -w0 :fixtures/megatron/v1/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'ex-megatron-v1', :'cfg'::jsonb) AS v1_params;
\set cfg `cat :fixtures/megatron/v2/config.json`
\set st `base64 -w0 :fixtures/megatron/v2/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'ex-megatron-v2', :'cfg'::jsonb) AS v2_params;
SELECT model, family, padded_vocab, activation FROM llm_model_config WHERE model LIKE 'ex-megatron-v_' ORDER BY model;
SELECT pg_temp.same_logits('ex-megatron-v0', 'ex-megatron-v1') AS v0_v1, pg_temp.same_logits('ex-megatron-v1', 'ex-megatron-v2') AS v1_v2,
       pg_llm_export_config('ex-megatron-v2')->>'model_type' AS exports_as;
SELECT pg_llm_import_safetensors_bytes(pg_llm_export_safetensors_bytes('ex-megatron-v2'), 'ex-megatron-hf', pg_llm_export_config('ex-megatron-v2')) AS params;
SELECT pg_temp.same_logits('ex-megatron-v2', 'ex-megatron-hf') AS same_logits;

-- pg_gpt2's checkpoint archives (its ".npz": a gzip stream of GPT-2's arrays): the shaped
-- archive its converter wrote and the flattened one its export wrote import into a registered
-- GPT-2 model; a GPT-2 model exports to one
\set cfg `cat :fixtures/models/gpt2/config.json`
\set st `base64 -w0 :fixtures/models/gpt2/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'ex-gpt2', :'cfg'::jsonb) AS gpt2_params;
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, family)
SELECT m, 2, 4, 32, 8, 128, 64, 384, 'gpt2' FROM (VALUES ('ex-npz'), ('ex-npz-flat'), ('ex-npz-back'), ('ex-npz-file')) v(m);
\set npz `base64 -w0 :fixtures/pg_gpt2/gpt2.npz`
\set npz_flat `base64 -w0 :fixtures/pg_gpt2/gpt2_flat.npz`
SELECT pg_llm_import_npz_bytes(decode(:'npz', 'base64'), 'ex-npz') AS shaped,
       pg_llm_import_npz_bytes(decode(:'npz_flat', 'base64'), 'ex-npz-flat') AS flattened;
SELECT pg_temp.same_logits('ex-gpt2', 'ex-npz') AS shaped_same, pg_temp.same_logits('ex-gpt2', 'ex-npz-flat') AS flattened_same;
SELECT pg_llm_import_npz_bytes(pg_llm_export_npz_bytes('ex-gpt2'), 'ex-npz-back') AS params,
       pg_temp.same_logits('ex-gpt2', 'ex-npz-back') AS same_logits;
SELECT pg_llm_export_npz(:'dir' || '/gpt2.npz', 'ex-gpt2') > 0 AS exported_npz;
SELECT pg_llm_import_npz(:'dir' || '/gpt2.npz', 'ex-npz-file') AS params,
       pg_temp.same_logits('ex-gpt2', 'ex-npz-file') AS same_logits;
-- GPT-Neo has no place in a GPT-2 archive; a banded GPT-3 model cannot take one; corrupt bytes
SELECT pg_temp.err($$SELECT pg_llm_export_npz_bytes('ex-neo')$$) AS neo_to_npz,
       pg_temp.err(format('SELECT pg_llm_import_npz_bytes(%L::bytea, %L)', decode(:'npz', 'base64'), 'ex-gpt3-banded')) AS npz_to_banded,
       pg_temp.err($$SELECT pg_llm_import_npz_bytes('\x1f8b0800', 'ex-npz')$$) AS truncated;

-- 4. Bad input: clear errors, no files left behind
SELECT pg_temp.err($$SELECT pg_llm_export_safetensors_bytes('no-such-model')$$) AS unknown_model,
       pg_temp.err($$SELECT pg_llm_export_safetensors_bytes(NULL)$$) AS null_model,
       pg_temp.err($$SELECT pg_llm_export_config('no-such-model')$$) AS unknown_model_config;
SELECT pg_temp.err($$SELECT pg_llm_export_safetensors('relative/dir', 'ex-neo')$$) AS relative_path,
       pg_temp.err(format('SELECT pg_llm_export_safetensors(%L, %L, 0)', :'dir', 'ex-neo')) AS zero_shard_size,
       pg_temp.err(format('SELECT pg_llm_export_safetensors(%L, %L)', :'dir' || '/PG_VERSION_missing/x.safetensors', 'ex-neo')) AS missing_parent,
       pg_temp.err(format('SELECT pg_llm_export_safetensors(%L, %L)', current_setting('data_directory') || '/PG_VERSION', 'ex-neo')) AS file_as_directory;
-- a registered model without parameters
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('ex-empty', 1, 2, 16, 8, 64, 32, 50);
SELECT pg_temp.err($$SELECT pg_llm_export_safetensors_bytes('ex-empty')$$) AS no_parameters;
SELECT count(*) AS temporaries FROM pg_ls_dir(:'dir') f WHERE f LIKE '.%';

-- 5. The path form is restricted like COPY TO a file; the bytes form works for any role with
-- privileges on the model tables
CREATE ROLE llm_export_user;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO llm_export_user;
SET ROLE llm_export_user;
SELECT pg_temp.err($$SELECT pg_llm_export_safetensors('/tmp/pg_llm_export_denied', 'ex-neo')$$) AS path_export;
SELECT pg_temp.err($$SELECT pg_llm_export_npz('/tmp/pg_llm_export_denied.npz', 'ex-gpt2')$$) AS npz_path_export,
       pg_temp.err($$SELECT pg_llm_import_npz('/tmp/pg_llm_export_denied.npz', 'ex-npz')$$) AS npz_path_import;
SELECT length(pg_llm_export_safetensors_bytes('ex-neo')) > 0 AS bytes_export_as_plain_role,
       pg_llm_export_config('ex-neo')->>'model_type' AS config_as_plain_role;
RESET ROLE;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM llm_export_user;
DROP ROLE llm_export_user;

-- 6. Over the wire: a folder export as rows of bounded pieces, and a checkpoint uploaded into
-- large objects: neither function touches a server file (the path form here is only the reference)
SELECT pg_llm_export_safetensors(:'dir', 'ex-neo', 40000) > 0 AS exported_sharded;
-- pieces of at most 3000 bytes (they split the header and tensors), taken in the select list
-- as a client streams them: per file, contiguous from 0, and the path form's bytes exactly
CREATE TEMP TABLE pieces AS
SELECT (p).file, (p).offset, (p).data
  FROM (SELECT pg_llm_export_safetensors_pieces('ex-neo', 40000, 3000) AS p) q;
SELECT file, count(*) AS pieces, max(length(data)) <= 3000 AS bounded,
       min("offset") = 0 AND sum(length(data)) = max("offset" + length(data)) AS contiguous,
       string_agg(data, '' ORDER BY "offset") = pg_read_binary_file(:'dir' || '/' || file) AS same_as_path_form
  FROM pieces GROUP BY file ORDER BY file;
-- one shard by default: model.safetensors is the bytes form's file, config.json its config
SELECT file, count(*) AS pieces,
       CASE file WHEN 'model.safetensors' THEN string_agg(data, '' ORDER BY "offset") = pg_llm_export_safetensors_bytes('ex-opt')
                 WHEN 'config.json' THEN convert_from(string_agg(data, '' ORDER BY "offset"), 'UTF8')::jsonb = pg_llm_export_config('ex-opt')
       END AS same_as_other_forms
  FROM pg_llm_export_safetensors_pieces('ex-opt', piece_bytes => 10007) WHERE file <> 'model.manifest.jsonl'
 GROUP BY file ORDER BY file;
-- upload: one large object per file, written piece by piece (lo_put), then imported with the
-- exported config.json; the manifest among the files is used (checksums verified)
CREATE TEMP TABLE uploaded AS SELECT file, lo_create(0) AS object FROM pieces GROUP BY file;
SELECT count(*) AS pieces_uploaded
  FROM (SELECT lo_put(u.object, p."offset", p.data) FROM pieces p JOIN uploaded u USING (file)) x;
SELECT convert_from(lo_get(object), 'UTF8') AS config FROM uploaded WHERE file = 'config.json' \gset
SELECT pg_llm_import_safetensors_lo(array_agg(object ORDER BY file), array_agg(file ORDER BY file), 'ex-neo-lo', :'config'::jsonb) AS params
  FROM uploaded;
SELECT pg_temp.same_logits('ex-neo', 'ex-neo-lo') AS same_logits;
-- without the manifest the index names the shards; without the index every shard is read
SELECT pg_llm_import_safetensors_lo(array_agg(object), array_agg(file), 'ex-neo-lo-index', :'config'::jsonb) AS params
  FROM uploaded WHERE file <> 'model.manifest.jsonl';
SELECT pg_llm_import_safetensors_lo(array_agg(object), array_agg(file), 'ex-neo-lo-shards', :'config'::jsonb) AS params
  FROM uploaded WHERE file LIKE '%.safetensors';
SELECT pg_temp.same_logits('ex-neo', 'ex-neo-lo-index') AS index_same, pg_temp.same_logits('ex-neo', 'ex-neo-lo-shards') AS shards_same;
-- into a registered model (no config)
SELECT pg_llm_import_safetensors_lo(array_agg(object), array_agg(file), 'ex-neo-lo') AS params FROM uploaded;

-- bad input: clear errors, nothing created
SELECT lo_from_bytea(0, '\x0102') AS junk \gset
SELECT object AS shard1 FROM uploaded WHERE file = 'model-00001-of-00004.safetensors' \gset
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', ARRAY[:shard1, :junk]::oid[], ARRAY['model.safetensors'], 'ex-neo-lo')) AS mismatched,
       pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', ARRAY[:shard1, NULL]::oid[], ARRAY['a.safetensors', 'b.safetensors'], 'ex-neo-lo')) AS null_object,
       pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', ARRAY[:shard1, :junk]::oid[], ARRAY['a.safetensors', 'a.safetensors'], 'ex-neo-lo')) AS same_name_twice;
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors_lo('{}', '{}', 'ex-neo-lo')$$) AS no_files,
       pg_temp.err($$SELECT pg_llm_import_safetensors_lo(NULL, '{a}', 'ex-neo-lo')$$) AS null_objects,
       pg_temp.err($$SELECT pg_llm_import_safetensors_lo('{4294967295}', '{model.safetensors}', 'ex-neo-lo')$$) AS no_such_object;
-- a corrupt file gets the bytes form's error
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', ARRAY[:junk]::oid[], ARRAY['model.safetensors'], 'ex-neo-lo')) AS corrupt,
       pg_temp.err($$SELECT pg_llm_import_safetensors_bytes('\x0102', 'ex-neo-lo')$$) AS corrupt_bytes;
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', ARRAY[:junk]::oid[], ARRAY['config.json'], 'ex-neo-lo')) AS no_checkpoint,
       pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', ARRAY[:shard1]::oid[], ARRAY['model.safetensors'], 'ex-no-such-model')) AS unknown_model;
-- an index or a manifest naming a file that was not uploaded
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', array_agg(object), array_agg(file), 'ex-neo-lo')) AS missing_shard
  FROM uploaded WHERE file NOT IN ('model.manifest.jsonl', 'model-00002-of-00004.safetensors');
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', array_agg(object), array_agg(file), 'ex-neo-lo')) AS manifest_missing_file
  FROM uploaded WHERE file <> 'model-00003-of-00004.safetensors';
-- a manifest whose checksums do not match: refused, the model is not created
SELECT lo_from_bytea(0, convert_to(regexp_replace(convert_from(lo_get(object), 'UTF8'), '"sha256":"[0-9a-f]{64}"',
                                                  '"sha256":"' || repeat('0', 64) || '"', 'g'), 'UTF8')) AS bad_manifest
  FROM uploaded WHERE file = 'model.manifest.jsonl' \gset
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L, %L)',
                          array_agg(CASE file WHEN 'model.manifest.jsonl' THEN :bad_manifest ELSE object END), array_agg(file),
                          'ex-neo-lo-bad', :'config')) AS bad_checksum,
       (SELECT count(*) FROM llm_model_config WHERE model = 'ex-neo-lo-bad') AS created
  FROM uploaded;
SELECT pg_temp.err($$SELECT * FROM pg_llm_export_safetensors_pieces('ex-neo', piece_bytes => 0)$$) AS zero_piece,
       pg_temp.err($$SELECT * FROM pg_llm_export_safetensors_pieces('ex-neo', piece_bytes => 1073741824)$$) AS piece_over_1gb;
SELECT pg_temp.err($$SELECT * FROM pg_llm_export_safetensors_pieces('ex-neo', 0)$$) AS zero_shard_size,
       pg_temp.err($$SELECT * FROM pg_llm_export_safetensors_pieces('no-such-model')$$) AS unknown_model,
       pg_temp.err($$SELECT * FROM pg_llm_export_safetensors_pieces(NULL)$$) AS null_model;
-- the model changes between two pieces (here in the same transaction): the export stops with
-- a serialization failure rather than mix two versions
CREATE FUNCTION pg_temp.touch(m text) RETURNS int LANGUAGE sql AS $$
    UPDATE llm_model_config SET note = coalesce(note, '') || '.' WHERE model = m RETURNING 1
$$;
SELECT regexp_replace(pg_temp.err($$SELECT (p).file, pg_temp.touch('ex-neo-lo') FROM (SELECT pg_llm_export_safetensors_pieces('ex-neo-lo') AS p) q$$),
                      'version \d+, now \d+', 'version V, now W') AS changed_during_export;

-- privileges: large objects are PostgreSQL's own (a role imports only objects it may read,
-- into a model it owns); the pieces export works for any role that may read the model
CREATE ROLE llm_wire_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO llm_wire_user;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO llm_wire_user;
UPDATE llm_model_config SET owner = 'llm_wire_user' WHERE model = 'ex-neo-lo';
SET ROLE llm_wire_user;
SELECT regexp_replace(pg_temp.err(format('SELECT pg_llm_import_safetensors_lo(%L, %L, %L)', ARRAY[:shard1]::oid[], ARRAY['model.safetensors'], 'ex-neo-lo')),
                      'large object \d+', 'large object N') AS not_granted;
SELECT count(*) AS pieces_as_plain_role FROM pg_llm_export_safetensors_pieces('ex-neo', 40000);
RESET ROLE;
DO $$ DECLARE o oid; BEGIN
    FOR o IN SELECT object FROM uploaded LOOP EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO llm_wire_user', o); END LOOP;
END $$;
SELECT array_agg(object) AS objects, array_agg(file) AS files FROM uploaded \gset
SET ROLE llm_wire_user;
SELECT pg_llm_import_safetensors_lo(:'objects', :'files', 'ex-neo-lo') AS params_granted;
RESET ROLE;
DO $$ DECLARE o oid; BEGIN
    FOR o IN SELECT object FROM uploaded LOOP EXECUTE format('REVOKE ALL ON LARGE OBJECT %s FROM llm_wire_user', o); END LOOP;
END $$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM llm_wire_user;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM llm_wire_user;
DROP ROLE llm_wire_user;
SELECT count(lo_unlink(object)) AS unlinked FROM uploaded;
SELECT lo_unlink(:junk) + lo_unlink(:bad_manifest) AS unlinked;

-- Later tests list the registry: remove this test's models.
DELETE FROM llm_model_config WHERE model LIKE 'ex-%';
