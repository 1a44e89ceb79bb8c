-- Tokenizers: stored once per distinct vocabulary + merges (deduplicated by digest) and shared
-- by any number of models.
CREATE TABLE llm_tokenizer (
    id         bigserial PRIMARY KEY,
    digest     text NOT NULL UNIQUE,         -- md5 of vocab and merges
    vocab      text NOT NULL,                -- encoder.json / vocab.json
    merges     text NOT NULL,                -- vocab.bpe / merges.txt
    n_tokens   int  NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- A row is found by its digest and shared by every model loading the same files: a digest
    -- that did not match the content would let one role's row stand in for another's files.
    CONSTRAINT digest_matches_content CHECK (digest = md5(vocab || E'\x1f' || merges))
);
ALTER TABLE llm_tokenizer ALTER COLUMN vocab SET STORAGE EXTENDED;

CREATE TABLE llm_model_tokenizer (
    model        text PRIMARY KEY REFERENCES llm_model_config (model) ON DELETE CASCADE ON UPDATE CASCADE,
    tokenizer_id bigint NOT NULL REFERENCES llm_tokenizer (id)
);

-- Halves loaded by pg_llm_load_bpe_vocab / pg_llm_load_bpe_merges until both are present.
CREATE TABLE llm_tokenizer_staging (
    model  text PRIMARY KEY REFERENCES llm_model_config (model) ON DELETE CASCADE ON UPDATE CASCADE,
    vocab  text,
    merges text
);

-- pg_gpt2's relational views of a vocabulary and its merge rules.
CREATE VIEW llm_bpe_vocab AS
SELECT mt.model, t.id AS tokenizer_id, e.value::int AS token_id, e.key AS token
  FROM llm_model_tokenizer mt
  JOIN llm_tokenizer t ON t.id = mt.tokenizer_id,
       jsonb_each_text(t.vocab::jsonb) e;

CREATE VIEW llm_bpe_merges AS
SELECT mt.model, t.id AS tokenizer_id, (row_number() OVER (PARTITION BY mt.model ORDER BY l.ord))::int - 1 AS rank,
       split_part(l.line, ' ', 1) AS "left", split_part(l.line, ' ', 2) AS "right"
  FROM llm_model_tokenizer mt
  JOIN llm_tokenizer t ON t.id = mt.tokenizer_id,
       regexp_split_to_table(t.merges, E'\n') WITH ORDINALITY AS l(line, ord)
 WHERE l.line <> '' AND NOT (l.ord = 1 AND l.line LIKE '#version%');
