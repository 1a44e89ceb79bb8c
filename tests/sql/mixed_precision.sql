-- Mixed-precision training (issue 23 point 3): with pg_llm.train_precision = bfloat16 or
-- float16 a step's passes run on a copy of the weights whose matrices and embeddings are
-- rounded to it, with the linear layers' operands rounded as torch.autocast does, while the
-- update applies to the float32 weights and moments in llm_param. float16 scales the loss,
-- skips a step whose gradient overflows (logged, nothing changed) and halves the scale.
\pset footer off
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
SELECT 'mp-' || p, 2, 2, 32, 16, 128, 32, 96
  FROM unnest(ARRAY['float32', 'bfloat16', 'float16']) AS p;
SELECT count(llm_init_params(model, 5)) AS models FROM llm_model_config WHERE model LIKE 'mp-%';
INSERT INTO llm_dataset (model, split, tokens)
SELECT m.model, 'train', ARRAY(SELECT (i * 7 + k) % 96 FROM generate_series(0, 16) AS i)
  FROM llm_model_config m, generate_series(0, 7) AS k WHERE m.model LIKE 'mp-%';

SET pg_llm.train_precision = 'float32';
SELECT count(*) AS steps FROM llm_train('mp-float32', 30, batch_size => 4, lr_max => 1e-2);
SET pg_llm.train_precision = 'bfloat16';
SELECT count(*) AS steps FROM llm_train('mp-bfloat16', 30, batch_size => 4, lr_max => 1e-2);
SET pg_llm.train_precision = 'float16';
SELECT count(*) AS steps FROM llm_train('mp-float16', 30, batch_size => 4, lr_max => 1e-2);

-- Each half-precision loss curve follows float32's within 0.01 (it does differ), and falls.
SELECT h.precision, count(*) AS steps,
       max(abs(h.loss - f.loss)) < 0.01 AS follows_float32,
       max(abs(h.loss - f.loss)) > 0 AS computed_in_half,
       bool_and(h.loss_scale IS NOT NULL) AS scaled, bool_or(h.skipped) AS any_skipped,
       min(h.loss) FILTER (WHERE h.step = 30) < 0.6 * min(h.loss) FILTER (WHERE h.step = 1) AS loss_falls
  FROM llm_train_log h JOIN llm_train_log f ON f.model = 'mp-float32' AND f.step = h.step
 WHERE h.model IN ('mp-bfloat16', 'mp-float16')
 GROUP BY h.precision ORDER BY h.precision;
-- The trained model serves; its weights in llm_param stay float32 masters: rounding them to
-- bfloat16 changes values.
SELECT array_length(llm_generate_ids('{5,17,3}', 5, 0, 50, 1, 'mp-bfloat16', NULL), 1) AS generated;
SELECT llm_set_weight_dtype('mp-bfloat16', 'bfloat16') > 1000 AS masters_off_the_grid;

-- An overflowing float16 step: skipped and logged, weights, moments and step count
-- unchanged; the next step halves the scale.
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('mp-overflow', 2, 2, 32, 16, 128, 32, 96);
SELECT llm_init_params('mp-overflow', 5) > 0 AS initialised;
INSERT INTO llm_dataset (model, split, tokens)
SELECT 'mp-overflow', 'train', tokens FROM llm_dataset WHERE model = 'mp-float32';
CREATE TEMP TABLE before AS SELECT name, data FROM llm_param WHERE model = 'mp-overflow';
SET pg_llm.train_loss_scale = 1e12;
SELECT llm_train_step('mp-overflow', '{5,17,3,88,42,9}', '{17,3,88,42,9,60}', 1e-2) > 0 AS loss;
SELECT step, loss_scale, skipped, precision FROM llm_train_log WHERE model = 'mp-overflow';
SELECT count(*) AS changed_rows
  FROM llm_param p JOIN before b USING (name)
 WHERE p.model = 'mp-overflow' AND p.data IS DISTINCT FROM b.data;
SELECT llm_train_step('mp-overflow', '{5,17,3,88,42,9}', '{17,3,88,42,9,60}', 1e-2) > 0 AS loss;
SELECT step, loss_scale, skipped FROM llm_train_log WHERE model = 'mp-overflow' ORDER BY id;
-- The log carries the scale from call to call: halving on, steps apply once it fits float16
-- (whose largest value is 65504); a skipped step's row repeats the step count.
SELECT count(*) AS rows FROM llm_train('mp-overflow', 40, batch_size => 2, lr_max => 1e-2);
SELECT count(*) FILTER (WHERE skipped) BETWEEN 10 AND 38 AS skipped_until_it_fits,
       count(*) FILTER (WHERE NOT skipped) > 0 AS applied,
       max(step) = count(*) FILTER (WHERE NOT skipped) AS step_counts_applied,
       max(loss_scale) FILTER (WHERE NOT skipped) < 1e6 AS backed_off,
       bool_and(next_scale = loss_scale / 2) FILTER (WHERE skipped) AS halving,
       bool_and(next_scale = loss_scale) FILTER (WHERE NOT skipped) AS kept
  FROM (SELECT *, lead(loss_scale) OVER (ORDER BY id) AS next_scale
          FROM llm_train_log WHERE model = 'mp-overflow') AS l;

-- Refusals.
SELECT pg_temp.err($$SET pg_llm.train_precision = 'float8'$$);
SELECT pg_temp.err($$SET pg_llm.train_loss_scale = 0$$);
RESET pg_llm.train_precision;
RESET pg_llm.train_loss_scale;

DELETE FROM llm_model_config WHERE model LIKE 'mp-%';
SELECT count(*) AS left_behind FROM llm_dataset WHERE model LIKE 'mp-%';
