-- Who may use and who may change models; see docs/security.md.
--
-- Two group roles: llm_reader may use every model (generate, logits, loss, tokenizers,
-- exports as bytes), llm_writer may also register models and change those it owns. Each model
-- row names an owner role; row-level security lets a role write a model's rows only when it
-- has the owner's privileges. Reads stay open to every role with the table privilege: the
-- weight cache lists every model to tell its files from stale ones, and generation reads any
-- model. The tables' owner (the installing superuser) is not restricted (RLS is not forced).

-- Roles belong to the cluster, not the database: a second database's CREATE EXTENSION finds
-- them, and DROP EXTENSION leaves them.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'llm_reader') THEN
        CREATE ROLE llm_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'llm_writer') THEN
        CREATE ROLE llm_writer NOLOGIN;
    END IF;
    IF NOT pg_catalog.pg_has_role('llm_writer', 'llm_reader', 'MEMBER') THEN
        GRANT llm_reader TO llm_writer;
    END IF;
END
$$;

GRANT SELECT ON llm_model_config, llm_param, llm_param_info, llm_param_share, llm_param_resolved, llm_tokenizer, llm_model_tokenizer,
    llm_tokenizer_staging, llm_bpe_vocab, llm_bpe_merges, llm_dataset, llm_train_log,
    llm_checkpoint, llm_checkpoint_param TO llm_reader;

GRANT INSERT, UPDATE, DELETE ON llm_model_config, llm_param, llm_param_share, llm_model_tokenizer,
    llm_tokenizer_staging, llm_dataset, llm_train_log, llm_checkpoint, llm_checkpoint_param
    TO llm_writer;
-- Tokenizer rows are shared by every model that loaded the same files (found by digest):
-- writers add rows, never change or remove them.
GRANT INSERT ON llm_tokenizer TO llm_writer;
-- Model versions (the registry's default and the llm_param trigger) and serial ids.
GRANT USAGE ON SEQUENCE llm_model_version_seq, llm_tokenizer_id_seq, llm_dataset_id_seq,
    llm_train_log_id_seq, llm_checkpoint_id_seq TO llm_writer;

-- True when the current role has the privileges of role `owner`: it is that role, a member
-- that inherits from it, or a superuser. False for a name no role has any more, where
-- pg_has_role(name, ...) would raise an error in every policy that reads the row.
CREATE FUNCTION llm_has_privileges_of(owner name) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(pg_has_role(to_regrole(quote_ident(owner))::oid, 'USAGE'), false)
$$;

ALTER TABLE llm_model_config ENABLE ROW LEVEL SECURITY;
CREATE POLICY llm_read ON llm_model_config FOR SELECT USING (true);
-- A role registers models for itself or for a role whose privileges it has, and hands a model
-- on only to such a role (as ALTER ... OWNER TO requires membership in the new owner).
CREATE POLICY llm_owner_insert ON llm_model_config FOR INSERT
    WITH CHECK (llm_has_privileges_of(owner));
CREATE POLICY llm_owner_update ON llm_model_config FOR UPDATE
    USING (llm_has_privileges_of(owner)) WITH CHECK (llm_has_privileges_of(owner));
CREATE POLICY llm_owner_delete ON llm_model_config FOR DELETE
    USING (llm_has_privileges_of(owner));

-- The tables with one model per row: written only by the model's owner. Rows removed or
-- renamed with their model (ON DELETE / ON UPDATE CASCADE) are not subject to these policies,
-- as PostgreSQL runs referential actions as the table owner.
DO $$
DECLARE
    tab text;
    owns text;
BEGIN
    FOREACH tab IN ARRAY ARRAY['llm_param', 'llm_param_share', 'llm_model_tokenizer', 'llm_tokenizer_staging',
                               'llm_dataset', 'llm_train_log', 'llm_checkpoint'] LOOP
        owns := format('EXISTS (SELECT 1 FROM llm_model_config c
                                 WHERE c.model = %I.model AND llm_has_privileges_of(c.owner))', tab);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', tab);
        EXECUTE format('CREATE POLICY llm_read ON %I FOR SELECT USING (true)', tab);
        EXECUTE format('CREATE POLICY llm_owner_insert ON %I FOR INSERT WITH CHECK (%s)', tab, owns);
        EXECUTE format('CREATE POLICY llm_owner_update ON %I FOR UPDATE USING (%s) WITH CHECK (%s)',
                       tab, owns, owns);
        EXECUTE format('CREATE POLICY llm_owner_delete ON %I FOR DELETE USING (%s)', tab, owns);
    END LOOP;
END
$$;

-- A checkpoint's tensors belong to the model of their checkpoint.
ALTER TABLE llm_checkpoint_param ENABLE ROW LEVEL SECURITY;
CREATE POLICY llm_read ON llm_checkpoint_param FOR SELECT USING (true);
CREATE POLICY llm_owner_insert ON llm_checkpoint_param FOR INSERT WITH CHECK (
    EXISTS (SELECT 1 FROM llm_checkpoint k JOIN llm_model_config c ON c.model = k.model
             WHERE k.id = llm_checkpoint_param.checkpoint_id AND llm_has_privileges_of(c.owner)));
CREATE POLICY llm_owner_update ON llm_checkpoint_param FOR UPDATE
    USING (EXISTS (SELECT 1 FROM llm_checkpoint k JOIN llm_model_config c ON c.model = k.model
                    WHERE k.id = llm_checkpoint_param.checkpoint_id AND llm_has_privileges_of(c.owner)))
    WITH CHECK (EXISTS (SELECT 1 FROM llm_checkpoint k JOIN llm_model_config c ON c.model = k.model
                         WHERE k.id = llm_checkpoint_param.checkpoint_id AND llm_has_privileges_of(c.owner)));
CREATE POLICY llm_owner_delete ON llm_checkpoint_param FOR DELETE USING (
    EXISTS (SELECT 1 FROM llm_checkpoint k JOIN llm_model_config c ON c.model = k.model
             WHERE k.id = llm_checkpoint_param.checkpoint_id AND llm_has_privileges_of(c.owner)));
