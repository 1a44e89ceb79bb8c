-- Operands are read in place when their data is 4-byte aligned and copied when it is not: the
-- result and the errors must not depend on which. A bytea of up to 126 bytes stored in a row
-- keeps its 1-byte header there, and a kernel called on the column reads it in the page, so
-- with 1 to 4 bytes of padding before them the operands of the four rows below start at every
-- offset modulo 4. `x || ''::bytea` is the same value made afresh, with a 4-byte header
-- (aligned). Each comparison is of the exact bytes.
\pset footer off
CREATE TEMP TABLE operand(pad bytea, a bytea, b bytea, g bytea, bad bytea);
INSERT INTO operand
SELECT substr('\x000000'::bytea, 1, p),
       pg_llm_from_array('{0.5,-1.25,2,3.5,-0.75,1}'),
       pg_llm_from_array('{1.5,0.25,-2,0.125,3,-1}'),
       pg_llm_from_array('{1,0.5,2}'),
       pg_llm_from_array('{1,2,NaN,4}')
  FROM generate_series(0, 3) p;

SELECT length(pad) AS pad,
       pg_llm_matmul(a, b, 2, 3, 2) = pg_llm_matmul(a || ''::bytea, b || ''::bytea, 2, 3, 2) AS matmul,
       pg_llm_matmul(a, b, 3, 2, 3) = pg_llm_matmul(a || ''::bytea, b || ''::bytea, 3, 2, 3) AS matmul_3x2,
       pg_llm_add(a, b) = pg_llm_add(a || ''::bytea, b || ''::bytea) AS add,
       pg_llm_add(a, g) = pg_llm_add(a || ''::bytea, g || ''::bytea) AS add_bias,
       pg_llm_gelu(a) = pg_llm_gelu(a || ''::bytea) AS gelu,
       pg_llm_softmax(a, 3) = pg_llm_softmax(a || ''::bytea, 3) AS softmax,
       pg_llm_layernorm(a, g, g, 1e-5) = pg_llm_layernorm(a || ''::bytea, g || ''::bytea, g || ''::bytea, 1e-5) AS layernorm,
       pg_llm_linear(a, b, substr(g, 1, 8), 2, 3, 2)
         = pg_llm_linear(a || ''::bytea, b || ''::bytea, substr(g, 1, 8), 2, 3, 2) AS linear,
       pg_llm_transpose(a, 2, 3) = pg_llm_transpose(a || ''::bytea, 2, 3) AS transpose,
       pg_llm_to_array(pg_llm_matmul(a, b, 2, 3, 2)) AS matmul_values
  FROM operand
 ORDER BY 1;

-- The same errors, with the same SQLSTATE, at every offset.
CREATE FUNCTION pg_temp.err(x bytea, y bytea) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_llm_matmul(x, y, 2, 2, 2);
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT length(pad) AS pad, pg_temp.err(bad, bad) AS unaligned_or_not,
       pg_temp.err(bad || ''::bytea, bad || ''::bytea) AS aligned,
       pg_temp.err(substr(a, 1, 15), bad) AS ragged
  FROM operand
 ORDER BY 1;
