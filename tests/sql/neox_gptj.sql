-- GPT-NeoX (Pythia) and GPT-J: import of the tiny transformers fixtures, their registry rows
-- (rotary position embeddings, parallel residual, optional biases), logits and greedy ids
-- against transformers, a few training steps, the registry's checks on the new columns and
-- the relational forward's refusal. Fixtures are read on the client side by psql.
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

-- 1. Import (bytes form, with config.json)
CREATE TEMP TABLE fixture (family text, model text, cfg jsonb, st bytea, expected jsonb);
\set cfg `cat :fixtures/models/gpt_neox/config.json`
\set st `base64 -w0 :fixtures/models/gpt_neox/model.safetensors`
\set exp `cat :fixtures/models/gpt_neox/expected.json`
INSERT INTO fixture VALUES ('gpt_neox', 'fx-neox', :'cfg', decode(:'st', 'base64'), :'exp');
\set cfg `cat :fixtures/models/gpt_neox_full/config.json`
\set st `base64 -w0 :fixtures/models/gpt_neox_full/model.safetensors`
\set exp `cat :fixtures/models/gpt_neox_full/expected.json`
INSERT INTO fixture VALUES ('gpt_neox_full', 'fx-neox-full', :'cfg', decode(:'st', 'base64'), :'exp');
\set cfg `cat :fixtures/models/gptj/config.json`
\set st `base64 -w0 :fixtures/models/gptj/model.safetensors`
\set exp `cat :fixtures/models/gptj/expected.json`
INSERT INTO fixture VALUES ('gptj', 'fx-gptj', :'cfg', decode(:'st', 'base64'), :'exp');

SELECT family, pg_llm_import_safetensors_bytes(st, model, cfg) AS params FROM fixture ORDER BY family;
SELECT model, family, activation, position_embedding, rotary_dim, rotary_base, rotary_pairing, residual,
       qkv_bias, out_proj_bias, head_bias, tied_head
  FROM llm_model_config WHERE model IN (SELECT model FROM fixture) ORDER BY model;
-- exactly the tensors each architecture has: no position table, no LN2 or attention biases in GPT-J
SELECT f.family,
       count(*) FILTER (WHERE p.name = 'wpe.weight') AS wpe,
       count(*) FILTER (WHERE p.name LIKE '%ln_2%') AS ln_2,
       count(*) FILTER (WHERE p.name LIKE '%out_proj.bias') AS out_proj_bias,
       count(*) FILTER (WHERE p.name = 'lm_head.bias') AS head_bias
  FROM fixture f JOIN llm_param p ON p.model = f.model GROUP BY f.family ORDER BY f.family;

-- 2. Logits for all 12 prompt positions within 1e-4 of transformers
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

-- each exports to its own family's layout
SELECT f.family, pg_llm_export_config(f.model) ->> 'model_type' AS exports_as,
       pg_llm_export_config(f.model) ->> 'architectures' AS architectures
  FROM fixture f ORDER BY f.family;

-- 3. Training: steps on the imported models lower the loss and stay finite
SELECT llm_loss('fx-neox', '{{5,6,7,8},{9,10,11,12}}', '{{6,7,8,9},{10,11,12,13}}') AS start \gset
SELECT count(*) AS steps, bool_and(loss < 'infinity'::float4) AS finite, min(loss) < :start AS learned
  FROM (SELECT llm_train_step('fx-neox', '{{5,6,7,8},{9,10,11,12}}', '{{6,7,8,9},{10,11,12,13}}', 0.01) AS loss
          FROM generate_series(1, 4)) s;
SELECT llm_loss('fx-gptj', '{{5,6,7,8},{9,10,11,12}}', '{{6,7,8,9},{10,11,12,13}}') AS start \gset
SELECT count(*) AS steps, bool_and(loss < 'infinity'::float4) AS finite, min(loss) < :start AS learned
  FROM (SELECT llm_train_step('fx-gptj', '{{5,6,7,8},{9,10,11,12}}', '{{6,7,8,9},{10,11,12,13}}', 0.01) AS loss
          FROM generate_series(1, 4)) s;

-- 4. The registry's checks on the new columns, and the relational forward's refusal
SELECT label, pg_temp.err(q) AS outcome FROM (VALUES
  ('rotary without rotary_dim', $$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, position_embedding)
                                  VALUES ('bad', 1, 2, 16, 8, 64, 32, 50, 'rotary')$$),
  ('odd rotary_dim',            $$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, position_embedding, rotary_dim)
                                  VALUES ('bad', 1, 2, 16, 8, 64, 32, 50, 'rotary', 3)$$),
  ('rotary_dim beyond d_head',  $$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, position_embedding, rotary_dim)
                                  VALUES ('bad', 1, 2, 16, 8, 64, 32, 50, 'rotary', 10)$$),
  ('unknown residual',          $$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, residual)
                                  VALUES ('bad', 1, 2, 16, 8, 64, 32, 50, 'parallel')$$),
  ('parallel with post-LN',     $$INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, residual, ln_placement)
                                  VALUES ('bad', 1, 2, 16, 8, 64, 32, 50, 'parallel_two_norms', 'post')$$),
  ('relational forward',        $$SELECT llm_forward_gpt3('fx-neox', '{1,2,3}')$$)
) AS cases(label, q);

DELETE FROM llm_model_config WHERE model IN (SELECT model FROM fixture);
