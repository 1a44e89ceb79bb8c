-- Model registry: one row per model architecture. The first six columns are a fixed public
-- contract (pg_gpt2 names); the rest make every architectural choice explicit so that GPT-3
-- and imported relatives (GPT-2, Cerebras-GPT, OPT, GPT-Neo, GPT-NeoX/Pythia, GPT-J) run exactly.
-- Model versions come from a sequence: a number is never reused, not even after a rollback,
-- so a backend's cached weights can be keyed by it safely.
CREATE SEQUENCE llm_model_version_seq;

CREATE TABLE llm_model_config (
    model             text PRIMARY KEY CHECK (model <> ''),
    n_layer           int  NOT NULL CHECK (n_layer > 0),
    n_head            int  NOT NULL CHECK (n_head > 0),
    d_model           int  NOT NULL CHECK (d_model > 0),
    n_positions       int  NOT NULL CHECK (n_positions > 0),
    vocab             int  NOT NULL CHECK (vocab > 0),
    d_head            int  NOT NULL CHECK (d_head > 0),
    d_ff              int  NOT NULL CHECK (d_ff > 0),
    -- 'gelu_new' (GPT-2/3 tanh approximation), 'gelu' (exact erf, Cerebras-GPT), 'relu' (OPT)
    activation        text NOT NULL DEFAULT 'gelu_new' CHECK (activation IN ('gelu_new', 'gelu', 'relu')),
    -- attention kind per layer, repeated cyclically over the layers: {dense} or {dense,local} ...
    attention_pattern text[] NOT NULL DEFAULT '{dense}'
        CHECK (cardinality(attention_pattern) > 0 AND attention_pattern <@ '{dense,local}'::text[]),
    -- local layers see the last local_window tokens (query included)
    local_window      int CHECK (local_window > 0),
    scale_attn        bool NOT NULL DEFAULT true,   -- scores / sqrt(d_head); GPT-Neo: false
    position_offset   int  NOT NULL DEFAULT 0 CHECK (position_offset >= 0),  -- OPT: 2
    qkv_bias          bool NOT NULL DEFAULT true,   -- GPT-Neo: false
    tied_head         bool NOT NULL DEFAULT true,   -- logits = h · wteᵀ
    padded_vocab      int CHECK (padded_vocab IS NULL OR padded_vocab >= vocab),  -- rows beyond vocab are padding
    ln_placement      text NOT NULL DEFAULT 'pre' CHECK (ln_placement IN ('pre', 'post')),
    ln_eps            float4 NOT NULL DEFAULT 1e-5 CHECK (ln_eps > 0),
    d_embed           int CHECK (d_embed > 0),       -- token embedding width when projected to d_model (OPT-350m)
    -- 'learned' (a wpe table) or 'rotary' (q and k turned by position; GPT-NeoX, GPT-J)
    position_embedding text NOT NULL DEFAULT 'learned' CHECK (position_embedding IN ('learned', 'rotary')),
    rotary_dim        int CHECK (rotary_dim > 0 AND rotary_dim % 2 = 0),  -- rotated dims of each head (Pythia: d_head / 4)
    rotary_base       float4 NOT NULL DEFAULT 10000 CHECK (rotary_base > 0),
    -- which dims turn together: 'halves' (j, j + rotary_dim/2; GPT-NeoX) or 'interleaved' (2j, 2j+1; GPT-J)
    rotary_pairing    text NOT NULL DEFAULT 'halves' CHECK (rotary_pairing IN ('halves', 'interleaved')),
    -- 'sequential' (x += attn(ln_1(x)); x += mlp(ln_2(x))), 'parallel_two_norms' (x += attn(ln_1(x)) + mlp(ln_2(x));
    -- GPT-NeoX), 'parallel_one_norm' (x += attn(ln_1(x)) + mlp(ln_1(x)); GPT-J, no ln_2)
    residual          text NOT NULL DEFAULT 'sequential' CHECK (residual IN ('sequential', 'parallel_two_norms', 'parallel_one_norm')),
    out_proj_bias     bool NOT NULL DEFAULT true,   -- attention output projection bias; GPT-J: false
    head_bias         bool NOT NULL DEFAULT false,  -- output layer bias; GPT-J: true
    -- the precision the model is served in: 'float32', or its matrices in 'bfloat16' / 'float16'
    -- (float32 accumulation; llm_param keeps the float32 master values; llm_set_weight_dtype)
    weight_dtype      text NOT NULL DEFAULT 'float32' CHECK (weight_dtype IN ('float32', 'bfloat16', 'float16')),
    family            text NOT NULL DEFAULT 'gpt3' CHECK (family IN ('gpt3', 'gpt2', 'cerebras', 'opt', 'gpt-neo', 'megatron', 'megatron-v1', 'megatron-v0', 'gpt-neox', 'gptj')),
    version           bigint NOT NULL DEFAULT nextval('@extschema@.llm_model_version_seq'::regclass),  -- changes with every write; keys cached weights
    note              text,
    -- the role that may write the model (and every role with its privileges); see privileges.sql
    owner             name NOT NULL DEFAULT current_user,
    CONSTRAINT local_layers_need_a_window CHECK ('local' <> ALL (attention_pattern) OR local_window IS NOT NULL),
    CONSTRAINT rotary_needs_its_dims CHECK ((position_embedding = 'rotary') = (rotary_dim IS NOT NULL)),
    CONSTRAINT rotary_within_a_head CHECK (rotary_dim IS NULL OR rotary_dim <= d_head),
    CONSTRAINT rotary_has_no_position_offset CHECK (position_embedding = 'learned' OR position_offset = 0),
    CONSTRAINT parallel_residual_needs_pre_ln CHECK (residual = 'sequential' OR ln_placement = 'pre')
);

