-- Serving a model in half precision (issue 23 point 2): llm_set_weight_dtype rounds the stored
-- matrices and the weight file holds them in bfloat16 / float16, vectors in float32; the
-- kernels widen them exactly and accumulate in float32. So the half-precision model computes
-- what the float32 model of the rounded values computes (to summation order), in half the
-- memory, and training and losses work on the float32 values in llm_param.
\pset footer off
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
CREATE FUNCTION pg_temp.max_diff(a bytea, b bytea) RETURNS float8 LANGUAGE sql AS $$
    SELECT max(abs(x - y)) FROM unnest(pg_llm_to_array(a), pg_llm_to_array(b)) AS t(x, y)
$$;

INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('hp-tiny', 2, 2, 32, 16, 128, 32, 96), ('hp-f16', 2, 2, 32, 16, 128, 32, 96);
SELECT llm_init_params('hp-tiny', 11) AS params, llm_init_params('hp-f16', 11) AS params_f16;
SELECT weight_dtype FROM llm_model_config WHERE model = 'hp-tiny';

CREATE TEMP TABLE seen (what text PRIMARY KEY, logits bytea, ids int[], bytes bigint, loss real);
INSERT INTO seen
SELECT 'float32', llm_logits('{5,17,3,88,42,9,60}', 'hp-tiny'),
       llm_generate_ids('{5,17,3}', 12, 0, 50, 1, 'hp-tiny', NULL),
       (SELECT bytes FROM llm_loaded_models() WHERE model = 'hp-tiny'),
       llm_loss('hp-tiny', '{5,17,3,88,42,9}', '{17,3,88,42,9,60}');

-- Converting rounds the matrices (most of their values change), not the vectors.
SELECT llm_set_weight_dtype('hp-tiny', 'bfloat16') > 1000 AS rounded_many;
SELECT weight_dtype FROM llm_model_config WHERE model = 'hp-tiny';
INSERT INTO seen
SELECT 'bfloat16', llm_logits('{5,17,3,88,42,9,60}', 'hp-tiny'),
       llm_generate_ids('{5,17,3}', 12, 0, 50, 1, 'hp-tiny', NULL),
       (SELECT bytes FROM llm_loaded_models() WHERE model = 'hp-tiny'),
       llm_loss('hp-tiny', '{5,17,3,88,42,9}', '{17,3,88,42,9,60}');
-- Served from a bfloat16 weight file: the backend holds half the bytes.
SELECT weight_file, round((SELECT bytes FROM seen WHERE what = 'float32')::numeric / bytes, 1) AS bytes_ratio
  FROM llm_loaded_models() WHERE model = 'hp-tiny';
-- Stored values are bfloat16 values: converting again changes nothing; float32 keeps them.
SELECT llm_set_weight_dtype('hp-tiny', 'bfloat16') AS again,
       llm_set_weight_dtype('hp-tiny', 'float32') AS to_float32;
INSERT INTO seen
SELECT 'float32 of the rounded values', llm_logits('{5,17,3,88,42,9,60}', 'hp-tiny'),
       llm_generate_ids('{5,17,3}', 12, 0, 50, 1, 'hp-tiny', NULL),
       (SELECT bytes FROM llm_loaded_models() WHERE model = 'hp-tiny'),
       llm_loss('hp-tiny', '{5,17,3,88,42,9}', '{17,3,88,42,9,60}');
-- The rounding moves the logits a little; the bfloat16 model computes what float32 computes
-- from the same values (float32 accumulation: only the order of the sums differs), greedy
-- tokens included; the loss runs on the float32 values in llm_param.
SELECT pg_temp.max_diff(r.logits, f.logits) BETWEEN 1e-5 AND 0.05 AS rounding_moves_logits,
       pg_temp.max_diff(r.logits, h.logits) < 1e-5 AS bf16_equals_float32_of_rounded,
       h.ids = r.ids AS same_greedy_tokens,
       h.loss = r.loss AS same_loss,
       r.bytes = f.bytes AS float32_bytes_back
  FROM seen f, seen h, seen r
 WHERE f.what = 'float32' AND h.what = 'bfloat16' AND r.what = 'float32 of the rounded values';

