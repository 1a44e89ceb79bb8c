-- Training data, training logs, in-database checkpoints and durable training runs.
-- The training functions themselves (llm_loss, llm_train_step, llm_train, llm_eval,
-- llm_dataset_from_text, ...) are in Rust; see docs/training.md.

-- Token blocks to train or evaluate on, per model (its vocabulary) and split.
-- target[i] is the token that follows tokens[i]. Bulk loading from a client:
--   COPY llm_dataset (model, split, tokens) FROM STDIN
-- with blocks of T+1 token ids and no target: the trigger below cuts each into T tokens and
-- their T next-token targets.
CREATE TABLE llm_dataset (
    id     bigserial PRIMARY KEY,
    model  text  NOT NULL REFERENCES llm_model_config (model) ON DELETE CASCADE ON UPDATE CASCADE,
    split  text  NOT NULL DEFAULT 'train' CHECK (split <> ''),
    tokens int[] NOT NULL,
    target int[] NOT NULL,
    CONSTRAINT rows_are_one_dimensional CHECK (array_ndims(tokens) = 1 AND array_ndims(target) = 1),
    CONSTRAINT tokens_and_targets_align CHECK (cardinality(tokens) = cardinality(target)),
    CONSTRAINT ids_are_not_null CHECK (array_position(tokens, NULL) IS NULL AND array_position(target, NULL) IS NULL),
    CONSTRAINT ids_are_not_negative CHECK (0 <= ALL (tokens) AND 0 <= ALL (target))
);
CREATE INDEX llm_dataset_model_split ON llm_dataset (model, split, id);
COMMENT ON TABLE llm_dataset IS 'pg_gpt3 training data: token blocks and next-token targets per model and split';

CREATE FUNCTION llm_dataset_fill_target() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp AS $$
DECLARE
    n int := cardinality(NEW.tokens);
BEGIN
    IF NEW.target IS NULL AND NEW.tokens IS NOT NULL THEN
        IF n < 2 THEN
            RAISE EXCEPTION 'a row without target needs at least 2 tokens (T tokens and the next one), got %', n
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        NEW.target := NEW.tokens[2:n];
        NEW.tokens := NEW.tokens[1:n - 1];
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER llm_dataset_fill_target BEFORE INSERT ON llm_dataset
    FOR EACH ROW EXECUTE FUNCTION llm_dataset_fill_target();

-- One row per step of llm_train_step, llm_train and llm_train_run. A skipped float16 step
-- (its scaled gradient overflowed) changed nothing: its step is the count it did not advance.
CREATE TABLE llm_train_log (
    id           bigserial PRIMARY KEY,
    model        text   NOT NULL REFERENCES llm_model_config (model) ON DELETE CASCADE ON UPDATE CASCADE,
    step         int    NOT NULL,   -- the model's optimizer step count after this step
    loss         float4 NOT NULL,   -- mean loss of the batch, before the update
    lr           float4 NOT NULL,
    grad_norm    float4 NOT NULL,   -- global gradient norm before clipping
    tokens_per_s float4 NOT NULL,   -- the step's compute only
    tokens       int    NOT NULL,   -- tokens in the batch
    logged_at    timestamptz NOT NULL DEFAULT clock_timestamp(),  -- when the step ended
    precision    text   NOT NULL DEFAULT 'float32',  -- pg_llm.train_precision of the step
    loss_scale   float4,            -- the loss scale a float16 step used (NULL otherwise)
    skipped      boolean NOT NULL DEFAULT false   -- float16 overflow: nothing was updated
);
CREATE INDEX llm_train_log_model_step ON llm_train_log (model, step);

