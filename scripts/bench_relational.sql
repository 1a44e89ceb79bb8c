-- The relational path against the native one, side by side in one run: the forward of a model
-- composed from SQL kernels (llm_forward_gpt3) vs llm_logits, the same forward recorded on the
-- autograd tape, llm_backprop over it vs the native backward (llm_grads, which runs forward
-- and backward), and llm_accumulate_grads. Best of three runs each, in milliseconds.
--
--   psql "$PG_GPT3_DSN" -v model=gpt3-125m -v tokens=64 -f scripts/bench_relational.sql
--
-- The model must have parameters (SELECT llm_init_params('gpt3-125m') for random ones). The
-- script writes llm_param.grad of that model (llm_accumulate_grads) and clears it at the end.
\set ON_ERROR_STOP on
\if :{?model}
\else
\set model gpt3-125m
\endif
\if :{?tokens}
\else
\set tokens 64
\endif
SET client_min_messages = warning;
CREATE TEMP TABLE bench_seq AS
SELECT array(SELECT (i * 7919) % 50000 FROM generate_series(1, :tokens) i) AS tokens,
       array(SELECT (i * 7919 + 7919) % 50000 FROM generate_series(1, :tokens) i) AS targets;

CREATE FUNCTION pg_temp.ms(q text, tries int DEFAULT 3) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    best float8;
    t0 timestamptz;
BEGIN
    FOR i IN 1 .. tries LOOP
        t0 := clock_timestamp();
        EXECUTE q;
        best := least(best, extract(epoch FROM clock_timestamp() - t0) * 1000);
    END LOOP;
    RETURN round(best::numeric, 1);
END $$;

-- warm the weight cache first
SELECT length(llm_logits(tokens, :'model')) > 0 AS warmed FROM bench_seq;

CREATE TEMP TABLE bench (step text, native_ms float8, relational_ms float8);
INSERT INTO bench SELECT 'forward (logits of every position)',
    pg_temp.ms(format('SELECT llm_logits(%L, %L)', tokens, :'model')),
    pg_temp.ms(format('SELECT llm_forward_gpt3(%L, %L)', :'model', tokens))
  FROM bench_seq;
INSERT INTO bench SELECT 'forward + loss, recorded on the tape',
    pg_temp.ms(format('SELECT llm_loss(%L, %L, %L)', :'model', tokens, targets)),
    pg_temp.ms(format($q$SELECT llm_tape_reset(), set_config('pg_llm.autograd', 'on', false),
                             pg_llm_cross_entropy_mean(llm_forward_gpt3(%L, %L), %L)$q$,
                      :'model', tokens, targets), 1)
  FROM bench_seq;
INSERT INTO bench SELECT 'backward (native: forward + backward)',
    pg_temp.ms(format('SELECT count(*) FROM llm_grads(%L, %L, %L)', :'model', tokens, targets)),
    pg_temp.ms('SELECT llm_backprop((SELECT max(output) FROM llm_tape))')
  FROM bench_seq;
INSERT INTO bench SELECT 'gradients into llm_param.grad', NULL,
    pg_temp.ms(format('SELECT llm_accumulate_grads(%L)', :'model'), 1);
RESET pg_llm.autograd;
SELECT llm_tape_reset();
UPDATE llm_param SET grad = NULL WHERE model = :'model' AND grad IS NOT NULL;

\pset footer off
SELECT :'model' AS model, :tokens AS tokens, step, native_ms, relational_ms,
       round((relational_ms / native_ms)::numeric, 1) AS ratio
  FROM bench;
