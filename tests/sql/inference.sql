-- Inference: the real GPT-2/3 tokenizer, Hugging Face checkpoint import for every supported
-- family, logits and greedy generations against transformers' numbers, sampling, streaming,
-- beam search, and the errors of each. Fixtures are read on the client side by psql.
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

-- 1. Tokenizer: the real 50257-token vocabulary (encoder.json + vocab.bpe)
\set vocab `cat :fixtures/tokenizer/encoder.json`
\set merges `cat :fixtures/tokenizer/vocab.bpe`
SELECT llm_load_tokenizer('gpt3-125m', :'vocab', :'merges') AS vocab_size;
SELECT llm_encode('Hello, world! GPT-3 has 175B parameters.') AS ids;
SELECT llm_encode('Document one.<|endoftext|>Document two.') AS eot_is_one_token;
SELECT llm_decode(llm_encode('  spaces,\ttabs,\nnewlines, émoji 😀 and 日本語')) AS round_trip;
SELECT llm_decode(ARRAY[262, 262, 262]) AS repeated_ids_decode_repeatedly;
SELECT llm_decode('{}') AS empty;
-- the same files for another model are stored once and shared
SELECT llm_load_tokenizer('gpt2-small', :'vocab', :'merges') AS vocab_size;
SELECT count(*) AS stored_tokenizers FROM llm_tokenizer;
SELECT count(*) AS vocab_rows FROM llm_bpe_vocab WHERE model = 'gpt3-125m';
-- GPT-2's vocab.bpe has real merges that begin with '#'; they are kept
SELECT rank, "left", "right" FROM llm_bpe_merges WHERE model = 'gpt3-125m' AND "left" LIKE '#%' ORDER BY rank LIMIT 3;

-- 2. Import the Hugging Face fixtures (bytes form, with config.json) and compare with the
-- logits and greedy ids transformers produced for them
CREATE TEMP TABLE fixture (family text, model text, cfg jsonb, st bytea, expected jsonb);
\set cfg `cat :fixtures/models/gpt2/config.json`
\set st `base64 -w0 :fixtures/models/gpt2/model.safetensors`
\set exp `cat :fixtures/models/gpt2/expected.json`
INSERT INTO fixture VALUES ('gpt2', 'fx-gpt2', :'cfg', decode(:'st', 'base64'), :'exp');
\set cfg `cat :fixtures/models/cerebras/config.json`
\set st `base64 -w0 :fixtures/models/cerebras/model.safetensors`
\set exp `cat :fixtures/models/cerebras/expected.json`
INSERT INTO fixture VALUES ('cerebras', 'fx-cerebras', :'cfg', decode(:'st', 'base64'), :'exp');
\set cfg `cat :fixtures/models/opt/config.json`
\set st `base64 -w0 :fixtures/models/opt/model.safetensors`
\set exp `cat :fixtures/models/opt/expected.json`
INSERT INTO fixture VALUES ('opt', 'fx-opt', :'cfg', decode(:'st', 'base64'), :'exp');
\set cfg `cat :fixtures/models/opt_post_ln/config.json`
\set st `base64 -w0 :fixtures/models/opt_post_ln/model.safetensors`
\set exp `cat :fixtures/models/opt_post_ln/expected.json`
INSERT INTO fixture VALUES ('opt_post_ln', 'fx-opt-post-ln', :'cfg', decode(:'st', 'base64'), :'exp');
\set cfg `cat :fixtures/models/gpt_neo/config.json`
\set st `base64 -w0 :fixtures/models/gpt_neo/model.safetensors`
\set exp `cat :fixtures/models/gpt_neo/expected.json`
INSERT INTO fixture VALUES ('gpt_neo', 'fx-gpt-neo', :'cfg', decode(:'st', 'base64'), :'exp');

SELECT family, pg_llm_import_safetensors_bytes(st, model, cfg) AS params FROM fixture ORDER BY family;
SELECT model, family, n_layer, d_model, n_head, d_ff, activation, attention_pattern, local_window, scale_attn,
       position_offset, qkv_bias, ln_placement, d_embed
  FROM llm_model_config WHERE model LIKE 'fx-%' ORDER BY model;

