-- Forward kernels, each compared with the same quantity computed independently in plain SQL
-- (float8 arithmetic over float4[] arrays). Values are rounded so the file is portable.
\pset footer off
CREATE FUNCTION pg_temp.r(a float4[], places int DEFAULT 4) RETURNS numeric[]
    LANGUAGE sql IMMUTABLE AS $$ SELECT array(SELECT round(v::numeric, places) FROM unnest(a) v) $$;
-- true when two float arrays agree elementwise within tol
CREATE FUNCTION pg_temp.close(a float4[], b float8[], tol float8 DEFAULT 1e-5) RETURNS bool
    LANGUAGE sql IMMUTABLE AS $$
    SELECT cardinality(a) = cardinality(b)
       AND bool_and(abs(x - y) <= tol * (1 + abs(y)))
      FROM unnest(a, b) AS u(x, y) $$;

-- matmul: [2,3]·[3,2]
SELECT pg_llm_to_array(pg_llm_matmul(pg_llm_from_array('{1,2,3,4,5,6}'),
                                     pg_llm_from_array('{7,8,9,10,11,12}'), 2, 3, 2)) AS c;

-- matmul [5,7]·[7,9] against a SQL triple loop
WITH a AS (SELECT array_agg(sin(i)::float4 ORDER BY i) v FROM generate_series(1, 35) i),
     b AS (SELECT array_agg(cos(i)::float4 ORDER BY i) v FROM generate_series(1, 63) i),
     expect AS (
       SELECT array_agg(s ORDER BY i, j) v FROM (
         SELECT i, j, sum(a.v[i * 7 + p + 1]::float8 * b.v[p * 9 + j + 1]) s
           FROM a, b, generate_series(0, 4) i, generate_series(0, 8) j, generate_series(0, 6) p
          GROUP BY i, j) t)
SELECT pg_temp.close(pg_llm_to_array(pg_llm_matmul(pg_llm_from_array(a.v), pg_llm_from_array(b.v), 5, 7, 9)),
                     expect.v) AS matmul_matches_sql
  FROM a, b, expect;

-- the small-m path (m <= 4) used for decoding: [2,5]·[5,6000]
WITH a AS (SELECT array_agg((i % 5 - 2)::float4 ORDER BY i) v FROM generate_series(0, 9) i),
     b AS (SELECT array_agg(((i % 13) * 0.25)::float4 ORDER BY i) v FROM generate_series(0, 29999) i),
     expect AS (
       SELECT array_agg(s ORDER BY i, j) v FROM (
         SELECT i, j, sum(a.v[i * 5 + p + 1]::float8 * b.v[p * 6000 + j + 1]) s
           FROM a, b, generate_series(0, 1) i, generate_series(0, 5999) j, generate_series(0, 4) p
          GROUP BY i, j) t)
SELECT pg_temp.close(pg_llm_to_array(pg_llm_matmul(pg_llm_from_array(a.v), pg_llm_from_array(b.v), 2, 5, 6000)),
                     expect.v) AS small_m_matches_sql
  FROM a, b, expect;

-- add: same length, and a bias broadcast over rows
SELECT pg_llm_to_array(pg_llm_add(pg_llm_from_array('{1,2,3,4}'), pg_llm_from_array('{10,20,30,40}'))) AS sum,
       pg_llm_to_array(pg_llm_add(pg_llm_from_array('{1,2,3,4,5,6}'), pg_llm_from_array('{100,200,300}'))) AS bias;

-- gelu (tanh approximation) against its formula
WITH x AS (SELECT array_agg(v::float4 ORDER BY v) v FROM generate_series(-3, 3, 0.5) v)
SELECT pg_temp.r(pg_llm_to_array(pg_llm_gelu(pg_llm_from_array(x.v)))) AS gelu,
       pg_temp.close(pg_llm_to_array(pg_llm_gelu(pg_llm_from_array(x.v))),
                     array(SELECT 0.5 * v * (1 + tanh(sqrt(2 / pi()) * (v + 0.044715 * v ^ 3))) FROM unnest(x.v) v),
                     1e-6) AS gelu_matches_formula
  FROM x;

-- softmax over the whole vector, and row-wise
SELECT pg_temp.r(pg_llm_to_array(pg_llm_softmax(pg_llm_from_array('{1,2,3,4}')))) AS softmax,
       pg_temp.close(pg_llm_to_array(pg_llm_softmax(pg_llm_from_array('{1,2,3,4}'))),
                     array(SELECT exp(v) / (SELECT sum(exp(w)) FROM generate_series(1, 4) w) FROM generate_series(1, 4) v)) AS matches,
       pg_temp.r(pg_llm_to_array(pg_llm_softmax(pg_llm_from_array('{1,2,0,0,5,-Infinity}'), 3))) AS rowwise;

-- layernorm over rows of length 4 (two rows) against mean / population variance
WITH x AS (SELECT '{1,2,3,4, -1,0,5,2}'::float4[] v),
     expect AS (
       SELECT array_agg(((x.v[r * 4 + c + 1] - mu) / sqrt(var + 1e-5)) * g[c + 1] + b[c + 1] ORDER BY r, c) v
         FROM x, generate_series(0, 1) r, generate_series(0, 3) c,
              LATERAL (SELECT avg(x.v[r * 4 + k + 1]) mu, var_pop(x.v[r * 4 + k + 1]) var
                         FROM generate_series(0, 3) k) s,
              (SELECT '{1,0.5,2,1}'::float8[] g, '{0,1,0,-1}'::float8[] b) gb
        GROUP BY ())
