-- AdamW, gradient clipping and the GPT-3 learning-rate schedule.
\pset footer off
CREATE FUNCTION pg_temp.r(a float4[], places int DEFAULT 6) RETURNS numeric[]
    LANGUAGE sql IMMUTABLE AS $$ SELECT array(SELECT round(v::numeric, places) FROM unnest(a) v) $$;

-- First AdamW step: m = (1-b1) g, v = (1-b2) g^2, and the bias-corrected update is
-- lr * g / (|g| + eps) after decoupled decay w * (1 - lr * wd).
WITH s AS (SELECT pg_llm_adamw_step(pg_llm_from_array('{1,-2,0.5}'), pg_llm_from_array('{0.5,-0.25,0}'),
                                    pg_llm_from_array('{0,0,0}'), pg_llm_from_array('{0,0,0}'),
                                    0.1, 0.9, 0.95, 1e-8, 0.1, 1) st)
SELECT pg_temp.r(pg_llm_to_array((st).weight)) AS weight,
       pg_temp.r(array[1 * 0.99 - 0.1, -2 * 0.99 + 0.1, 0.5 * 0.99]::float4[]) AS expected_weight,
       pg_temp.r(pg_llm_to_array((st).m)) AS m,
       pg_temp.r(pg_llm_to_array((st).v)) AS v
  FROM s;

-- Ten steps with a constant gradient, chained in SQL, against the closed form of Adam's moments
WITH RECURSIVE steps(step, w, m, v) AS (
    SELECT 0, pg_llm_from_array('{1}'), pg_llm_from_array('{0}'), pg_llm_from_array('{0}')
  UNION ALL
    SELECT step + 1, (s).weight, (s).m, (s).v
      FROM (SELECT step, pg_llm_adamw_step(w, pg_llm_from_array('{0.2}'), m, v, 0.01, 0.9, 0.95, 1e-8, 0, step + 1) s
              FROM steps WHERE step < 10) q)
-- with a constant gradient g, m_hat = g and v_hat = g^2 at every step: each update is lr * g/|g|
SELECT round((pg_llm_to_array(w))[1]::numeric, 5) AS w_after_10, round((1 - 10 * 0.01)::numeric, 5) AS expected
  FROM steps WHERE step = 10;

-- Gradient clipping to an L2 norm of 1 (PyTorch's coefficient max_norm / (norm + 1e-6))
SELECT pg_temp.r(pg_llm_to_array(pg_llm_grad_clip(pg_llm_from_array('{3,4}'), 1.0))) AS clipped,
       pg_temp.r(pg_llm_to_array(pg_llm_grad_clip(pg_llm_from_array('{0.3,0.4}'), 1.0))) AS unchanged,
       round(pg_llm_norm(pg_llm_from_array('{3,4}'))::numeric, 6) AS norm;

-- GPT-3 schedule: warmup 10, total 110, lr_max 6e-4, decays to 10 % (6e-5)
SELECT step, round(pg_llm_lr_schedule(step, 10, 110, 6e-4)::numeric, 8) AS lr,
       round((CASE WHEN step < 10 THEN 6e-4 * step / 10
                   ELSE 6e-5 + 0.5 * (6e-4 - 6e-5) * (1 + cos(pi() * least(step - 10, 100) / 100.0)) END)::numeric, 8)
         AS expected
  FROM unnest(ARRAY[0, 1, 5, 10, 35, 60, 85, 110, 200]) step;

-- no warmup, and a custom floor
SELECT round(pg_llm_lr_schedule(0, 0, 100, 1.0)::numeric, 6) AS at_start,
       round(pg_llm_lr_schedule(100, 0, 100, 1.0, 0.0)::numeric, 6) AS to_zero;
