-- The model registry and the parameter table.
\pset footer off

SELECT model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, activation,
       attention_pattern, local_window, tied_head, ln_placement, family
  FROM llm_model_config ORDER BY family DESC, n_layer * d_model;

-- every GPT-3 size is self-consistent: n_head * d_head = d_model, d_ff = 4 d_model
SELECT model FROM llm_model_config WHERE n_head * d_head <> d_model OR d_ff <> 4 * d_model;

SELECT (llm_get_model_config('gpt3-125m')).d_model AS d_model_125m;
SELECT n_layer, d_model FROM llm_get_model_config('gpt3-175b');

-- an unknown model is 42704 undefined_object
SELECT llm_get_model_config('gpt3-9000b');
DO $$ BEGIN PERFORM llm_get_model_config('gpt3-9000b');
EXCEPTION WHEN undefined_object THEN RAISE NOTICE 'SQLSTATE %', SQLSTATE; END $$;

-- constraints reject incoherent rows (terse: the failing row's version varies)
\set VERBOSITY terse
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, attention_pattern)
VALUES ('bad-local', 2, 2, 8, 4, 32, 16, 10, '{dense,local}');
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, activation)
VALUES ('bad-act', 2, 2, 8, 4, 32, 16, 10, 'swish');
\set VERBOSITY default

-- a new model, and the version bump that invalidates cached weights
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('tiny', 2, 2, 8, 4, 32, 16, 10);
CREATE TEMP TABLE v0 AS SELECT version FROM llm_model_config WHERE model = 'tiny';
UPDATE llm_model_config SET n_positions = 32 WHERE model = 'tiny';
SELECT model, n_positions, version <> (SELECT version FROM v0) AS new_version FROM llm_model_config WHERE model = 'tiny';

-- parameters are rows: shape + float32 data (+ gradient and Adam moments), chunked if huge
INSERT INTO llm_param (model, name, shape, data)
VALUES ('tiny', 'wte.weight', '{10,8}', pg_llm_from_array(array_fill(0.02::float4, ARRAY[80]))),
       ('tiny', 'ln_f.bias', '{8}', pg_llm_zeros_like(pg_llm_from_array(array_fill(0::float4, ARRAY[8]))));
SELECT model, name, shape, numel, chunks, has_grad, has_adam_state FROM llm_param_info ORDER BY name;
-- writing parameters (even by hand) also gives the model a new version
SELECT version <> (SELECT version FROM v0) AS version_changed_by_param_write FROM llm_model_config WHERE model = 'tiny';
SELECT attname, attstorage FROM pg_attribute
 WHERE attrelid = 'llm_param'::regclass AND attname IN ('data', 'grad', 'm', 'v') ORDER BY attname;

-- deleting a model removes its parameters
DELETE FROM llm_model_config WHERE model = 'tiny';
SELECT count(*) AS params_left FROM llm_param WHERE model = 'tiny';