COMMENT ON TABLE llm_model_config IS 'pg_gpt3 model registry: architecture of each model';

-- GPT-3 paper, Table 2.1 (n_ctx 2048, vocab 50257, d_ff = 4 d_model). The table is
-- inconsistent for 1.3B (24 heads x 128 != 2048) and 13B (40 x 128 != 5140): pg_gpt3 keeps
-- d_head = 128 and the width, i.e. 16 heads for 1.3B (as GPT-Neo 1.3B) and d_model 5120 for
-- 13B (as OPT-13B); see docs/gpt3_family.md. Layers alternate dense and locally banded
-- attention; the paper gives no band width, pg_gpt3 uses GPT-Neo's 256.
INSERT INTO llm_model_config
    (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab,
     attention_pattern, local_window, family, note)
VALUES
    ('gpt3-125m', 12, 12,   768,  64,  3072, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 Small'),
    ('gpt3-350m', 24, 16,  1024,  64,  4096, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 Medium'),
    ('gpt3-760m', 24, 16,  1536,  96,  6144, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 Large'),
    ('gpt3-1.3b', 24, 16,  2048, 128,  8192, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 XL; paper lists 24 heads, see docs'),
    ('gpt3-2.7b', 32, 32,  2560,  80, 10240, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 2.7B'),
    ('gpt3-6.7b', 32, 32,  4096, 128, 16384, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 6.7B'),
    ('gpt3-13b',  40, 40,  5120, 128, 20480, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 13B; paper lists d_model 5140, see docs'),
    ('gpt3-175b', 96, 96, 12288, 128, 49152, 2048, 50257, '{dense,local}', 256, 'gpt3', 'GPT-3 175B ("GPT-3")'),
    ('gpt2-small', 12, 12,  768,  64,  3072, 1024, 50257, '{dense}', NULL, 'gpt2', 'GPT-2 small (pg_gpt2 compatibility)');

-- Every function below pins its search_path (pg_catalog first, pg_temp last), so that objects
-- a session creates (temporary tables, functions or operators in its own schemas) can never
-- stand in for the extension's own; see docs/internal_architecture.md.

-- Raises 42704 for an unknown model, so every caller reports the same clear error.
CREATE FUNCTION llm_get_model_config(model text) RETURNS llm_model_config
LANGUAGE plpgsql STABLE STRICT SET search_path = pg_catalog, @extschema@, pg_temp AS $$
DECLARE
    cfg llm_model_config;
BEGIN
    SELECT * INTO cfg FROM llm_model_config c WHERE c.model = llm_get_model_config.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model "%" is not registered in llm_model_config', model
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT model FROM llm_model_config lists the registered models.';
    END IF;
    RETURN cfg;
END
$$;

-- Any change to a model row gives it a new version so cached weights are reloaded.
CREATE FUNCTION llm_model_config_bump_version() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp AS $$
BEGIN
    NEW.version := nextval('@extschema@.llm_model_version_seq'::regclass);
    RETURN NEW;
END
$$;
CREATE TRIGGER llm_model_config_version BEFORE UPDATE ON llm_model_config
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.* AND OLD.version = NEW.version)
    EXECUTE FUNCTION llm_model_config_bump_version();

-- Parameters: one row per parameter tensor and chunk. A tensor larger than one bytea value
-- (1 GB; the 175B embedding is 2.5 GB) is split into chunks of whole elements in row-major
-- order; most tensors have only chunk 0. Gradient and AdamW moments sit beside the weights.
CREATE TABLE llm_param (
    model       text   NOT NULL REFERENCES llm_model_config (model) ON DELETE CASCADE ON UPDATE CASCADE,
    name        text   NOT NULL,            -- canonical name, e.g. 'layers.0.attn.q_proj.weight'
    chunk       int    NOT NULL DEFAULT 0 CHECK (chunk >= 0),
    shape       int[]  NOT NULL CHECK (cardinality(shape) BETWEEN 1 AND 4 AND 0 < ALL (shape)),
    elem_offset bigint NOT NULL DEFAULT 0 CHECK (elem_offset >= 0),  -- first element held by this chunk
    data        bytea  NOT NULL,            -- little-endian float32
    grad        bytea,
    m           bytea,                      -- AdamW first moment
    v           bytea,                      -- AdamW second moment
    step        int    NOT NULL DEFAULT 0,  -- optimizer steps applied
    PRIMARY KEY (model, name, chunk),
    CHECK (length(data) % 4 = 0)
);
-- Float32 weights do not compress: skip the attempt on every write and read.
ALTER TABLE llm_param ALTER COLUMN data SET STORAGE EXTERNAL;
ALTER TABLE llm_param ALTER COLUMN grad SET STORAGE EXTERNAL;
ALTER TABLE llm_param ALTER COLUMN m SET STORAGE EXTERNAL;
ALTER TABLE llm_param ALTER COLUMN v SET STORAGE EXTERNAL;
-- Every training call and import rewrites a whole model's rows: hundreds of MB of TOAST per
-- write, in a table of a few hundred rows. Autovacuum's default cost throttling cannot keep up
-- with that, and the dead TOAST piles up (tens of GB after a day of training). Vacuuming this
-- table unthrottled, as soon as a tenth of its rows are dead, keeps it near two copies of its
-- models (space freed by one write is reused by the next).
ALTER TABLE llm_param SET (
    autovacuum_vacuum_scale_factor = 0.1, autovacuum_vacuum_cost_delay = 0,
    toast.autovacuum_vacuum_scale_factor = 0.1, toast.autovacuum_vacuum_cost_delay = 0);

-- Parameter sharing (llm_share_param, sharing.sql): the model's tensor `name` is the source
-- model's tensor `source_name`, stored once, in the source's rows. The target keeps no rows of
-- its own for it. A source model cannot be deleted while another model shares from it.
CREATE TABLE llm_param_share (
    model        text NOT NULL REFERENCES llm_model_config (model) ON DELETE CASCADE ON UPDATE CASCADE,
    name         text NOT NULL,
    source_model text NOT NULL REFERENCES llm_model_config (model) ON UPDATE CASCADE,
    source_name  text NOT NULL,
    PRIMARY KEY (model, name)
);
CREATE INDEX llm_param_share_source ON llm_param_share (source_model, source_name);

-- Every model's tensors as it reads them: its own rows and the rows it shares, with where each
-- is stored. pg_llm reads parameters through this view; writes go to the stored rows.
CREATE VIEW llm_param_resolved WITH (security_invoker = true) AS
SELECT p.model, p.name, p.chunk, p.shape, p.elem_offset, p.data, p.grad, p.m, p.v, p.step,
       p.model AS stored_model, p.name AS stored_name
  FROM llm_param p
UNION ALL
SELECT s.model, s.name, p.chunk, p.shape, p.elem_offset, p.data, p.grad, p.m, p.v, p.step,
       p.model, p.name
  FROM llm_param_share s
  JOIN llm_param p ON p.model = s.source_model AND p.name = s.source_name;

-- Any write to a model's parameters, through pg_llm or by hand, gives the model a new version.
-- Row-level, not statement-level with transition tables: a transition table would copy every
-- written row, weights included, into a tuplestore (doubling the cost of writing a model).
CREATE FUNCTION llm_param_bump_version() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE @extschema@.llm_model_config SET version = nextval('@extschema@.llm_model_version_seq'::regclass);
    ELSIF TG_OP = 'UPDATE' AND OLD.model IS DISTINCT FROM NEW.model THEN
        UPDATE @extschema@.llm_model_config SET version = nextval('@extschema@.llm_model_version_seq'::regclass)
         WHERE model IN (OLD.model, NEW.model);
    ELSIF TG_TABLE_NAME = 'llm_param_share' THEN
        -- a share made, changed or ended: the target reads other values
        UPDATE @extschema@.llm_model_config SET version = nextval('@extschema@.llm_model_version_seq'::regclass)
         WHERE model = CASE TG_OP WHEN 'DELETE' THEN OLD.model ELSE NEW.model END;
    ELSE
        -- the model, and every model that shares the written tensor
        UPDATE @extschema@.llm_model_config SET version = nextval('@extschema@.llm_model_version_seq'::regclass)
         WHERE model = CASE TG_OP WHEN 'DELETE' THEN OLD.model ELSE NEW.model END
            OR model IN (SELECT s.model FROM @extschema@.llm_param_share s
                          WHERE s.source_model = CASE TG_OP WHEN 'DELETE' THEN OLD.model ELSE NEW.model END
                            AND s.source_name = CASE TG_OP WHEN 'DELETE' THEN OLD.name ELSE NEW.name END);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER llm_param_version AFTER INSERT OR UPDATE OR DELETE ON llm_param
    FOR EACH ROW EXECUTE FUNCTION llm_param_bump_version();
CREATE TRIGGER llm_param_version_truncate AFTER TRUNCATE ON llm_param
    FOR EACH STATEMENT EXECUTE FUNCTION llm_param_bump_version();
CREATE TRIGGER llm_param_share_version AFTER INSERT OR UPDATE OR DELETE ON llm_param_share
    FOR EACH ROW EXECUTE FUNCTION llm_param_bump_version();
-- Versions must change with every write, also when rows arrive by logical replication or a
-- restore that runs with session_replication_role = replica.
ALTER TABLE llm_model_config ENABLE ALWAYS TRIGGER llm_model_config_version;
ALTER TABLE llm_param ENABLE ALWAYS TRIGGER llm_param_version;
ALTER TABLE llm_param ENABLE ALWAYS TRIGGER llm_param_version_truncate;
ALTER TABLE llm_param_share ENABLE ALWAYS TRIGGER llm_param_share_version;

-- One row per tensor, for people and tools that do not care about chunks.
CREATE VIEW llm_param_info AS
SELECT model, name, max(shape) AS shape,
       sum(length(data))::bigint / 4 AS numel,
       count(*)::int AS chunks,
       bool_and(grad IS NOT NULL) AS has_grad,
       bool_and(m IS NOT NULL AND v IS NOT NULL) AS has_adam_state,
       max(step) AS step
  FROM llm_param
 GROUP BY model, name;
