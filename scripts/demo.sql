-- pg_gpt3 demo: what the extension does so far.
\pset footer off
CREATE EXTENSION pg_llm;

\echo '--- The GPT-3 family in the model registry'
SELECT model, n_layer, n_head, d_model, d_head, n_positions, vocab, attention_pattern, local_window
  FROM llm_model_config ORDER BY d_model * n_layer;

\echo '--- Tensors are little-endian float32 bytea; a 2x3 times 3x2 product'
SELECT pg_llm_to_array(pg_llm_matmul(pg_llm_from_array('{1,2,3,4,5,6}'),
                                     pg_llm_from_array('{1,0,0,1,1,1}'), 2, 3, 2)) AS product;

\echo '--- A GPT-3 Small sized product (512x768 . 768x3072) on the native kernel'
\timing on
SELECT length(pg_llm_matmul(pg_llm_from_array(array_fill(0.01::float4, ARRAY[512*768])),
                            pg_llm_from_array(array_fill(0.02::float4, ARRAY[768*3072])),
                            512, 768, 3072)) / 4 AS result_values;
\timing off

\echo '--- Causal attention over a 2048-token context (GPT-3 n_ctx), 4 heads of 16'
SELECT length(pg_llm_attention(
         pg_llm_from_array(array_fill(0.1::float4, ARRAY[2048*64])),
         pg_llm_from_array(array_fill(0.01::float4, ARRAY[64*192])),
         pg_llm_zeros_like(pg_llm_from_array(array_fill(0::float4, ARRAY[192]))),
         pg_llm_from_array(array_fill(0.01::float4, ARRAY[64*64])),
         pg_llm_zeros_like(pg_llm_from_array(array_fill(0::float4, ARRAY[64]))),
         4, 2048, 64)) / 4 AS attention_values;

\echo '--- One AdamW step on the GPT-3 schedule (step 100 of 1000, warmup 10)'
SELECT pg_llm_lr_schedule(100, 10, 1000, 6e-4) AS lr,
       pg_llm_to_array((s).weight) AS weight, pg_llm_to_array((s).m) AS m
  FROM (SELECT pg_llm_adamw_step(pg_llm_from_array('{0.5,-0.5}'), pg_llm_from_array('{0.1,-0.2}'),
                                 pg_llm_zeros_like(pg_llm_from_array('{0,0}')),
                                 pg_llm_zeros_like(pg_llm_from_array('{0,0}')),
                                 pg_llm_lr_schedule(100, 10, 1000, 6e-4), 0.9, 0.95, 1e-8, 0.1, 1) AS s) q;

\echo '--- Sampling: greedy, then seeded top-k/top-p draws'
SELECT pg_llm_sample(pg_llm_from_array('{0.1,2.5,0.3,1.9}'), 0, 0, 1) AS greedy,
       array(SELECT pg_llm_sample(pg_llm_from_array('{0.1,2.5,0.3,1.9}'), 1.0, 3, 0.95, seed)
               FROM generate_series(1, 8) seed) AS seeded_draws;

\echo '--- The real GPT-2/GPT-3 tokenizer (r50k_base, 50257 tokens), read by psql from the repository'
\set vocab `cat tests/fixtures/tokenizer/encoder.json`
\set merges `cat tests/fixtures/tokenizer/vocab.bpe`
SELECT llm_load_tokenizer('gpt3-125m', :'vocab', :'merges') AS vocab_size;
SELECT llm_encode('PostgreSQL meets GPT-3.<|endoftext|>') AS ids,
       llm_decode(llm_encode('PostgreSQL meets GPT-3.<|endoftext|>')) AS round_trip;

\echo '--- gpt3-125m from scratch: GPT-3 initialisation of all 125M parameters, stored as rows'
\timing on
SELECT llm_init_params('gpt3-125m', 42) AS parameters;
SELECT count(*) AS tensors, pg_size_pretty(sum(length(data))) AS size FROM llm_param WHERE model = 'gpt3-125m';

\echo '--- Generation in the server (an untrained model babbles; the machinery is real)'
SELECT llm_generate('The database of the future', 16, 0.8, 50, 0.95, 'gpt3-125m', 50256, 7) AS continuation;
SELECT step, token_id, token, is_complete FROM llm_generate_stream('Once upon a time', 5, 0);
SELECT rank, round(score::numeric, 3) AS score, token_ids FROM llm_beam_search('Hello', 3, 4);
\timing off

\echo '--- Training in the server: a small GPT learns a committed corpus from scratch'
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, note)
VALUES ('demo-tiny', 2, 4, 64, 16, 256, 64, 50257, 'pg_gpt3 demo: a tiny GPT-3 style model');
SELECT llm_init_params('demo-tiny', 1) AS parameters;
SELECT llm_load_tokenizer('demo-tiny', :'vocab', :'merges') AS vocab_size;
\set corpus `cat tests/fixtures/learning/corpus.txt`
SELECT llm_dataset_from_text('demo-tiny', :'corpus', 32) AS train_rows;
SELECT llm_dataset_from_text('demo-tiny', 'The library opens at nine in the morning.', 32, NULL, 'validation') AS validation_rows;
SELECT round(loss::numeric, 3) AS loss_before FROM llm_eval('demo-tiny');
\timing on
SELECT step, round(loss::numeric, 3) AS loss, round(lr::numeric, 5) AS lr, round(grad_norm::numeric, 2) AS grad_norm
  FROM llm_train('demo-tiny', 60, batch_size => 4, lr_max => 3e-3, warmup => 5, seed => 1)
 WHERE step % 10 = 0 OR step = 1;
\timing off
SELECT round(loss::numeric, 3) AS loss_after, round(perplexity::numeric, 1) AS perplexity FROM llm_eval('demo-tiny');
SELECT llm_checkpoint_save('demo-tiny', 'after 60 steps') AS checkpoint;
SELECT id, model, note, step, n_params FROM llm_checkpoint;
SELECT llm_generate('The library', 16, 0.7, 20, 0.95, 'demo-tiny', 50256, 3) AS sampled_continuation;

\echo '--- Bad input is a clean SQL error, not a crash'
\set ON_ERROR_STOP 0
SELECT pg_llm_matmul(pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{1,2}'), 2, 2, 1);
\set ON_ERROR_STOP 1
SELECT 'backend still alive' AS status;
