-- Backward kernels, checked against closed forms and against central finite differences of
-- the forward kernels, computed in SQL.
\pset footer off
CREATE FUNCTION pg_temp.r(a float4[], places int DEFAULT 4) RETURNS numeric[]
    LANGUAGE sql IMMUTABLE AS $$ SELECT array(SELECT round(v::numeric, places) FROM unnest(a) v) $$;
CREATE FUNCTION pg_temp.dot(a float4[], b float4[]) RETURNS float8
    LANGUAGE sql IMMUTABLE AS $$ SELECT sum(x::float8 * y) FROM unnest(a, b) u(x, y) $$;
-- a copy of a with element i (1-based) moved by h
CREATE FUNCTION pg_temp.bump(a float4[], i int, h float8) RETURNS float4[]
    LANGUAGE sql IMMUTABLE AS $$ SELECT a[:i - 1] || (a[i] + h)::float4 || a[i + 1:] $$;

-- cross-entropy backward = softmax(logits) - onehot(target)
SELECT pg_temp.r(pg_llm_to_array(pg_llm_cross_entropy_backward(pg_llm_from_array('{1,2,3}'), 1))) AS dlogits,
       pg_temp.r(array(SELECT (exp(v) / (exp(1) + exp(2) + exp(3)) - (v = 2)::int)::float4 FROM unnest('{1,2,3}'::int[]) v))
         AS expected;

-- softmax backward = y * (dy - sum(y * dy))
WITH s AS (SELECT pg_llm_softmax(pg_llm_from_array('{0.5,1,-1,2}')) y, '{1,0,0,0}'::float4[] dy)
SELECT pg_temp.r(pg_llm_to_array(pg_llm_softmax_backward(s.y, pg_llm_from_array(s.dy)))) AS dx,
       pg_temp.r(array(SELECT (yv * (g - pg_temp.dot(pg_llm_to_array(s.y), s.dy)))::float4
                         FROM unnest(pg_llm_to_array(s.y), s.dy) u(yv, g))) AS expected
  FROM s;

-- gelu backward against finite differences
WITH x AS (SELECT '{-2,-0.5,0,0.7,3}'::float4[] v)
SELECT pg_temp.r(pg_llm_to_array(pg_llm_gelu_backward(pg_llm_from_array(x.v), pg_llm_ones_like(pg_llm_from_array(x.v))))) AS dgelu,
       pg_temp.r(array(SELECT ((pg_llm_to_array(pg_llm_gelu(pg_llm_from_array(array[xv + 1e-3]::float4[]))))[1]::float8
                              - (pg_llm_to_array(pg_llm_gelu(pg_llm_from_array(array[xv - 1e-3]::float4[]))))[1]) / 2e-3
                         FROM unnest(x.v) xv)::float4[], 3) AS finite_difference
  FROM x;

-- layernorm backward: dbeta = column sums of dy; dx and dgamma against finite differences of
-- L = sum(layernorm(x) * w)
CREATE FUNCTION pg_temp.ln_loss(x float4[], g float4[], w float4[]) RETURNS float8 LANGUAGE sql AS $$
    SELECT pg_temp.dot(pg_llm_to_array(pg_llm_layernorm(pg_llm_from_array(x), pg_llm_from_array(g),
                                                        pg_llm_from_array('{0,0,0}'), 1e-5)), w) $$;
WITH d AS (SELECT '{0.3,-1.2,2.0, 1.5,0.1,-0.4}'::float4[] x, '{1.0,0.5,-2.0}'::float4[] g,
                  '{0.2,-0.7,1.1, 0.9,0.4,-0.3}'::float4[] w),
     grads AS (SELECT (pg_llm_layernorm_backward(pg_llm_from_array(d.x), pg_llm_from_array(d.w),
                                                 pg_llm_from_array(d.g), 1e-5)) AS gr FROM d)
SELECT pg_temp.r(pg_llm_to_array((grads.gr).dbeta)) AS dbeta,
       bool_and(abs((pg_llm_to_array((grads.gr).dx))[i]
                    - (pg_temp.ln_loss(pg_temp.bump(d.x, i, 1e-2), d.g, d.w)
                       - pg_temp.ln_loss(pg_temp.bump(d.x, i, -1e-2), d.g, d.w)) / 2e-2) < 2e-3) AS dx_matches_fd,
       bool_and(i > 3 OR abs((pg_llm_to_array((grads.gr).dgamma))[i]
                    - (pg_temp.ln_loss(d.x, pg_temp.bump(d.g, i, 1e-2), d.w)
                       - pg_temp.ln_loss(d.x, pg_temp.bump(d.g, i, -1e-2), d.w)) / 2e-2) < 2e-3) AS dgamma_matches_fd
  FROM d, grads, generate_series(1, 6) i
 GROUP BY grads.gr;

-- dropout backward routes the gradient through kept elements only, scaled by 1/(1-p)
WITH f AS (SELECT pg_llm_from_array('{1,2,3,4,5,6,7,8}') x,
                  pg_llm_dropout(pg_llm_from_array('{1,2,3,4,5,6,7,8}'), 0.5, true, 11) y)
