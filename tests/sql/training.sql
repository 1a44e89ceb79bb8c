-- Training in SQL: loss, steps, runs over llm_dataset, checkpoints, and bad input. Every bad
-- input is an ERROR with a precise SQLSTATE that changes nothing (the step count and the
-- weights' checksum are compared before and after).
\pset footer off
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
-- The model's state as a short fingerprint: step count and a digest of weights and moments.
CREATE FUNCTION pg_temp.state(model_name text) RETURNS text LANGUAGE sql AS $$
    SELECT max(step) || ' ' || left(md5(string_agg(md5(data) || coalesce(md5(m), '-') || coalesce(md5(v), '-'), ',' ORDER BY name, chunk)), 8)
      FROM llm_param WHERE model = model_name
$$;

INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, attention_pattern, local_window)
VALUES ('train-tiny', 2, 2, 16, 8, 64, 32, 50, '{dense,local}', 4);
SELECT llm_init_params('train-tiny', 1) AS params;
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('train-empty', 1, 2, 16, 8, 64, 32, 50);
SELECT llm_init_params('train-empty', 1) AS params;

-- 1. Loss: 1-D (one sequence) and 2-D (a batch) agree with the mean over their rows.
SELECT round(llm_loss('train-tiny', '{1,2,3,4}', '{2,3,4,5}')::numeric, 3) AS loss_1d,
       round(((llm_loss('train-tiny', '{1,2,3,4}', '{2,3,4,5}') + llm_loss('train-tiny', '{5,6,7,8}', '{6,7,8,9}')) / 2)::numeric, 3) AS mean_of_two,
       round(llm_loss('train-tiny', '{{1,2,3,4},{5,6,7,8}}', '{{2,3,4,5},{6,7,8,9}}')::numeric, 3) AS loss_2d;

-- 2. Steps lower the loss of what they train on; the optimizer state is stored.
SELECT llm_loss('train-tiny', '{{1,2,3,4},{5,6,7,8}}', '{{2,3,4,5},{6,7,8,9}}') AS start \gset
SELECT count(*) FILTER (WHERE loss <= :start) AS steps, round(min(loss)::numeric, 3) < round(:start::numeric, 3) AS learned
  FROM (SELECT llm_train_step('train-tiny', '{{1,2,3,4},{5,6,7,8}}', '{{2,3,4,5},{6,7,8,9}}', 0.01) AS loss
          FROM generate_series(1, 5)) s;
SELECT bool_and(has_adam_state) AS has_adam_state, max(step) AS step FROM llm_param_info WHERE model = 'train-tiny';
SELECT count(*) AS logged, min(step), max(step) FROM llm_train_log WHERE model = 'train-tiny';

-- 3. Datasets: rows with targets, rows cut by the trigger (T+1 tokens, no target), splits.
INSERT INTO llm_dataset (model, tokens)
SELECT 'train-tiny', array(SELECT (i * 7 + j) % 50 FROM generate_series(0, 16) j) FROM generate_series(1, 12) i;
INSERT INTO llm_dataset (model, split, tokens, target)
SELECT 'train-tiny', 'validation', array(SELECT (i * 7 + j) % 50 FROM generate_series(0, 15) j),
       array(SELECT (i * 7 + j) % 50 FROM generate_series(1, 16) j) FROM generate_series(1, 3) i;
SELECT split, count(*), min(cardinality(tokens)) AS len, bool_and(tokens[2] = target[1]) AS shifted
  FROM llm_dataset WHERE model = 'train-tiny' GROUP BY split ORDER BY split;

-- 4. llm_train: one row per step, step numbers continue the model's, the schedule warms up.
SELECT step, round(lr::numeric, 6) AS lr, loss > 0 AS has_loss, grad_norm > 0 AS has_norm
  FROM llm_train('train-tiny', 4, batch_size => 3, seq_len => 8, lr_max => 0.01, warmup => 8, seed => 1);
