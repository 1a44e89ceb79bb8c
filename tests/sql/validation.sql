-- Bad input: every case is an SQL ERROR with a precise SQLSTATE and a message naming the
-- argument; the backend survives all of them (the last query proves it).
\pset footer off
\pset format unaligned
\pset fieldsep ' | '
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- How an error looks to a psql user:
SELECT pg_llm_matmul(pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{1,2}'), 2, 2, 1);

SELECT label, pg_temp.err(q) AS outcome FROM (VALUES
  -- lengths and dimensions
  ('ragged bytea',        $$SELECT pg_llm_gelu('\x0000803f00'::bytea)$$),
  ('a shorter than m*k',  $$SELECT pg_llm_matmul(pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{1,2}'), 2, 2, 1)$$),
  ('b longer than k*n',   $$SELECT pg_llm_matmul(pg_llm_from_array('{1,2}'), pg_llm_from_array('{1,2,3}'), 1, 2, 1)$$),
  ('zero dimension',      $$SELECT pg_llm_matmul(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), 0, 1, 1)$$),
  ('negative dimension',  $$SELECT pg_llm_matmul(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), 1, 1, -5)$$),
  ('overflowing m*k',     $$SELECT pg_llm_matmul(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), 2147483647, 2147483647, 1)$$),
  ('absurd transpose',    $$SELECT pg_llm_transpose(pg_llm_from_array('{1}'), 100000, 100000)$$),
  ('transpose mismatch',  $$SELECT pg_llm_transpose(pg_llm_from_array('{1,2,3}'), 2, 2)$$),
  ('add mismatch',        $$SELECT pg_llm_add(pg_llm_from_array('{1,2,3,4}'), pg_llm_from_array('{1,2,3}'))$$),
  ('add empty bias',      $$SELECT pg_llm_add(pg_llm_from_array('{1,2}'), ''::bytea)$$),
  ('layernorm rows',      $$SELECT pg_llm_layernorm(pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{1,1}'), pg_llm_from_array('{0,0}'), 1e-5)$$),
  ('layernorm beta',      $$SELECT pg_llm_layernorm(pg_llm_from_array('{1,2}'), pg_llm_from_array('{1,1}'), pg_llm_from_array('{0}'), 1e-5)$$),
  ('layernorm eps 0',     $$SELECT pg_llm_layernorm(pg_llm_from_array('{1,2}'), pg_llm_from_array('{1,1}'), pg_llm_from_array('{0,0}'), 0)$$),
  ('softmax cols',        $$SELECT pg_llm_softmax(pg_llm_from_array('{1,2,3}'), 2)$$),
  ('softmax all -inf',    $$SELECT pg_llm_softmax(pg_llm_from_array('{-Infinity,-Infinity}'))$$),
  ('softmax_backward',    $$SELECT pg_llm_softmax_backward(pg_llm_from_array('{0.5,0.5}'), pg_llm_from_array('{1}'))$$),
  ('attention D % heads', $$SELECT pg_llm_attention(pg_llm_from_array('{1,2,3}'), pg_llm_from_array(array_fill(0::float4, ARRAY[27])), pg_llm_from_array('{0,0,0,0,0,0,0,0,0}'), pg_llm_from_array(array_fill(0::float4, ARRAY[9])), pg_llm_from_array('{0,0,0}'), 2, 1, 3)$$),
  ('attention w_qkv',     $$SELECT pg_llm_attention(pg_llm_from_array('{1,2}'), pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{0,0,0,0,0,0}'), pg_llm_from_array('{1,0,0,1}'), pg_llm_from_array('{0,0}'), 1, 1, 2)$$),
  ('attention grad_output', $$SELECT pg_llm_attention_backward(pg_llm_from_array('{1,2}'), pg_llm_from_array(array_fill(0::float4, ARRAY[12])), pg_llm_from_array('{0,0,0,0,0,0}'), pg_llm_from_array('{1,0,0,1}'), pg_llm_from_array('{0,0}'), pg_llm_from_array('{1}'), 1, 1, 2)$$),
  ('adamw lengths',       $$SELECT pg_llm_adamw_step(pg_llm_from_array('{1,2}'), pg_llm_from_array('{1}'), pg_llm_from_array('{0,0}'), pg_llm_from_array('{0,0}'), 0.1, 0.9, 0.95, 1e-8, 0, 1)$$),
  ('adamw step 0',        $$SELECT pg_llm_adamw_step(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), pg_llm_from_array('{0}'), pg_llm_from_array('{0}'), 0.1, 0.9, 0.95, 1e-8, 0, 0)$$),
  ('adamw beta2 = 1',     $$SELECT pg_llm_adamw_step(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), pg_llm_from_array('{0}'), pg_llm_from_array('{0}'), 0.1, 0.9, 1, 1e-8, 0, 1)$$),
  ('adamw negative v',    $$SELECT pg_llm_adamw_step(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), pg_llm_from_array('{0}'), pg_llm_from_array('{-1}'), 0.1, 0.9, 0.95, 1e-8, 0, 1)$$),
  ('grad_clip 0',         $$SELECT pg_llm_grad_clip(pg_llm_from_array('{1}'), 0)$$),
  ('lr total < warmup',   $$SELECT pg_llm_lr_schedule(1, 10, 5, 6e-4)$$),
  ('lr negative step',    $$SELECT pg_llm_lr_schedule(-1, 10, 100, 6e-4)$$),
  ('dropout p > 1',       $$SELECT pg_llm_dropout(pg_llm_from_array('{1}'), 1.5, true)$$),
  ('dropout_backward len', $$SELECT pg_llm_dropout_backward(pg_llm_from_array('{1,2}'), pg_llm_from_array('{1}'), pg_llm_from_array('{1,2}'), 0.5, true)$$),
  ('ce target range',     $$SELECT pg_llm_cross_entropy(pg_llm_from_array('{1,2,3}'), 3)$$),
  ('ce negative target',  $$SELECT pg_llm_cross_entropy_backward(pg_llm_from_array('{1,2,3}'), -1)$$),
  ('ce empty logits',     $$SELECT pg_llm_cross_entropy(''::bytea, 0)$$),
  ('sample temperature',  $$SELECT pg_llm_sample(pg_llm_from_array('{1,2}'), -1, 0, 1)$$),
  ('sample topk',         $$SELECT pg_llm_sample(pg_llm_from_array('{1,2}'), 1, -3, 1)$$),
  ('sample topp',         $$SELECT pg_llm_sample(pg_llm_from_array('{1,2}'), 1, 0, 1.5)$$),
  ('sample vocab rows',   $$SELECT pg_llm_sample(pg_llm_from_array('{1,2,3}'), 1, 0, 1, 1, 2)$$),
  -- NaN / infinity policy: rejected in every tensor; -Infinity allowed only in logits
  -- (pg_llm_from_array converts faithfully, NaN included; the kernels validate)
  ('NaN in matmul a',     $$SELECT pg_llm_matmul(pg_llm_from_array('{1,NaN}'), pg_llm_from_array('{1,1}'), 1, 2, 1)$$),
  -- (a product's operands are checked through its result: infinity times zero is still found)
  ('Infinity in matmul b', $$SELECT pg_llm_matmul(pg_llm_from_array('{0,0,0,0}'), pg_llm_from_array('{0,0,0,-Infinity}'), 2, 2, 2)$$),
  ('NaN in linear w',     $$SELECT pg_llm_linear(pg_llm_from_array('{1,2}'), pg_llm_from_array('{0,0,NaN,0}'), NULL, 1, 2, 2)$$),
  ('Infinity in linear b', $$SELECT pg_llm_linear(pg_llm_from_array('{1,2}'), pg_llm_from_array('{0,0,0,0}'), pg_llm_from_array('{0,Infinity}'), 1, 2, 2)$$),
  ('NaN as raw bytes',    $$SELECT pg_llm_gelu('\x0000803f0000c07f'::bytea)$$),
  ('Infinity in weight',  $$SELECT pg_llm_layernorm(pg_llm_from_array('{1,2}'), pg_llm_from_array('{Infinity,1}'), pg_llm_from_array('{0,0}'), 1e-5)$$),
  ('-Infinity in weight', $$SELECT pg_llm_add(pg_llm_from_array('{1,2}'), pg_llm_from_array('{-Infinity}'))$$),
  ('NaN in logits',       $$SELECT pg_llm_sample(pg_llm_from_array('{1,NaN}'), 1, 0, 1)$$),
  ('+Infinity in logits', $$SELECT pg_llm_softmax(pg_llm_from_array('{1,Infinity}'))$$),
  ('NaN gradient',        $$SELECT pg_llm_grad_clip(pg_llm_from_array('{1,NaN}'), 1)$$),
  ('NaN scalar',          $$SELECT pg_llm_layernorm(pg_llm_from_array('{1,2}'), pg_llm_from_array('{1,1}'), pg_llm_from_array('{0,0}'), 'NaN')$$),
  ('overflowing result',  $$SELECT pg_llm_add(pg_llm_from_array('{3e38}'), pg_llm_from_array('{3e38}'))$$),
  ('overflowing matmul',  $$SELECT pg_llm_matmul(pg_llm_from_array('{1e30}'), pg_llm_from_array('{1e30}'), 1, 1, 1)$$),
  ('overflowing linear',  $$SELECT pg_llm_linear(pg_llm_from_array('{3e38,3e38}'), pg_llm_from_array('{3e38,3e38}'), NULL, 1, 2, 1)$$),
  -- NULLs are errors, not silent NULL results
  ('NULL tensor',         $$SELECT pg_llm_matmul(NULL, pg_llm_from_array('{1}'), 1, 1, 1)$$),
  ('NULL dimension',      $$SELECT pg_llm_matmul(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), 1, NULL, 1)$$),
  ('NULL in array',       $$SELECT pg_llm_from_array('{1,NULL}')$$),
  ('NULL training flag',  $$SELECT pg_llm_dropout(pg_llm_from_array('{1}'), 0.5, NULL)$$)
) AS cases(label, q);

-- Finite inputs near float32's limits: the right finite answer where one exists (LayerNorm
-- statistics in float64), otherwise 22003 -- never NaN, infinity or a silently wrong value
SELECT pg_llm_to_array(pg_llm_layernorm(pg_llm_from_array('{3e38,3e38}'), pg_llm_from_array('{1,1}'),
                                        pg_llm_from_array('{0.5,-0.5}'), 1e-5)) AS equal_huge_values_give_beta,
       pg_llm_to_array(pg_llm_layernorm(pg_llm_from_array('{2e38,-2e38,1}'), pg_llm_from_array('{1,1,1}'),
                                        pg_llm_from_array('{0,0,0}'), 1e-5))::numeric(6,4)[] AS huge_values_normalise,
       pg_llm_to_array(pg_llm_gelu_backward(pg_llm_from_array('{0}'), pg_llm_from_array('{3.4e38}'))) AS gelu_grad_at_zero;