-- In-database checkpoints: a copy of a model's parameter rows (weights, AdamW moments, step
-- count) taken in one statement, so it is one committed state; no server path involved.
CREATE TABLE llm_checkpoint (
    id           serial PRIMARY KEY,
    model        text   NOT NULL REFERENCES llm_model_config (model) ON DELETE CASCADE ON UPDATE CASCADE,
    note         text,
    step         int    NOT NULL,   -- optimizer steps the weights had taken
    n_params     bigint NOT NULL,
    architecture jsonb  NOT NULL,   -- the registry row when saved; a load checks it
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_checkpoint_model ON llm_checkpoint (model, id);
COMMENT ON TABLE llm_checkpoint IS 'pg_gpt3 in-database checkpoints (llm_checkpoint_save / _load / _prune)';

CREATE TABLE llm_checkpoint_param (
    checkpoint_id int    NOT NULL REFERENCES llm_checkpoint (id) ON DELETE CASCADE,
    name          text   NOT NULL,
    chunk         int    NOT NULL,
    shape         int[]  NOT NULL,
    elem_offset   bigint NOT NULL,
    data          bytea  NOT NULL,
    m             bytea,
    v             bytea,
    step          int    NOT NULL,
    PRIMARY KEY (checkpoint_id, name, chunk)
);
ALTER TABLE llm_checkpoint_param ALTER COLUMN data SET STORAGE EXTERNAL;
ALTER TABLE llm_checkpoint_param ALTER COLUMN m SET STORAGE EXTERNAL;
ALTER TABLE llm_checkpoint_param ALTER COLUMN v SET STORAGE EXTERNAL;

-- The architecture columns of a model's registry row (what must match for a checkpoint to load).
CREATE FUNCTION llm_model_architecture(model text) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
    SELECT to_jsonb(c) - ARRAY['model', 'version', 'note', 'owner']
      FROM llm_model_config c WHERE c.model = llm_model_architecture.model
$$;

-- Saves the model's weights and optimizer state as a new checkpoint; returns its id.
CREATE FUNCTION llm_checkpoint_save(model text, note text DEFAULT NULL) RETURNS int
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
#variable_conflict use_column
DECLARE
    cfg llm_model_config := llm_get_model_config(llm_checkpoint_save.model);
    saved int;
BEGIN
    PERFORM llm_require_writer(cfg.model);
    INSERT INTO llm_checkpoint (model, note, step, n_params, architecture)
    VALUES (cfg.model, llm_checkpoint_save.note, 0, 0, llm_model_architecture(cfg.model))
    RETURNING id INTO saved;
    INSERT INTO llm_checkpoint_param (checkpoint_id, name, chunk, shape, elem_offset, data, m, v, step)
    SELECT saved, p.name, p.chunk, p.shape, p.elem_offset, p.data, p.m, p.v, p.step
      FROM llm_param_resolved p WHERE p.model = cfg.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model "%" has no parameters to save', cfg.model
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Create them with llm_init_params or pg_llm_import_safetensors.';
    END IF;
    UPDATE llm_checkpoint c
       SET step = s.step, n_params = s.n_params
      FROM (SELECT max(step) AS step, sum(length(data))::bigint / 4 AS n_params
              FROM llm_checkpoint_param WHERE checkpoint_id = saved) s
     WHERE c.id = saved;
    RETURN saved;
END
$$;

-- Replaces the model's weights and optimizer state with those of a checkpoint of it.
CREATE FUNCTION llm_checkpoint_load(model text, checkpoint_id int) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
#variable_conflict use_column
DECLARE
    cfg llm_model_config := llm_get_model_config(llm_checkpoint_load.model);
    ck llm_checkpoint;
BEGIN
    PERFORM llm_require_writer(cfg.model);
    IF llm_checkpoint_load.checkpoint_id IS NULL THEN
        RAISE EXCEPTION 'checkpoint_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO ck FROM llm_checkpoint c
     WHERE c.id = llm_checkpoint_load.checkpoint_id AND c.model = cfg.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model "%" has no checkpoint %', cfg.model, llm_checkpoint_load.checkpoint_id
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT * FROM llm_checkpoint lists the checkpoints.';
    END IF;
    IF ck.architecture IS DISTINCT FROM llm_model_architecture(cfg.model) THEN
        RAISE EXCEPTION 'checkpoint % was saved with another architecture of model "%"', ck.id, cfg.model
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Waits for a training call on the model to end, as training waits for this.
    PERFORM 1 FROM llm_model_config c WHERE c.model = cfg.model FOR NO KEY UPDATE;
    -- the checkpoint holds every tensor: the model's shares end, as with an import
    DELETE FROM llm_param_share s WHERE s.model = cfg.model;
    DELETE FROM llm_param p WHERE p.model = cfg.model;
    INSERT INTO llm_param (model, name, chunk, shape, elem_offset, data, m, v, step)
    SELECT cfg.model, name, chunk, shape, elem_offset, data, m, v, step
      FROM llm_checkpoint_param WHERE checkpoint_id = ck.id;
END
$$;

-- Deletes all but the newest keep_last checkpoints of the model; returns how many it deleted.
CREATE FUNCTION llm_checkpoint_prune(model text, keep_last int) RETURNS int
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
#variable_conflict use_column
DECLARE
    cfg llm_model_config := llm_get_model_config(llm_checkpoint_prune.model);
    deleted int;
BEGIN
    PERFORM llm_require_writer(cfg.model);
    IF keep_last IS NULL OR keep_last < 0 THEN
        RAISE EXCEPTION 'keep_last must be a non-negative number, got %', coalesce(keep_last::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM llm_checkpoint c
     WHERE c.model = cfg.model
       AND c.id NOT IN (SELECT id FROM llm_checkpoint k WHERE k.model = cfg.model
                         ORDER BY id DESC LIMIT keep_last);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- A long training run that commits every commit_every steps, so that a crash loses at most
-- that many; CALL it again with the same arguments to resume (it continues from the stored
-- step count, with the same schedule and data order). Run it outside an explicit
-- transaction block. A procedure that commits cannot pin its search_path with SET, so every
-- name below is schema-qualified instead.
CREATE PROCEDURE llm_train_run(
    model text, total_steps int, commit_every int DEFAULT 100,
    batch_size int DEFAULT 1, seq_len int DEFAULT NULL, lr_max float4 DEFAULT 6e-4,
    warmup int DEFAULT 0, beta1 float4 DEFAULT 0.9, beta2 float4 DEFAULT 0.95,
    eps float4 DEFAULT 1e-8, wd float4 DEFAULT 0.1, grad_clip float4 DEFAULT 1.0,
    dropout_p float4 DEFAULT 0.0, seed bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        EXIT WHEN @extschema@.llm_train_segment(model, total_steps, commit_every, batch_size,
            seq_len, lr_max, warmup, beta1, beta2, eps, wd, grad_clip, dropout_p, seed)
            OPERATOR(pg_catalog.=) 0;
        COMMIT;
    END LOOP;
END
$$;