-- The same seed from the same state gives the same losses (checkpoint, train, restore, train).
SELECT llm_checkpoint_save('train-tiny', 'before the repeat') AS checkpoint \gset
CREATE TEMP TABLE first_run AS SELECT step, loss FROM llm_train('train-tiny', 3, batch_size => 2, lr_max => 0.01, seed => 5);
SELECT llm_checkpoint_load('train-tiny', :checkpoint);
CREATE TEMP TABLE second_run AS SELECT step, loss FROM llm_train('train-tiny', 3, batch_size => 2, lr_max => 0.01, seed => 5);
SELECT f.step, f.loss = s.loss AS same_loss FROM first_run f JOIN second_run s USING (step) ORDER BY step;
-- Dropout makes the training loss differ from the eval-mode run, reproducibly.
SELECT llm_checkpoint_load('train-tiny', :checkpoint);
SELECT bool_and(d.loss <> f.loss) AS dropout_changes_losses
  FROM llm_train('train-tiny', 3, batch_size => 2, lr_max => 0.01, seed => 5, dropout_p => 0.2) d JOIN first_run f USING (step);
SELECT sequences, tokens, round(perplexity::numeric - exp(loss)::numeric, 6) AS ppl_is_exp_loss
  FROM llm_eval('train-tiny');

-- 5. Checkpoints: listed, loaded, pruned.
SELECT llm_checkpoint_save('train-tiny', 'second') IS NOT NULL AS saved;
SELECT model, note, step > 0 AS trained, n_params FROM llm_checkpoint ORDER BY id;
SELECT llm_checkpoint_prune('train-tiny', 1) AS pruned;
SELECT count(*) AS kept, (SELECT count(*) FROM llm_checkpoint_param) > 0 AS has_rows FROM llm_checkpoint;