SELECT label, pg_temp.err(q) AS outcome FROM (VALUES
  ('gelu_backward',       $$SELECT pg_llm_gelu_backward(pg_llm_from_array('{1}'), pg_llm_from_array('{3.4e38}'))$$),
  ('softmax_backward',    $$SELECT pg_llm_softmax_backward(pg_llm_from_array('{3e38,1}'), pg_llm_from_array('{3e38,1}'))$$),
  ('dropout',             $$SELECT pg_llm_dropout(pg_llm_from_array('{3e38}'), 0.5, true, 1)$$),
  ('adamw huge grad',     $$SELECT pg_llm_adamw_step(pg_llm_from_array('{1}'), pg_llm_from_array('{3e38}'), pg_llm_from_array('{0}'), pg_llm_from_array('{0}'), 0.1, 0.9, 0.95, 1e-8, 0, 1)$$),
  ('attention_backward',  $$SELECT pg_llm_attention_backward(pg_llm_from_array('{3e38}'), pg_llm_from_array('{1,1,1}'), pg_llm_from_array('{0,0,0}'), pg_llm_from_array('{1}'), pg_llm_from_array('{0}'), pg_llm_from_array('{1}'), 1, 1, 1)$$),
  ('cross_entropy',       $$SELECT pg_llm_cross_entropy(pg_llm_from_array('{3e38,-3e38}'), 1)$$),
  ('layernorm output',    $$SELECT pg_llm_layernorm(pg_llm_from_array('{3e38,-3e38}'), pg_llm_from_array('{3e38,3e38}'), pg_llm_from_array('{3e38,3e38}'), 1e-5)$$)
) AS cases(label, q);

SELECT 'backend alive' AS status;