-- logits for all 12 prompt positions within 1e-4 of transformers
SELECT f.family,
       (SELECT max(abs(got - want::float4))
          FROM unnest(pg_llm_to_array(llm_logits(array(SELECT jsonb_array_elements_text(f.expected -> 'input_ids')::int),
                                                 f.model)),
                      array(SELECT jsonb_array_elements_text(f.expected -> 'logits'))) AS u(got, want)) < 1e-4
         AS logits_match
  FROM fixture f ORDER BY f.family;

-- greedy generation (KV cache, 20 tokens, no EOS stop) identical to transformers
SELECT f.family,
       llm_generate_ids(array(SELECT jsonb_array_elements_text(f.expected -> 'input_ids')::int),
                        20, 0, 0, 1, f.model, NULL)
         = array(SELECT jsonb_array_elements_text(f.expected -> 'greedy_ids')::int) AS greedy_matches
  FROM fixture f ORDER BY f.family;

-- importing again replaces the weights (all or nothing); a checkpoint that does not match is refused
SELECT pg_llm_import_safetensors_bytes(st, model) AS reimported FROM fixture WHERE family = 'gpt2';
SELECT label, pg_temp.err(q) AS outcome FROM (VALUES
  ('wrong family',      format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L)', (SELECT st FROM fixture WHERE family = 'opt'), 'fx-gpt2')),
  ('config mismatch',   format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L, %L::jsonb)', (SELECT st FROM fixture WHERE family = 'gpt2'), 'fx-opt', (SELECT cfg FROM fixture WHERE family = 'gpt2'))),
  ('corrupt file',      $$SELECT pg_llm_import_safetensors_bytes('\x0102030405'::bytea, 'fx-gpt2')$$),
  ('unknown model',     $$SELECT pg_llm_import_safetensors_bytes('\x00'::bytea, 'no-such-model')$$),
  ('unsupported type',  $$SELECT pg_llm_import_safetensors_bytes('\x00'::bytea, 'x', '{"model_type": "llama"}')$$),
  ('empty model name',  format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L, %L::jsonb)', (SELECT st FROM fixture WHERE family = 'gpt2'), '', (SELECT cfg FROM fixture WHERE family = 'gpt2')))
) AS cases(label, q);
-- a header that names a tensor twice is ambiguous (JSON parsers keep the last): refused
WITH h(j) AS (VALUES ('{"wte.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"wte.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'))
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors_bytes(%L::bytea, %L)',
         decode(lpad(to_hex(length(j)), 2, '0') || '00000000000000', 'hex') || convert_to(j, 'UTF8') || '\x0000c03f'::bytea,
         'fx-gpt2')) AS tensor_named_twice
  FROM h;
-- the registry refuses an empty name too
SELECT pg_temp.err($$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
                     VALUES ('', 1, 1, 8, 8, 8, 8, 8)$$) AS empty_name_row;
-- the refused imports left the model as it was
SELECT family, (SELECT count(*) FROM llm_param p WHERE p.model = f.model) AS tensors FROM fixture f WHERE family = 'gpt2';

-- 3. Server-file forms are restricted like COPY FROM a file
CREATE ROLE llm_regress_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO llm_regress_user;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO llm_regress_user;
GRANT SELECT ON fixture TO llm_regress_user;
UPDATE llm_model_config SET owner = 'llm_regress_user' WHERE model = 'fx-gpt-neo';
SET ROLE llm_regress_user;
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors('/tmp/model.safetensors', 'fx-gpt2')$$) AS path_import;
SELECT pg_temp.err($$SELECT pg_llm_load_bpe_vocab('/tmp/encoder.json', 'gpt3-125m')$$) AS path_vocab;
-- the bytes form works for any role with table privileges that owns the model
SELECT pg_llm_import_safetensors_bytes(st, model) AS bytes_import_as_plain_role FROM fixture WHERE family = 'gpt_neo';
RESET ROLE;
UPDATE llm_model_config SET owner = current_user WHERE model = 'fx-gpt-neo';
REVOKE ALL ON fixture FROM llm_regress_user;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM llm_regress_user;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM llm_regress_user;
DROP ROLE llm_regress_user;

-- 4. Generation with the real tokenizer on a small GPT-3-family model initialised in place
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab,
                              attention_pattern, local_window)
