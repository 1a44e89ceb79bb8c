-- Composite results of the backward kernels and the optimiser (names kept from pg_gpt2).
CREATE TYPE attention_grads AS (dx bytea, dw_qkv bytea, db_qkv bytea, dw_o bytea, db_o bytea);
CREATE TYPE layernorm_grads AS (dx bytea, dgamma bytea, dbeta bytea);
CREATE TYPE adamw_state AS (weight bytea, m bytea, v bytea);
CREATE TYPE linear_grads AS (dx bytea, dw bytea, db bytea);
CREATE TYPE attention_qkv_grads AS (dq bytea, dk bytea, dv bytea);
