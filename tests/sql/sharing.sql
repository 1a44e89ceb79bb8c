-- Parameter sharing (llm_share_param / llm_unshare_param, pg_gpt2's names): a target model
-- reads a source model's tensor, stored once; the native path honours it (logits, generation,
-- the weight cache, training, export, checkpoints) and so does the relational path.
\pset footer off
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
CREATE FUNCTION pg_temp.same(a bytea, b bytea) RETURNS boolean LANGUAGE sql AS $$
    SELECT max(abs(x::float8 - y)) < 1e-6 FROM unnest(pg_llm_to_array(a), pg_llm_to_array(b)) u(x, y) $$;
CREATE FUNCTION pg_temp.tensor(of_model text, of_name text) RETURNS bytea LANGUAGE sql AS $$
    SELECT string_agg(data, ''::bytea ORDER BY chunk) FROM llm_param_resolved WHERE model = of_model AND name = of_name $$;

-- source 'sh-a', target 'sh-b', and 'sh-c': what sh-b should read (its own weights with
-- sh-a's token embedding copied in), to compare with
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('sh-a', 2, 2, 16, 8, 32, 16, 64), ('sh-b', 2, 2, 16, 8, 32, 16, 64), ('sh-c', 2, 2, 16, 8, 32, 16, 64);
SELECT llm_init_params('sh-a', 1) AS a, llm_init_params('sh-b', 2) AS b, llm_init_params('sh-c', 2) AS c;
UPDATE llm_param SET data = pg_temp.tensor('sh-a', 'wte.weight') WHERE model = 'sh-c' AND name = 'wte.weight';
CREATE TEMP TABLE before AS SELECT llm_logits('{1,2,3,4,5}', 'sh-b') AS logits;  -- cached in this backend

-- 1. Share: sh-b's token embedding (and tied head) is sh-a's, stored once
SELECT llm_share_param('sh-a', 'wte.weight', 'sh-b');
SELECT model, name, source_model, source_name FROM llm_param_share;
SELECT count(*) AS own_rows_of_b_wte FROM llm_param WHERE model = 'sh-b' AND name = 'wte.weight';
SELECT count(DISTINCT name) AS tensors_b_reads FROM llm_param_resolved WHERE model = 'sh-b';
-- the cached weights of sh-b were replaced (a new version), and read the shared tensor
SELECT NOT pg_temp.same(llm_logits('{1,2,3,4,5}', 'sh-b'), logits) AS logits_changed,
       pg_temp.same(llm_logits('{1,2,3,4,5}', 'sh-b'), llm_logits('{1,2,3,4,5}', 'sh-c')) AS logits_as_expected
  FROM before;
SELECT llm_generate_ids('{1,2,3}', 8, 0.0, 0, 1.0, 'sh-b', -1, 0) = llm_generate_ids('{1,2,3}', 8, 0.0, 0, 1.0, 'sh-c', -1, 0)
       AS same_greedy_generation;
-- the relational path reads it too
SELECT pg_temp.same(llm_param_tensor('sh-b', 'wte.weight'), pg_temp.tensor('sh-a', 'wte.weight')) AS relational_reads_it;
-- export and checkpoints hold the shared tensor
SELECT pg_llm_export_safetensors_bytes('sh-b') = pg_llm_export_safetensors_bytes('sh-c') AS same_export;
CREATE TEMP TABLE saved AS SELECT llm_checkpoint_save('sh-b') AS b, llm_checkpoint_save('sh-c') AS c;
SELECT (SELECT n_params FROM llm_checkpoint WHERE id = b) = (SELECT n_params FROM llm_checkpoint WHERE id = c)
       AS checkpoint_complete
  FROM saved;
-- a write to the source's tensor gives the target a new version too (its cached weights go)
CREATE TEMP TABLE v AS SELECT version FROM llm_model_config WHERE model = 'sh-b';
UPDATE llm_param SET step = step WHERE model = 'sh-a' AND name = 'wte.weight';
SELECT c.version > v.version AS target_version_changed FROM llm_model_config c, v WHERE c.model = 'sh-b';

-- 2. Training the target updates the shared tensor once, where it is stored
SELECT llm_train_step('sh-b', '{1,2,3,4,5}', '{2,3,4,5,6}', 1e-2) = llm_train_step('sh-c', '{1,2,3,4,5}', '{2,3,4,5,6}', 1e-2)
       AS same_loss;
SELECT step AS shared_tensor_steps, pg_temp.same(data, pg_temp.tensor('sh-c', 'wte.weight')) AS trained_once
  FROM llm_param WHERE model = 'sh-a' AND name = 'wte.weight';
SELECT bool_and(pg_temp.same(b.data, c.data)) AS target_trained_as_expected
  FROM llm_param_resolved b JOIN llm_param c ON c.model = 'sh-c' AND c.name = b.name AND c.chunk = b.chunk
 WHERE b.model = 'sh-b';
-- the source sees the trained tensor (its weights got a new version as well)
SELECT pg_temp.same(llm_param_tensor('sh-a', 'wte.weight'), llm_param_tensor('sh-b', 'wte.weight')) AS source_sees_it;

-- 3. Gradients accumulated through the tape go to the stored tensor
SET pg_llm.autograd = on;
SELECT pg_llm_cross_entropy_mean(llm_forward_gpt3('sh-b', '{1,2,3}'), '{2,3,4}') > 0 AS recorded;
SELECT llm_backprop((SELECT max(output) FROM llm_tape), 'sh-b') > 0 AS accumulated;
RESET pg_llm.autograd;
SELECT llm_tape_reset();
SELECT (SELECT grad IS NOT NULL FROM llm_param WHERE model = 'sh-a' AND name = 'wte.weight') AS source_row_has_grad,
       (SELECT count(*) FROM llm_param WHERE model = 'sh-b' AND name = 'wte.weight') AS target_rows;
UPDATE llm_param SET grad = NULL WHERE model IN ('sh-a', 'sh-b');

-- 4. Errors
SELECT pg_temp.err($$SELECT llm_share_param('no-such', 'wte.weight', 'sh-b')$$);
SELECT pg_temp.err($$SELECT llm_share_param('sh-a', 'no.such', 'sh-b')$$);
SELECT pg_temp.err($$SELECT llm_share_param('sh-a', 'wte.weight', 'sh-b', 'wpe.weight')$$);
SELECT pg_temp.err($$SELECT llm_share_param('sh-a', 'wte.weight', 'sh-a')$$);
SELECT pg_temp.err($$SELECT llm_share_param('sh-b', 'wte.weight', 'sh-c')$$);
SELECT pg_temp.err($$SELECT llm_share_param('sh-c', 'wte.weight', 'sh-a')$$);
SELECT pg_temp.err($$DELETE FROM llm_model_config WHERE model = 'sh-a'$$);
SELECT pg_temp.err($$SELECT llm_share_param(NULL, 'wte.weight', 'sh-a')$$);

-- the owner of a target may share a tensor it can read, but training then writes the
-- source: that needs the right to write the source too
DROP ROLE IF EXISTS sh_owner;
CREATE ROLE sh_owner;
GRANT llm_writer TO sh_owner;
SET ROLE sh_owner;
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('sh-d', 2, 2, 16, 8, 32, 16, 64);
SELECT llm_init_params('sh-d', 3) > 0 AS own_model;
SELECT llm_share_param('sh-a', 'wpe.weight', 'sh-d');
SELECT pg_temp.err($$SELECT llm_train_step('sh-d', '{1,2}', '{2,3}', 1e-3)$$);
SELECT pg_temp.err($$SELECT llm_share_param('sh-d', 'wpe.weight', 'sh-c')$$);
SELECT pg_temp.err($$SELECT llm_unshare_param('sh-a', 'wte.weight')$$);
DELETE FROM llm_model_config WHERE model = 'sh-d';
RESET ROLE;
DROP ROLE sh_owner;

-- 5. Unshare: the target gets its own copy; the source's later changes do not reach it
SELECT llm_unshare_param('sh-b', 'wte.weight') AS ended, llm_unshare_param('sh-b', 'wte.weight') AS again;
SELECT count(*) AS shares FROM llm_param_share;
SELECT step AS copied_step FROM llm_param WHERE model = 'sh-b' AND name = 'wte.weight';
SELECT llm_init_params('sh-a', 9) > 0 AS source_reinitialised;
SELECT NOT pg_temp.same(pg_temp.tensor('sh-a', 'wte.weight'), pg_temp.tensor('sh-b', 'wte.weight')) AS independent;

-- 6. A whole-model write (init, import, checkpoint load) ends the target's shares
SELECT llm_share_param('sh-a', 'wpe.weight', 'sh-b');
SELECT llm_init_params('sh-b', 4) > 0 AS target_reinitialised;
SELECT count(*) AS shares_after_init FROM llm_param_share;
DELETE FROM llm_model_config WHERE model IN ('sh-a', 'sh-b', 'sh-c');
