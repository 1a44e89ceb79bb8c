-- Parameter sharing between models (pg_gpt2's llm_share_param / llm_unshare_param): a target
-- model reads one of its tensors from a source model, where it is stored once. Generation,
-- logits, exports and checkpoints of the target read the source's values (llm_param_resolved);
-- training the target, or accumulating its gradients, updates the source's rows, so training
-- either model updates the shared tensor once. Writes of a whole model (llm_init_params, an
-- import, llm_checkpoint_load) give it its own tensors again: they end its shares.

-- Makes target_model's tensor target_name (default: source_name) read source_model's tensor
-- source_name. The target must have that tensor now, of the same shape; its own values are
-- dropped. A tensor other models share from cannot itself be shared (no chains).
CREATE FUNCTION llm_share_param(source_model text, source_name text, target_model text,
                                target_name text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    dest text := coalesce(target_name, source_name);
    src_shape int[];
    dest_shape int[];
    via text;
BEGIN
    IF source_model IS NULL OR source_name IS NULL OR target_model IS NULL THEN
        RAISE EXCEPTION 'source_model, source_name and target_model must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM llm_get_model_config(source_model);
    PERFORM llm_get_model_config(target_model);
    PERFORM llm_require_writer(target_model);
    IF source_model = target_model AND source_name = dest THEN
        RAISE EXCEPTION 'a tensor cannot share itself (%.%)', source_model, dest
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT p.shape INTO src_shape FROM llm_param p
     WHERE p.model = source_model AND p.name = source_name AND p.chunk = 0;
    IF NOT FOUND THEN
        SELECT s.source_model || '.' || s.source_name INTO via FROM llm_param_share s
         WHERE s.model = source_model AND s.name = source_name;
        IF FOUND THEN
            RAISE EXCEPTION 'tensor % of model "%" is itself shared from %', source_name, source_model, via
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Share from the model that stores it.';
        END IF;
        RAISE EXCEPTION 'model "%" has no parameter "%"', source_model, source_name
            USING ERRCODE = 'undefined_object';
    END IF;
    SELECT p.shape INTO dest_shape FROM llm_param_resolved p
     WHERE p.model = target_model AND p.name = dest AND p.chunk = 0;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model "%" has no parameter "%" to share', target_model, dest
            USING ERRCODE = 'undefined_object',
                  HINT = 'The target model must have the tensor (llm_init_params or an import) before it can share it.';
    END IF;
    IF src_shape IS DISTINCT FROM dest_shape THEN
        RAISE EXCEPTION 'tensor % of model "%" has shape %, but % of model "%" has shape %',
            source_name, source_model, src_shape, dest, target_model, dest_shape
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM llm_param_share s WHERE s.source_model = target_model AND s.source_name = dest) THEN
        RAISE EXCEPTION 'other models share tensor % of model "%"', dest, target_model
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'End their shares with llm_unshare_param first.';
    END IF;
    -- Waits for a training call on the target to end, as training waits for this.
    PERFORM 1 FROM llm_model_config c WHERE c.model = target_model FOR NO KEY UPDATE;
    DELETE FROM llm_param p WHERE p.model = target_model AND p.name = dest;
    INSERT INTO llm_param_share (model, name, source_model, source_name)
    VALUES (target_model, dest, source_model, source_name)
    ON CONFLICT (model, name) DO UPDATE
       SET source_model = EXCLUDED.source_model, source_name = EXCLUDED.source_name;
END
$$;

-- Ends a share: the target gets its own copy of the tensor's current values (and, unless
-- copy_optimizer_state is false, of its AdamW moments and step count). Returns false when the
-- tensor was not shared.
CREATE FUNCTION llm_unshare_param(target_model text, target_name text,
                                  copy_optimizer_state boolean DEFAULT true) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    ended llm_param_share;
BEGIN
    IF target_model IS NULL OR target_name IS NULL OR copy_optimizer_state IS NULL THEN
        RAISE EXCEPTION 'target_model, target_name and copy_optimizer_state must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM llm_get_model_config(target_model);
    PERFORM llm_require_writer(target_model);
    PERFORM 1 FROM llm_model_config c WHERE c.model = target_model FOR NO KEY UPDATE;
    DELETE FROM llm_param_share s WHERE s.model = target_model AND s.name = target_name
    RETURNING * INTO ended;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO llm_param (model, name, chunk, shape, elem_offset, data, m, v, step)
    SELECT target_model, target_name, p.chunk, p.shape, p.elem_offset, p.data,
           CASE WHEN copy_optimizer_state THEN p.m END,
           CASE WHEN copy_optimizer_state THEN p.v END,
           CASE WHEN copy_optimizer_state THEN p.step ELSE 0 END
      FROM llm_param p WHERE p.model = ended.source_model AND p.name = ended.source_name;
    RETURN true;
END
$$;