SELECT pg_temp.r(pg_llm_to_array(pg_llm_layernorm(pg_llm_from_array(x.v), pg_llm_from_array('{1,0.5,2,1}'),
                                                  pg_llm_from_array('{0,1,0,-1}'), 1e-5))) AS layernorm,
       pg_temp.close(pg_llm_to_array(pg_llm_layernorm(pg_llm_from_array(x.v), pg_llm_from_array('{1,0.5,2,1}'),
                                                      pg_llm_from_array('{0,1,0,-1}'), 1e-5)), expect.v) AS matches
  FROM x, expect;

-- cross-entropy: log-sum-exp minus the target logit
SELECT round(pg_llm_cross_entropy(pg_llm_from_array('{1,2,3}'), 0)::numeric, 5) AS ce,
       round((ln(exp(1) + exp(2) + exp(3)) - 1)::numeric, 5) AS expected;

-- dropout: identity when not training; seeded and inverted-scaled when training
SELECT pg_llm_to_array(pg_llm_dropout(pg_llm_from_array('{1,2,3}'), 0.5)) AS eval_mode,
       pg_llm_dropout(pg_llm_from_array(array_fill(1::float4, ARRAY[1000])), 0.3, true, 42)
         = pg_llm_dropout(pg_llm_from_array(array_fill(1::float4, ARRAY[1000])), 0.3, true, 42) AS seeded,
       (SELECT count(*) FILTER (WHERE v = 0) BETWEEN 240 AND 360 AND bool_and(v = 0 OR abs(v - 1 / 0.7) < 1e-6)
          FROM unnest(pg_llm_to_array(pg_llm_dropout(pg_llm_from_array(array_fill(1::float4, ARRAY[1000])), 0.3, true, 7))) v)
         AS about_30_percent_dropped;

-- ones_like, zeros_like, transpose
SELECT pg_llm_to_array(pg_llm_ones_like(pg_llm_from_array('{5,6,7}'))) AS ones,
       pg_llm_to_array(pg_llm_zeros_like(pg_llm_from_array('{5,6,7}'))) AS zeros,
       pg_llm_to_array(pg_llm_transpose(pg_llm_from_array('{1,2,3,4,5,6}'), 2, 3)) AS transposed;

-- attention: with T = 1 a token attends only to itself, so the block is
-- (x·Wqkv + b)[v part]·Wo + bo; checked in SQL for D = 2, one head.
WITH w AS (SELECT '{0.5,-1}'::float4[] x, '{1,0,0,1,0,0, 0,1,1,0,2,3}'::float4[] wqkv,
                  '{0,0,0,0,0.5,-0.5}'::float4[] bqkv, '{1,2,3,4}'::float4[] wo, '{0.1,0.2}'::float4[] bo),
     v AS (SELECT array[w.x[1] * w.wqkv[5] + w.x[2] * w.wqkv[11] + w.bqkv[5],
                        w.x[1] * w.wqkv[6] + w.x[2] * w.wqkv[12] + w.bqkv[6]]::float8[] v FROM w)
SELECT pg_temp.r(pg_llm_to_array(pg_llm_attention(pg_llm_from_array(w.x), pg_llm_from_array(w.wqkv), pg_llm_from_array(w.bqkv),
                                        pg_llm_from_array(w.wo), pg_llm_from_array(w.bo), 1, 1, 2))) AS attention_t1,
       pg_temp.r(array[v.v[1] * w.wo[1] + v.v[2] * w.wo[3] + w.bo[1], v.v[1] * w.wo[2] + v.v[2] * w.wo[4] + w.bo[2]]::float4[]) AS expected
  FROM w, v;

-- attention over two tokens: token 2 mixes both values with softmax weights of q2·k / sqrt(dh)
WITH w AS (SELECT '{1,0, 0,1}'::float4[] x,
                  -- q = x, k = x, v = x (identity blocks), D = 2, one head
                  '{1,0,1,0,1,0, 0,1,0,1,0,1}'::float4[] wqkv),
     p AS (SELECT exp(0 / sqrt(2)) / (exp(0 / sqrt(2)) + exp(1 / sqrt(2))) p1)
SELECT pg_temp.r(pg_llm_to_array(pg_llm_attention(pg_llm_from_array(w.x), pg_llm_from_array(w.wqkv),
                   pg_llm_zeros_like(pg_llm_from_array('{0,0,0,0,0,0}')), pg_llm_from_array('{1,0,0,1}'),
                   pg_llm_zeros_like(pg_llm_from_array('{0,0}')), 1, 2, 2))) AS attention_t2,
       array[1, 0, round(p.p1::numeric, 4), round((1 - p.p1)::numeric, 4)] AS expected
  FROM w, p;

-- GPT-3's 2048-token context runs (memory stays linear in T)
SELECT length(pg_llm_attention(pg_llm_from_array(array_fill(0.01::float4, ARRAY[2048 * 8])),
                               pg_llm_from_array(array_fill(0.1::float4, ARRAY[8 * 24])),
                               pg_llm_from_array(array_fill(0::float4, ARRAY[24])),
                               pg_llm_from_array(array_fill(0.1::float4, ARRAY[8 * 8])),
                               pg_llm_from_array(array_fill(0::float4, ARRAY[8])), 2, 2048, 8)) / 4 AS values_2048;

-- conversions round-trip exactly, including -Infinity masks
SELECT pg_llm_to_array(pg_llm_from_array('{1.5,-2.25,-Infinity}')) AS round_trip,
       encode(pg_llm_from_array('{1}'), 'hex') AS little_endian_one;