VALUES ('gpt3-tiny', 2, 2, 32, 16, 128, 64, 50257, '{dense,local}', 8);
SELECT llm_init_params('gpt3-tiny', 1) AS params;
SELECT llm_load_tokenizer('gpt3-tiny', :'vocab', :'merges') AS vocab_size;
SELECT length(llm_logits(llm_encode('Hello world'), 'gpt3-tiny')) / 4 / 50257 AS logit_rows;
-- eos_token NULL: exactly max_tokens tokens
SELECT cardinality(llm_generate_ids(llm_encode('Hello'), 17, 1.0, 50, 0.95, 'gpt3-tiny', NULL, 3)) AS n_ids;
-- a seed reproduces sampling; greedy is deterministic
SELECT llm_generate('Once upon a time', 12, 0.9, 40, 0.9, 'gpt3-tiny', NULL, 7)
     = llm_generate('Once upon a time', 12, 0.9, 40, 0.9, 'gpt3-tiny', NULL, 7) AS seeded_reproducible,
       llm_generate('Once upon a time', 12, 0, 50, 0.95, 'gpt3-tiny')
     = llm_generate('Once upon a time', 12, 0, 50, 0.95, 'gpt3-tiny') AS greedy_deterministic;
-- streaming: one row per token, complete on the last, and the same text as llm_generate
SELECT count(*) AS rows, bool_and(is_complete = (step = 6)) AS complete_only_last,
       max(step) AS last_step
  FROM llm_generate_stream('Once upon a time', 6, 0, 50, 0.95, 'gpt3-tiny', NULL);
SELECT (SELECT text FROM llm_generate_stream('Once upon a time', 6, 0, 50, 0.95, 'gpt3-tiny', NULL) WHERE is_complete)
     = llm_generate('Once upon a time', 6, 0, 50, 0.95, 'gpt3-tiny', NULL) AS stream_text_matches;
-- in the select list the rows are produced one at a time (they stream to the client)
SELECT (s).step, (s).is_complete
  FROM (SELECT llm_generate_stream('Hi', 3, 0, 50, 0.95, 'gpt3-tiny', NULL) AS s) q;
-- beam search: ranked, best first; a beam of one is greedy
SELECT count(*) AS beams, bool_and(rank BETWEEN 1 AND 3) AS ranks_ok
  FROM llm_beam_search('Once upon a time', 3, 5, 'gpt3-tiny');
SELECT bool_and(score >= next_score) AS sorted
  FROM (SELECT score, lead(score, 1, '-infinity') OVER (ORDER BY rank) AS next_score
          FROM llm_beam_search('Once upon a time', 4, 5, 'gpt3-tiny')) s;
SELECT (SELECT token_ids FROM llm_beam_search('Once upon a time', 1, 5, 'gpt3-tiny'))
     = llm_generate_ids(llm_encode('Once upon a time'), 5, 0, 50, 0.95, 'gpt3-tiny', 50256) AS beam1_is_greedy;
SELECT pg_llm_sample(llm_logits(llm_encode('Hello'), 'gpt3-tiny'), 0, 0, 1, NULL, 50257)
     = (llm_generate_ids(llm_encode('Hello'), 1, 0, 50, 0.95, 'gpt3-tiny'))[1] AS sample_last_row_is_next_token;

-- 5. Bad requests
SELECT label, pg_temp.err(q) AS outcome FROM (VALUES
  ('unknown model',        $$SELECT llm_logits(ARRAY[1, 2], 'gpt3-9000b')$$),
  ('no parameters yet',    $$SELECT llm_logits(ARRAY[1, 2], 'gpt3-350m')$$),
  ('no tokenizer',         $$SELECT llm_encode('hi', 'fx-gpt2')$$),
  ('token beyond vocab',   $$SELECT llm_logits(ARRAY[1, 384], 'fx-gpt2')$$),
  ('negative token',       $$SELECT llm_logits(ARRAY[1, -2], 'fx-gpt2')$$),
  ('NULL token',           $$SELECT llm_logits(ARRAY[1, NULL], 'fx-gpt2')$$),
  ('empty ids',            $$SELECT llm_logits('{}', 'fx-gpt2')$$),
  ('longer than context',  $$SELECT llm_logits(array_fill(1, ARRAY[65]), 'fx-gpt2')$$),
  ('prompt + max_tokens',  $$SELECT llm_generate_ids(array_fill(1, ARRAY[60]), 10, 0, 0, 1, 'fx-gpt2')$$),
  ('negative max_tokens',  $$SELECT llm_generate('hi', -1, 0, 50, 0.95, 'gpt3-tiny')$$),
  ('bad temperature',      $$SELECT llm_generate('hi', 4, -1, 50, 0.95, 'gpt3-tiny')$$),
  ('bad topp',             $$SELECT llm_generate('hi', 4, 1, 50, 0, 'gpt3-tiny')$$),
  ('empty prompt',         $$SELECT llm_generate('', 4, 0, 50, 0.95, 'gpt3-tiny')$$),
  ('beam width 0',         $$SELECT * FROM llm_beam_search('hi', 0, 4, 'gpt3-tiny')$$),
  ('decode beyond vocab',  $$SELECT llm_decode(ARRAY[50257])$$),
  ('bad merges',           $$SELECT llm_load_tokenizer('gpt3-tiny', '{"a": 0}', 'a b c')$$),
  ('bad vocab',            $$SELECT llm_load_tokenizer('gpt3-tiny', 'not json', 'a b')$$)
) AS cases(label, q);