SELECT pg_llm_to_array(f.y) AS output,
       pg_llm_to_array(pg_llm_dropout_backward(f.x, f.y, pg_llm_ones_like(f.x), 0.5, true)) AS dx,
       pg_llm_to_array(pg_llm_dropout_backward(f.x, f.y, pg_llm_ones_like(f.x), 0.5, false)) AS dx_eval
  FROM f;

-- attention backward: every gradient against central differences of
-- L = sum(attention(x, ...) * w) for T = 3, D = 4, two heads
CREATE FUNCTION pg_temp.attn_loss(x float4[], wqkv float4[], bqkv float4[], wo float4[], bo float4[], w float4[])
RETURNS float8 LANGUAGE sql AS $$
    SELECT pg_temp.dot(pg_llm_to_array(pg_llm_attention(pg_llm_from_array(x), pg_llm_from_array(wqkv),
             pg_llm_from_array(bqkv), pg_llm_from_array(wo), pg_llm_from_array(bo), 2, 3, 4)), w) $$;
CREATE TEMP TABLE attn AS
SELECT array(SELECT sin(i)::float4 FROM generate_series(1, 12) i) x,
       array(SELECT (0.5 * cos(i * 0.7))::float4 FROM generate_series(1, 48) i) wqkv,
       array(SELECT (0.1 * sin(i * 1.3))::float4 FROM generate_series(1, 12) i) bqkv,
       array(SELECT (0.4 * sin(i * 0.9))::float4 FROM generate_series(1, 16) i) wo,
       array(SELECT (0.1 * cos(i))::float4 FROM generate_series(1, 4) i) bo,
       array(SELECT cos(i * 1.7)::float4 FROM generate_series(1, 12) i) w;
CREATE TEMP TABLE attn_grads AS
SELECT pg_llm_attention_backward(pg_llm_from_array(x), pg_llm_from_array(wqkv), pg_llm_from_array(bqkv),
                                 pg_llm_from_array(wo), pg_llm_from_array(bo), pg_llm_from_array(w), 2, 3, 4) g
  FROM attn;
CREATE FUNCTION pg_temp.fd_ok(analytic float4[], which text) RETURNS bool LANGUAGE sql AS $$
    SELECT bool_and(abs(analytic[i] - (
             CASE which
               WHEN 'x'    THEN pg_temp.attn_loss(pg_temp.bump(a.x, i, 1e-2), a.wqkv, a.bqkv, a.wo, a.bo, a.w)
                              - pg_temp.attn_loss(pg_temp.bump(a.x, i, -1e-2), a.wqkv, a.bqkv, a.wo, a.bo, a.w)
               WHEN 'wqkv' THEN pg_temp.attn_loss(a.x, pg_temp.bump(a.wqkv, i, 1e-2), a.bqkv, a.wo, a.bo, a.w)
                              - pg_temp.attn_loss(a.x, pg_temp.bump(a.wqkv, i, -1e-2), a.bqkv, a.wo, a.bo, a.w)
               WHEN 'bqkv' THEN pg_temp.attn_loss(a.x, a.wqkv, pg_temp.bump(a.bqkv, i, 1e-2), a.wo, a.bo, a.w)
                              - pg_temp.attn_loss(a.x, a.wqkv, pg_temp.bump(a.bqkv, i, -1e-2), a.wo, a.bo, a.w)
               WHEN 'wo'   THEN pg_temp.attn_loss(a.x, a.wqkv, a.bqkv, pg_temp.bump(a.wo, i, 1e-2), a.bo, a.w)
                              - pg_temp.attn_loss(a.x, a.wqkv, a.bqkv, pg_temp.bump(a.wo, i, -1e-2), a.bo, a.w)
               ELSE             pg_temp.attn_loss(a.x, a.wqkv, a.bqkv, a.wo, pg_temp.bump(a.bo, i, 1e-2), a.w)
                              - pg_temp.attn_loss(a.x, a.wqkv, a.bqkv, a.wo, pg_temp.bump(a.bo, i, -1e-2), a.w)
             END) / 2e-2) < 1e-3 + 1e-2 * abs(analytic[i]))
      FROM attn a, generate_series(1, cardinality(analytic)) i $$;
SELECT pg_temp.fd_ok(pg_llm_to_array((g).dx), 'x') AS dx,
       pg_temp.fd_ok(pg_llm_to_array((g).dw_qkv), 'wqkv') AS dw_qkv,
       pg_temp.fd_ok(pg_llm_to_array((g).db_qkv), 'bqkv') AS db_qkv,
       pg_temp.fd_ok(pg_llm_to_array((g).dw_o), 'wo') AS dw_o,
       pg_temp.fd_ok(pg_llm_to_array((g).db_o), 'bo') AS db_o,
       pg_temp.r(pg_llm_to_array((g).db_o)) AS db_o_values
  FROM attn_grads;
