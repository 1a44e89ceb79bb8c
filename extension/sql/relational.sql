-- The relational path (pg_gpt2's idea, kept): a model's forward written as SQL over the
-- pg_llm_* kernels, so every intermediate activation is a value a query can look at, and,
-- with SET pg_llm.autograd = on, every kernel call is recorded on the session's tape for
-- llm_backprop. The native path (llm_logits, llm_train_step) computes the same numbers in one
-- call; docs/relational.md compares them.

-- The session's tape as rows (pg_gpt2's names). Each session sees its own tape only.
CREATE VIEW llm_tape AS SELECT * FROM llm_tape_records();
CREATE VIEW llm_tensor_rt AS SELECT * FROM llm_tape_tensors();
GRANT SELECT ON llm_tape, llm_tensor_rt TO PUBLIC;

-- Refuses a model the relational forward does not compose (it covers the GPT-3 / GPT-2
-- family: pre-LayerNorm, gelu_new, learned positions, sequential residual, every bias, dense
-- and locally banded layers, tied or untied head).
CREATE FUNCTION llm_relational_config(model text) RETURNS llm_model_config
LANGUAGE plpgsql STABLE STRICT SET search_path = pg_catalog, @extschema@, pg_temp AS $$
DECLARE
    cfg llm_model_config := llm_get_model_config(model);
BEGIN
    IF cfg.ln_placement <> 'pre' OR cfg.activation <> 'gelu_new' OR cfg.d_embed IS NOT NULL
       OR cfg.padded_vocab IS NOT NULL OR cfg.position_embedding <> 'learned'
       OR cfg.residual <> 'sequential' OR NOT cfg.out_proj_bias OR cfg.head_bias THEN
        RAISE EXCEPTION 'the relational forward composes GPT-3 / GPT-2 models (pre-LayerNorm, gelu_new, learned positions, sequential residual, no embedding projection or vocabulary padding); "%" is not one', model
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'llm_logits runs every registered architecture natively.';
    END IF;
    RETURN cfg;
END
$$;

-- One transformer block: x [t, d_model] → x + attn(ln_1(x)) → that + mlp(ln_2(that)).
-- Each parameter is fetched where its kernel uses it (llm_param_tensor), which is what lets
-- the tape tell equal parameters apart (a fresh model's biases are all zeros).
CREATE FUNCTION llm_block_forward(model text, layer int, x bytea, t int) RETURNS bytea
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
DECLARE
    cfg llm_model_config := llm_relational_config(model);
    d int := cfg.d_model;
    w int := cfg.n_head * cfg.d_head;
    p text := format('layers.%s.', layer);
    band int;
    h bytea;
    q bytea;
    k bytea;
    v bytea;
BEGIN
    IF layer IS NULL OR layer < 0 OR layer >= cfg.n_layer THEN
        RAISE EXCEPTION 'layer % is not one of model "%"''s % layers (0 .. %)',
            layer, model, cfg.n_layer, cfg.n_layer - 1
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cfg.attention_pattern[layer % cardinality(cfg.attention_pattern) + 1] = 'local' THEN
        band := cfg.local_window;
    END IF;
    h := pg_llm_layernorm(x, llm_param_tensor(model, p || 'ln_1.weight'),
                          llm_param_tensor(model, p || 'ln_1.bias'), cfg.ln_eps);
    q := pg_llm_linear(h, llm_param_tensor(model, p || 'attn.q_proj.weight'),
                       CASE WHEN cfg.qkv_bias THEN llm_param_tensor(model, p || 'attn.q_proj.bias') END,
                       t, d, w);
    k := pg_llm_linear(h, llm_param_tensor(model, p || 'attn.k_proj.weight'),
                       CASE WHEN cfg.qkv_bias THEN llm_param_tensor(model, p || 'attn.k_proj.bias') END,
                       t, d, w);
    v := pg_llm_linear(h, llm_param_tensor(model, p || 'attn.v_proj.weight'),
                       CASE WHEN cfg.qkv_bias THEN llm_param_tensor(model, p || 'attn.v_proj.bias') END,
                       t, d, w);
    x := pg_llm_add(x, pg_llm_linear(pg_llm_causal_attention(q, k, v, cfg.n_head, t, band, cfg.scale_attn),
                                     llm_param_tensor(model, p || 'attn.out_proj.weight'),
                                     llm_param_tensor(model, p || 'attn.out_proj.bias'), t, w, d));
    h := pg_llm_layernorm(x, llm_param_tensor(model, p || 'ln_2.weight'),
                          llm_param_tensor(model, p || 'ln_2.bias'), cfg.ln_eps);
    h := pg_llm_gelu(pg_llm_linear(h, llm_param_tensor(model, p || 'mlp.fc_in.weight'),
                                   llm_param_tensor(model, p || 'mlp.fc_in.bias'), t, d, cfg.d_ff));
    RETURN pg_llm_add(x, pg_llm_linear(h, llm_param_tensor(model, p || 'mlp.fc_out.weight'),
                                       llm_param_tensor(model, p || 'mlp.fc_out.bias'), t, cfg.d_ff, d));
END
$$;

-- Logits [t, vocab] of every position, composed from the kernels; equal to llm_logits.
CREATE FUNCTION llm_forward_gpt3(model text, tokens int[]) RETURNS bytea
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, @extschema@, pg_temp AS $$
DECLARE
    cfg llm_model_config := llm_relational_config(model);
    t int := cardinality(tokens);
    x bytea;
BEGIN
    IF t IS NULL OR t = 0 OR t > cfg.n_positions THEN
        RAISE EXCEPTION 'tokens must hold 1 .. % ids (model "%"''s context), got %',
            cfg.n_positions, model, coalesce(t, 0)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    x := pg_llm_add(pg_llm_embedding(llm_param_tensor(model, 'wte.weight'), tokens, cfg.d_model),
                    pg_llm_embedding(llm_param_tensor(model, 'wpe.weight'),
                                     array(SELECT generate_series(0, t - 1) + cfg.position_offset),
                                     cfg.d_model));
    FOR layer IN 0 .. cfg.n_layer - 1 LOOP
        x := llm_block_forward(model, layer, x, t);
    END LOOP;
    x := pg_llm_layernorm(x, llm_param_tensor(model, 'ln_f.weight'),
                          llm_param_tensor(model, 'ln_f.bias'), cfg.ln_eps);
    RETURN pg_llm_linear(x, llm_param_tensor(model, CASE WHEN cfg.tied_head THEN 'wte.weight'
                                                         ELSE 'lm_head.weight' END),
                         NULL, t, cfg.d_model, cfg.vocab);
END
$$;
