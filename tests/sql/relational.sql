-- The relational path: a GPT-3 forward composed from the SQL kernels (llm_forward_gpt3), the
-- session's autograd tape (pg_llm.autograd, llm_tape, llm_tensor_rt), llm_backprop and
-- llm_accumulate_grads, checked against the native path (llm_logits, llm_loss, llm_grads,
-- llm_train_step), which the inference and training tests check against transformers.
\pset footer off
\getenv srcdir PG_ABS_SRCDIR
\set fixtures :srcdir/fixtures
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
-- largest |a - b| over two float32 tensors, and the largest |b| (the scale it is judged at)
CREATE FUNCTION pg_temp.diff(a bytea, b bytea) RETURNS TABLE (max_diff float8, max_abs float8)
    LANGUAGE sql AS $$
    SELECT max(abs(x::float8 - y)), max(abs(y::float8))
      FROM unnest(pg_llm_to_array(a), pg_llm_to_array(b)) u(x, y) $$;

-- Two transformers fixtures: GPT-2 (dense layers, q/k/v biases, tied head) and GPT-Neo
-- (alternating dense and locally banded layers with a window of 5, no q/k/v biases, no score
-- scaling).
\set cfg `cat :fixtures/models/gpt2/config.json`
\set st `base64 -w0 :fixtures/models/gpt2/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'rel-gpt2', :'cfg') AS params;
\set cfg `cat :fixtures/models/gpt_neo/config.json`
\set st `base64 -w0 :fixtures/models/gpt_neo/model.safetensors`
SELECT pg_llm_import_safetensors_bytes(decode(:'st', 'base64'), 'rel-neo', :'cfg') AS params;
CREATE TEMP TABLE seq (tokens int[], targets int[]);
INSERT INTO seq VALUES ('{17,250,3,99,42,7,311,8,8,120,64,5}', '{250,3,99,42,7,311,8,8,120,64,5,77}');

-- 1. The composed forward gives llm_logits' numbers at every position (within 1e-5).
SELECT m.model, d.max_diff < 1e-5 AS logits_match, d.max_abs > 0.1 AS logits_not_trivial
  FROM (VALUES ('rel-gpt2'), ('rel-neo')) m(model), seq,
       LATERAL pg_temp.diff(llm_forward_gpt3(m.model, seq.tokens), llm_logits(seq.tokens, m.model)) d
 ORDER BY 1;

-- 2. Autograd mode: each kernel call records itself on this session's tape.
SET pg_llm.autograd = on;
SELECT abs(pg_llm_cross_entropy_mean(llm_forward_gpt3('rel-gpt2', tokens), targets)
           - llm_loss('rel-gpt2', tokens, targets)) < 1e-6 AS loss_matches_llm_loss
  FROM seq;
SELECT op, count(*) AS calls FROM llm_tape GROUP BY op ORDER BY op;
SELECT source, count(*) AS tensors FROM llm_tensor_rt GROUP BY source ORDER BY source;
-- the last record is the loss; llm_backprop gives every tensor that depends on a parameter
-- its gradient
SELECT llm_backprop((SELECT output FROM llm_tape ORDER BY id DESC LIMIT 1)) > 0 AS backprop_ran;
-- the tape's parameter gradients (the token embedding summed over its two uses, as input
-- embedding and tied head) against the native backward's
WITH tape AS (SELECT name, pg_llm_to_array(grad) g FROM llm_tensor_rt WHERE source = 'param'),
     summed AS (SELECT name, array_agg(s ORDER BY i) g
                  FROM (SELECT name, i, sum(v)::float4 s FROM tape, unnest(g) WITH ORDINALITY u(v, i)
                         GROUP BY name, i) x GROUP BY name),
     native AS (SELECT n.name, pg_llm_to_array(n.grad) g FROM seq, llm_grads('rel-gpt2', seq.tokens, seq.targets) n)
SELECT count(*) AS params_compared,
       max(abs(a::float8 - b)) < 1e-5 AS grads_match,
       max(abs(b)) > 1e-3 AS grads_not_trivial
  FROM summed JOIN native USING (name), LATERAL unnest(summed.g, native.g) u(a, b);
SELECT (SELECT count(*) FROM llm_grads('rel-gpt2', '{1}', '{2}')) AS native_params,
       (SELECT count(DISTINCT name) FROM llm_tensor_rt WHERE source = 'param') AS tape_params;

-- the same for the locally banded model, through llm_accumulate_grads into llm_param.grad
SELECT llm_tape_reset();
SELECT pg_llm_cross_entropy_mean(llm_forward_gpt3('rel-neo', tokens), targets) > 0 AS loss FROM seq;
SELECT llm_backprop((SELECT max(output) FROM llm_tape), 'rel-neo') > 0 AS backprop_and_accumulate;
SELECT count(*) AS params_compared,
       max(d.max_diff) < 1e-5 AS stored_grads_match,
       max(d.max_abs) > 1e-3 AS grads_not_trivial
  FROM llm_param p, seq, llm_grads('rel-neo', seq.tokens, seq.targets) n,
       LATERAL pg_temp.diff(p.grad, n.grad) d
 WHERE p.model = 'rel-neo' AND p.name = n.name;
-- accumulating again adds (gradient accumulation over micro-batches)
SELECT llm_accumulate_grads('rel-neo') AS params_written;
SELECT max(d.max_diff) < 1e-5 AS doubled
  FROM llm_param p, seq, llm_grads('rel-neo', seq.tokens, seq.targets) n,
       LATERAL pg_temp.diff(p.grad, pg_llm_add(n.grad, n.grad)) d
 WHERE p.model = 'rel-neo' AND p.name = n.name;

-- 3. A one-layer model built step by step: every activation and gradient is a row.
RESET pg_llm.autograd;
SELECT llm_tape_reset();
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab)
VALUES ('rel-one', 1, 2, 8, 4, 16, 8, 13), ('rel-one-native', 1, 2, 8, 4, 16, 8, 13);
SELECT llm_init_params('rel-one', 5), llm_init_params('rel-one-native', 5);
SET pg_llm.autograd = on;
CREATE TEMP TABLE act (step int, what text, value bytea);
INSERT INTO act VALUES (1, 'x = wte[tokens] + wpe[0..3]',
    pg_llm_add(pg_llm_embedding(llm_param_tensor('rel-one', 'wte.weight'), '{3,1,4,1}', 8),
               pg_llm_embedding(llm_param_tensor('rel-one', 'wpe.weight'), '{0,1,2,3}', 8)));
INSERT INTO act SELECT 2, 'x + attention + mlp (llm_block_forward)', llm_block_forward('rel-one', 0, value, 4)
  FROM act WHERE step = 1;
INSERT INTO act SELECT 3, 'logits', pg_llm_linear(
    pg_llm_layernorm(value, llm_param_tensor('rel-one', 'ln_f.weight'), llm_param_tensor('rel-one', 'ln_f.bias'), 1e-5),
    llm_param_tensor('rel-one', 'wte.weight'), NULL, 4, 8, 13)
  FROM act WHERE step = 2;
SELECT step, what, length(value) / 4 AS values, llm_tape_id(value) AS tape_id FROM act ORDER BY step;
SELECT pg_llm_cross_entropy_mean(value, '{1,4,1,5}') AS loss FROM act WHERE step = 3;
SELECT llm_backprop((SELECT max(output) FROM llm_tape), 'rel-one') AS tensors_with_gradients;
-- the gradient of each activation, as rows
SELECT step, round(pg_llm_norm(llm_tape_grad(value))::numeric, 6) > 0 AS has_gradient FROM act ORDER BY step;
SELECT id, op, inputs, output, attrs FROM llm_tape ORDER BY id LIMIT 6;
-- one AdamW step in SQL on the stored gradients (moments start at zero) ...
UPDATE llm_param p
   SET data = (s).weight, m = (s).m, v = (s).v, step = p.step + 1, grad = NULL
  FROM (SELECT name, chunk, pg_llm_adamw_step(data, grad, pg_llm_zeros_like(data), pg_llm_zeros_like(data),
                                              1e-3, 0.9, 0.95, 1e-3, 0.0, 1) AS s
          FROM llm_param WHERE model = 'rel-one') u
 WHERE p.model = 'rel-one' AND p.name = u.name AND p.chunk = u.chunk;
-- ... equals the native step with the same settings (no weight decay, no clipping; an eps
-- of 1e-3 keeps the first step's g/|g| smooth where a gradient is near zero)
RESET pg_llm.autograd;
SELECT llm_train_step('rel-one-native', '{3,1,4,1}', '{1,4,1,5}', 1e-3, 0.9, 0.95, 1e-3, 0.0, 0.0) > 0 AS native_step;
SELECT count(*) AS params_compared, max(d.max_diff) < 1e-6 AS same_weights_after_the_step
  FROM llm_param a JOIN llm_param b ON b.model = 'rel-one-native' AND b.name = a.name AND b.chunk = a.chunk,
       LATERAL pg_temp.diff(a.data, b.data) d
 WHERE a.model = 'rel-one';
SELECT abs(llm_loss('rel-one', '{3,1,4,1}', '{1,4,1,5}') - llm_loss('rel-one-native', '{3,1,4,1}', '{1,4,1,5}')) < 1e-6
       AS same_loss_after_the_step;

-- 4. The backward kernels of the new forward kernels, as SQL functions, against closed forms.
-- linear: dx = dy · w, dw = dyᵀ · x, db = column sums of dy  (x [2,3], w [4,3], dy [2,4])
WITH a AS (SELECT pg_llm_from_array('{0.5,-1,2, 1.5,0.25,-0.75}') x,
                  pg_llm_from_array('{1,2,3, -1,0,1, 0.5,0.5,0.5, 2,-2,1}') w,
                  pg_llm_from_array('{0.1,-0.2,0.3,0.4, -0.5,0.6,0.7,-0.8}') dy),
     g AS (SELECT (pg_llm_linear_backward(x, w, dy, 2, 3, 4)).* FROM a)
SELECT (pg_temp.diff(g.dx, pg_llm_matmul(a.dy, a.w, 2, 4, 3))).max_diff < 1e-6 AS dx_ok,
       (pg_temp.diff(g.dw, pg_llm_matmul(pg_llm_transpose(a.dy, 2, 4), a.x, 4, 2, 3))).max_diff < 1e-6 AS dw_ok,
       pg_llm_to_array(g.db) AS db
  FROM a, g;
-- embedding: rows of dy added into the rows of the ids (id 2 twice)
SELECT pg_llm_to_array(pg_llm_embedding_backward(pg_llm_from_array('{1,2, 3,4, 5,6}'), '{2,0,2}', 3, 2)) AS dtable;
-- mean cross-entropy: each row's softmax − onehot, divided by the number of rows
SELECT (pg_temp.diff(pg_llm_cross_entropy_mean_backward(pg_llm_from_array('{1,2,3, 0,0,1}'), '{2,0}'),
                    pg_llm_from_array(array(SELECT (v / 2)::float4 FROM unnest(
                        pg_llm_to_array(pg_llm_cross_entropy_backward(pg_llm_from_array('{1,2,3}'), 2))
                        || pg_llm_to_array(pg_llm_cross_entropy_backward(pg_llm_from_array('{0,0,1}'), 0))) v)))).max_diff < 1e-7
       AS ce_mean_grad_ok;
-- causal attention = pg_gpt2's fused block with identity projections, so dx of the block is
-- dq + dk + dv (T = 3, D = 4, two heads, dense, scaled)
WITH a AS (SELECT pg_llm_from_array('{0.2,-0.4,0.6,0.1, -0.3,0.5,0.2,-0.7, 0.9,0.1,-0.2,0.4}') x,
                  pg_llm_from_array('{1,0,0,0, 1,0,0,0, 1,0,0,0,  0,1,0,0, 0,1,0,0, 0,1,0,0,
                                      0,0,1,0, 0,0,1,0, 0,0,1,0,  0,0,0,1, 0,0,0,1, 0,0,0,1}') w_qkv,
                  pg_llm_from_array('{1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}') w_o,
                  pg_llm_from_array('{0.3,-0.1,0.2,0.5, 0.4,0.2,-0.6,0.1, -0.2,0.7,0.3,-0.4}') dy),
     g AS (SELECT (pg_llm_causal_attention_backward(x, x, x, dy, 2, 3)).*,
                  (pg_llm_attention_backward(x, w_qkv, pg_llm_zeros_like(pg_llm_from_array('{0,0,0,0,0,0,0,0,0,0,0,0}')),
                                             w_o, pg_llm_zeros_like(pg_llm_from_array('{0,0,0,0}')), dy, 2, 3, 4)).dx
             FROM a)
SELECT (pg_temp.diff(pg_llm_causal_attention(a.x, a.x, a.x, 2, 3),
                    pg_llm_attention(a.x, a.w_qkv, pg_llm_zeros_like(pg_llm_from_array('{0,0,0,0,0,0,0,0,0,0,0,0}')),
                                     a.w_o, pg_llm_zeros_like(pg_llm_from_array('{0,0,0,0}')), 2, 3, 4))).max_diff < 1e-6
       AS forward_ok,
       (pg_temp.diff(pg_llm_add(pg_llm_add(g.dq, g.dk), g.dv), g.dx)).max_diff < 1e-6 AS backward_ok
  FROM a, g;
-- a band of 1 lets each query see only itself: the output is v
SELECT pg_llm_to_array(pg_llm_causal_attention(pg_llm_from_array('{1,2,3,4}'), pg_llm_from_array('{5,6,7,8}'),
                                               pg_llm_from_array('{9,8,7,6}'), 1, 2, 1)) AS band_of_one;

-- 5. Errors.
SET pg_llm.autograd = on;
SELECT pg_temp.err($$SELECT llm_backprop(100000)$$);
SELECT pg_temp.err($$SELECT llm_backprop(-1)$$);
SELECT pg_temp.err($$SELECT llm_backprop(llm_tape_id(pg_llm_gelu(pg_llm_from_array('{1,2}'))))$$);
SELECT pg_temp.err($$SELECT llm_param_tensor('no-such-model', 'wte.weight')$$);
SELECT pg_temp.err($$SELECT llm_param_tensor('rel-one', 'no.such.tensor')$$);
SELECT pg_temp.err($$SELECT llm_forward_gpt3('rel-one', '{}')$$);
SELECT pg_temp.err($$SELECT llm_forward_gpt3('rel-one', '{1,2,3,4,5,6,7,8,9}')$$);
SELECT pg_temp.err($$SELECT llm_forward_gpt3('rel-one', '{13}')$$);
SELECT pg_temp.err($$SELECT llm_block_forward('rel-one', 1, pg_llm_zeros_like(pg_llm_from_array('{1,2,3,4,5,6,7,8}')), 1)$$);
SELECT pg_temp.err($$SELECT pg_llm_linear(pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{1,2}'), NULL, 1, 3, 1)$$);
SELECT pg_temp.err($$SELECT pg_llm_embedding(pg_llm_from_array('{1,2,3,4}'), '{2}', 2)$$);
SELECT pg_temp.err($$SELECT pg_llm_causal_attention(pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{1,2,3}'), pg_llm_from_array('{1,2,3}'), 2, 1)$$);
SELECT pg_temp.err($$SELECT pg_llm_cross_entropy_mean(pg_llm_from_array('{1,2,3}'), '{0,1}')$$);
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, activation)
VALUES ('rel-relu', 1, 1, 4, 4, 8, 4, 5, 'relu');
SELECT pg_temp.err($$SELECT llm_forward_gpt3('rel-relu', '{1}')$$);
-- the tape counts against pg_llm.max_memory
SET pg_llm.max_memory = '1MB';
SELECT pg_temp.err($$SELECT length(pg_llm_gelu(pg_llm_from_array(array_fill(0.5::float4, ARRAY[300000]))))$$);
RESET pg_llm.max_memory;
RESET pg_llm.autograd;
SELECT pg_temp.err($$SELECT llm_tape_watch(pg_llm_from_array('{1}'))$$);
SELECT llm_tape_reset();
SELECT count(*) AS records_after_reset FROM llm_tape;
