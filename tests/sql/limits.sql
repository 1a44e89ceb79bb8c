-- Resource limits. Work whose memory need exceeds pg_llm.max_memory is refused before it
-- allocates anything, with SQLSTATE 53200 and needed vs allowed bytes; the backend, its
-- session and the models are untouched. Ordinary roles cannot raise the limits.
\pset footer off
\pset format unaligned
\pset fieldsep ' | '
-- Messages whose working-memory figure depends on the compute threads show their SQLSTATE only.
CREATE FUNCTION pg_temp.err(q text, whole bool DEFAULT true) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN CASE WHEN whole THEN SQLSTATE || ': ' || SQLERRM ELSE SQLSTATE END;
END $$;

-- A 6.7B model cannot be created under an 8 GB limit: refused at once, nothing written.
SET pg_llm.max_memory = '8GB';
SELECT pg_temp.err($$SELECT llm_init_params('gpt3-6.7b', 1)$$);
-- Nor imported (an empty checkpoint: the limit is checked before its tensors).
SELECT pg_temp.err($$SELECT pg_llm_import_safetensors_bytes('\x02000000000000007b7d'::bytea, 'gpt3-13b')$$);
SELECT count(*) AS rows_of_refused_models FROM llm_param WHERE model IN ('gpt3-6.7b', 'gpt3-13b');

-- A small model with GPT-3's vocabulary and context (about 14 MB of weights).
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('limits-test', 2, 2, 64, 32, 256, 2048, 50257);
SELECT llm_init_params('limits-test', 7);
CREATE TEMP TABLE before AS
SELECT md5(string_agg(data::text, '' ORDER BY name, chunk)) AS digest FROM llm_param WHERE model = 'limits-test';

SET pg_llm.max_memory = '256MB';
-- 2048 positions of logits are 412 MB: refused; 4 positions fit.
SELECT pg_temp.err($$SELECT llm_logits(array(SELECT (i % 50257)::int FROM generate_series(1, 2048) i), 'limits-test')$$, false) AS long_logits;
SELECT length(llm_logits('{464, 3290, 318, 257}', 'limits-test')) AS short_logits_bytes;
-- A training batch of 16 × 2048 tokens needs GBs of logits and activations: refused; one
-- sequence of 16 tokens trains.
SELECT pg_temp.err($$SELECT llm_train_step('limits-test', array_fill(1, ARRAY[16, 2048]), array_fill(2, ARRAY[16, 2048]), 1e-3)$$, false) AS big_batch;
SELECT digest = (SELECT md5(string_agg(data::text, '' ORDER BY name, chunk)) FROM llm_param WHERE model = 'limits-test') AS weights_untouched
  FROM before;
SELECT llm_train_step('limits-test', array_fill(1, ARRAY[1, 16]), array_fill(2, ARRAY[1, 16]), 1e-3) > 0 AS small_batch_trains;
-- Micro-batches bring a batch within the limit (the update is the whole batch's).
SELECT pg_temp.err($$SELECT llm_train_step('limits-test', array_fill(1, ARRAY[8, 256]), array_fill(2, ARRAY[8, 256]), 1e-3)$$, false) AS batch_8x256;
SET pg_llm.train_micro_batch = 1;
SELECT llm_train_step('limits-test', array_fill(1, ARRAY[8, 256]), array_fill(2, ARRAY[8, 256]), 1e-3) > 0 AS batch_8x256_in_micro_batches;
RESET pg_llm.train_micro_batch;
-- Generation fits.
SELECT cardinality(llm_generate_ids('{464, 3290}', 16, 0.0, 0, 1.0, 'limits-test', -1, 0)) AS generated;
RESET pg_llm.max_memory;

-- Ordinary roles may lower pg_llm.threads but not raise the caps.
CREATE ROLE regress_llm_limits;
SET ROLE regress_llm_limits;
SELECT pg_temp.err($$SET pg_llm.max_memory = '1TB'$$) AS raise_memory;
SELECT pg_temp.err($$SET pg_llm.max_threads = 256$$) AS raise_threads;
SELECT pg_temp.err($$SET pg_llm.threads = 1$$) AS set_threads;
RESET ROLE;
DROP ROLE regress_llm_limits;

DELETE FROM llm_model_config WHERE model = 'limits-test';
SELECT 'the backend is alive' AS status;