-- 6. Long generation honours statement_timeout (and query cancel) and leaves the session usable
\set VERBOSITY terse
SET statement_timeout = '200ms';
SELECT count(llm_generate_ids(ARRAY[1], 63, 0, 0, 1, 'gpt3-tiny', NULL)) FROM generate_series(1, 100000);
RESET statement_timeout;
\set VERBOSITY default
SELECT cardinality(llm_generate_ids(ARRAY[1], 3, 0, 0, 1, 'gpt3-tiny', NULL)) AS still_works;

-- Leave the database as the other tests expect it
DELETE FROM llm_model_config WHERE model LIKE 'fx-%' OR model = 'gpt3-tiny';
DELETE FROM llm_model_tokenizer;
DELETE FROM llm_tokenizer;

-- 7. Sharded checkpoints through the path form (model.safetensors.index.json + shards; the
-- server reads the files, so this part needs the server on this machine, as in CI)
\set sharded :fixtures/models/gpt2_sharded
\set cfg `cat :fixtures/models/gpt2/config.json`
SELECT pg_llm_import_safetensors(:'sharded', 'fx-sharded', :'cfg') AS params_from_directory;
SELECT pg_llm_import_safetensors(:'sharded' || '/model.safetensors.index.json', 'fx-sharded') AS params_from_index;
SELECT pg_temp.err(format('SELECT pg_llm_import_safetensors(%L, %L)', :'sharded' || '/model-00001-of-00002.safetensors', 'fx-sharded')) AS one_shard_alone;
SELECT (SELECT llm_logits(ARRAY[5, 6, 7], 'fx-sharded')) = (SELECT llm_logits(ARRAY[5, 6, 7], 'fx-gpt2-again')) AS same_logits
  FROM (SELECT pg_llm_import_safetensors(:'fixtures' || '/models/gpt2/model.safetensors', 'fx-gpt2-again', :'cfg')) x;
SELECT regexp_replace(pg_temp.err(format('SELECT pg_llm_import_safetensors(%L, %L)', :'sharded' || '/missing.safetensors', 'fx-sharded')),
                      '"[^"]*/', '".../') AS missing_file;
-- only regular files are read: a named pipe is refused before opening it could block, and
-- devices and directories are refused too
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/pg_gpt3_regress_fifo && mkfifo /tmp/pg_gpt3_regress_fifo';
SELECT label, pg_temp.err(q) AS outcome FROM (VALUES
  ('named pipe',          $$SELECT pg_llm_import_safetensors('/tmp/pg_gpt3_regress_fifo', 'fx-sharded')$$),
  ('named pipe as vocab', $$SELECT pg_llm_load_bpe_vocab('/tmp/pg_gpt3_regress_fifo', 'gpt3-125m')$$),
  ('device',              $$SELECT pg_llm_import_safetensors('/dev/zero', 'fx-sharded')$$),
  ('directory as merges', $$SELECT pg_llm_load_bpe_merges('/tmp', 'gpt3-125m')$$)
) AS cases(label, q);
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/pg_gpt3_regress_fifo';
DELETE FROM llm_model_config WHERE model IN ('fx-sharded', 'fx-gpt2-again');