-- float16 likewise, on a twin of the original model.
SELECT llm_set_weight_dtype('hp-f16', 'float16') > 1000 AS rounded_many;
SELECT pg_temp.max_diff(llm_logits('{5,17,3,88,42,9,60}', 'hp-f16'), f.logits) BETWEEN 1e-7 AND 0.01 AS f16_close,
       (SELECT bytes FROM llm_loaded_models() WHERE model = 'hp-f16') * 2 < f.bytes * 1.2 AS f16_half_bytes
  FROM seen f WHERE f.what = 'float32';

-- A training step on a half-precision model updates the float32 master values; the served
-- copy is rounded from them.
SELECT llm_set_weight_dtype('hp-tiny', 'bfloat16') AS no_change;
SELECT llm_train_step('hp-tiny', '{5,17,3,88,42,9}', '{17,3,88,42,9,60}', 1e-2) > 0 AS trained;
SELECT weight_dtype,
       (SELECT weight_file FROM llm_loaded_models() WHERE model = 'hp-tiny') AS weight_file
  FROM llm_model_config WHERE model = 'hp-tiny';
SELECT pg_temp.max_diff(llm_logits('{5,17,3,88,42,9,60}', 'hp-tiny'), r.logits) > 0 AS logits_moved
  FROM seen r WHERE r.what = 'float32 of the rounded values';

-- Refusals.
SELECT pg_temp.err($$SELECT llm_set_weight_dtype('hp-tiny', 'int8')$$) AS unknown_dtype;
SELECT pg_temp.err($$SELECT llm_set_weight_dtype('hp-tiny', NULL)$$) AS null_dtype;
SELECT pg_temp.err($$SELECT llm_set_weight_dtype('no-such-model', 'bfloat16')$$) AS unknown_model;
SELECT pg_temp.err($$UPDATE llm_model_config SET weight_dtype = 'float8' WHERE model = 'hp-tiny'$$) AS bad_column;
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('hp-empty', 1, 2, 32, 16, 128, 32, 96);
SELECT pg_temp.err($$SELECT llm_set_weight_dtype('hp-empty', 'bfloat16')$$) AS no_parameters;

-- Importing a bfloat16 checkpoint (the GPT-2 fixture saved by transformers in bfloat16) with
-- keep_dtype serves it in bfloat16 from the start; without, in float32 (the same values).
\getenv srcdir PG_ABS_SRCDIR
\set fixtures :srcdir/fixtures
\set cfg `cat :fixtures/models/gpt2_bf16/config.json`
\set st `base64 -w0 :fixtures/models/gpt2_bf16/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'hp-kept', :'cfg'::jsonb, keep_dtype => true) AS kept,
       pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'hp-widened', :'cfg'::jsonb) AS widened;
SELECT model, weight_dtype FROM llm_model_config WHERE model IN ('hp-kept', 'hp-widened') ORDER BY model;
SELECT pg_temp.max_diff(llm_logits('{5,17,3,88,42,9,60}', 'hp-kept'), llm_logits('{5,17,3,88,42,9,60}', 'hp-widened')) < 1e-5 AS kept_equals_widened,
       llm_generate_ids('{5,17,3}', 12, 0, 50, 1, 'hp-kept', NULL) = llm_generate_ids('{5,17,3}', 12, 0, 50, 1, 'hp-widened', NULL) AS same_greedy_tokens;
SELECT (SELECT bytes FROM llm_loaded_models() WHERE model = 'hp-widened')::numeric
       / (SELECT bytes FROM llm_loaded_models() WHERE model = 'hp-kept') > 1.5 AS kept_holds_fewer_bytes;
-- A float32 checkpoint with keep_dtype stays float32.
\set cfg `cat :fixtures/models/gpt2/config.json`
\set st `base64 -w0 :fixtures/models/gpt2/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'hp-fp32', :'cfg'::jsonb, keep_dtype => true) AS fp32;
SELECT weight_dtype FROM llm_model_config WHERE model = 'hp-fp32';
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors_bytes(decode('00', 'hex'), 'hp-fp32', NULL, keep_dtype => NULL)$$) AS null_keep;

DELETE FROM llm_model_config WHERE model IN ('hp-tiny', 'hp-f16', 'hp-kept', 'hp-widened', 'hp-fp32', 'hp-empty');
