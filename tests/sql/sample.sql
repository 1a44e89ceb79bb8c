-- Sampling one token from logits.
\pset footer off

-- temperature 0 is argmax (first index on ties)
SELECT pg_llm_sample(pg_llm_from_array('{0.1,2.5,0.3,2.5}'), 0, 50, 0.95) AS greedy;

-- top-k 1 is greedy whatever the temperature
SELECT bool_and(pg_llm_sample(pg_llm_from_array('{0.1,2.5,0.3,1.9}'), 5.0, 1, 1.0) = 1) AS topk1_is_greedy
  FROM generate_series(1, 50);

-- a seed reproduces the draw; different seeds explore
SELECT pg_llm_sample(pg_llm_from_array('{1,1,1,1,1,1,1,1}'), 1.0, 0, 1.0, 123)
         = pg_llm_sample(pg_llm_from_array('{1,1,1,1,1,1,1,1}'), 1.0, 0, 1.0, 123) AS reproducible,
       (SELECT count(DISTINCT pg_llm_sample(pg_llm_from_array('{1,1,1,1,1,1,1,1}'), 1.0, 0, 1.0, s))
          FROM generate_series(1, 200) s) = 8 AS all_tokens_reachable;

-- frequencies follow softmax: p = [0.1, 0.2, 0.7] for logits ln(1), ln(2), ln(7)
SELECT t, round(count(*) / 4000.0, 1) AS freq
  FROM (SELECT pg_llm_sample(pg_llm_from_array(array[0, ln(2), ln(7)]::float4[]), 1.0, 0, 1.0, s) t
          FROM generate_series(1, 4000) s) q
 GROUP BY t ORDER BY t;

-- top-p 0.75 keeps {0.7, 0.2} and never draws the 0.1 token; top-k 2 likewise
SELECT count(*) FILTER (WHERE t = 0) AS drew_excluded_token_topp
  FROM (SELECT pg_llm_sample(pg_llm_from_array(array[0, ln(2), ln(7)]::float4[]), 1.0, 0, 0.75, s) t
          FROM generate_series(1, 2000) s) q;
SELECT count(*) FILTER (WHERE t = 0) AS drew_excluded_token_topk
  FROM (SELECT pg_llm_sample(pg_llm_from_array(array[0, ln(2), ln(7)]::float4[]), 1.0, 2, 1.0, s) t
          FROM generate_series(1, 2000) s) q;

-- -Infinity masks a token out
SELECT bool_and(pg_llm_sample(pg_llm_from_array('{-Infinity,0,-Infinity}'), 1.0, 0, 1.0, s) = 1) AS masked
  FROM generate_series(1, 50) s;

-- with vocab given, [T, vocab] logits (as llm_logits returns) are sampled from the last row
SELECT pg_llm_sample(pg_llm_from_array('{9,0,0, 0,0,9}'), 0, 0, 1.0, NULL, 3) AS last_row_argmax;