-- 6. Bad input changes nothing.
SELECT pg_temp.state('train-tiny') AS before \gset
-- (Machine-dependent details are masked: memory sizes, where a divergence shows.)
SELECT label, regexp_replace(regexp_replace(pg_temp.err(q), '[0-9.]+ (bytes|kB|MB|GB|TB)', 'N', 'g'),
                             'diverged at step \d+ \(.*\)', 'diverged at step N (...)') AS outcome FROM (VALUES
  ('unknown model (loss)',    $$SELECT llm_loss('nope', '{1}', '{2}')$$),
  ('unknown model (step)',    $$SELECT llm_train_step('nope', '{1}', '{2}', 0.1)$$),
  ('unknown model (train)',   $$SELECT * FROM llm_train('nope', 1)$$),
  ('unknown model (eval)',    $$SELECT * FROM llm_eval('nope')$$),
  ('unknown model (save)',    $$SELECT llm_checkpoint_save('nope', 'x')$$),
  ('unknown checkpoint',      $$SELECT llm_checkpoint_load('train-tiny', 999)$$),
  ('empty dataset',           $$SELECT * FROM llm_train('train-empty', 1)$$),
  ('rows shorter than seq_len',$$SELECT * FROM llm_train('train-tiny', 1, seq_len => 20)$$),
  ('empty split (eval)',      $$SELECT * FROM llm_eval('train-tiny', 'test')$$),
  ('no parameters',           $$SELECT llm_train_step('gpt3-350m', '{1}', '{2}', 0.1)$$),
  ('longer than context',     $$SELECT llm_train_step('train-tiny', array(SELECT 1 FROM generate_series(1, 33)), array(SELECT 2 FROM generate_series(1, 33)), 0.1)$$),
  ('seq_len beyond context',  $$SELECT * FROM llm_train('train-tiny', 1, seq_len => 64)$$),
  ('token beyond vocabulary', $$SELECT llm_train_step('train-tiny', '{1,50}', '{2,3}', 0.1)$$),
  ('target beyond vocabulary',$$SELECT llm_train_step('train-tiny', '{1,2}', '{2,99}', 0.1)$$),
  ('negative token',          $$SELECT llm_train_step('train-tiny', '{1,-2}', '{2,3}', 0.1)$$),
  ('NULL token',              $$SELECT llm_loss('train-tiny', '{1,NULL}', '{2,3}')$$),
  ('ragged 2-D array',        $$SELECT llm_train_step('train-tiny', '{{1,2},{3}}', '{{2,3},{4}}', 0.1)$$),
  ('3-D array',               $$SELECT llm_loss('train-tiny', '{{{1}}}', '{{{2}}}')$$),
  ('empty arrays',            $$SELECT llm_loss('train-tiny', '{}', '{}')$$),
  ('lengths differ',          $$SELECT llm_train_step('train-tiny', '{1,2,3}', '{2,3}', 0.1)$$),
  ('shapes differ',           $$SELECT llm_loss('train-tiny', '{{1,2},{3,4}}', '{2,3,4,5}')$$),
  ('NaN lr',                  $$SELECT llm_train_step('train-tiny', '{1}', '{2}', 'NaN')$$),
  ('negative lr',             $$SELECT llm_train_step('train-tiny', '{1}', '{2}', -0.1)$$),
  ('NULL lr',                 $$SELECT llm_train_step('train-tiny', '{1}', '{2}', NULL)$$),
  ('beta1 = 1',               $$SELECT llm_train_step('train-tiny', '{1}', '{2}', 0.1, beta1 => 1.0)$$),
  ('negative beta2',          $$SELECT llm_train_step('train-tiny', '{1}', '{2}', 0.1, beta2 => -0.5)$$),
  ('zero eps',                $$SELECT llm_train_step('train-tiny', '{1}', '{2}', 0.1, eps => 0)$$),
  ('negative clip',           $$SELECT llm_train_step('train-tiny', '{1}', '{2}', 0.1, grad_clip => -1)$$),
  ('negative n_steps',        $$SELECT * FROM llm_train('train-tiny', -1)$$),
  ('zero batch',              $$SELECT * FROM llm_train('train-tiny', 1, batch_size => 0)$$),
  ('dropout 1',               $$SELECT * FROM llm_train('train-tiny', 1, dropout_p => 1.0)$$),
  ('batch beyond memory',     $$SELECT * FROM llm_train('train-tiny', 1, batch_size => 2147483647, seq_len => 16)$$),
  ('diverging run (lr 1e4)',  $$SELECT * FROM llm_train('train-tiny', 40, batch_size => 4, lr_max => 1e4)$$),
  ('negative keep_last',      $$SELECT llm_checkpoint_prune('train-tiny', -1)$$),
  ('dataset NULL id',         $$INSERT INTO llm_dataset (model, tokens, target) VALUES ('train-tiny', '{1,NULL}', '{2,3}')$$),
  ('dataset negative id',     $$INSERT INTO llm_dataset (model, tokens, target) VALUES ('train-tiny', '{1,-1}', '{2,3}')$$),
  ('dataset lengths differ',  $$INSERT INTO llm_dataset (model, tokens, target) VALUES ('train-tiny', '{1,2}', '{2}')$$),
  ('dataset one token',       $$INSERT INTO llm_dataset (model, tokens) VALUES ('train-tiny', '{1}')$$),
  ('dataset unknown model',   $$INSERT INTO llm_dataset (model, tokens) VALUES ('nope', '{1,2}')$$),
  ('from_text no tokenizer',  $$SELECT llm_dataset_from_text('train-tiny', 'hello')$$),
  ('from_text zero block',    $$SELECT llm_dataset_from_text('train-tiny', 'hello', 0)$$)
) AS t(label, q);
SELECT pg_temp.state('train-tiny') = :'before' AS unchanged, :'before' LIKE '12 %' AS at_step_12;
-- The backend survived everything above.
SELECT round(llm_loss('train-tiny', '{1,2}', '{2,3}')::numeric, 1) > 0 AS alive;
