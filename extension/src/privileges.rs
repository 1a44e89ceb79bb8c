//! Who may write a model: the role named in its `llm_model_config.owner` and every role with
//! that role's privileges (members that inherit from it, superusers), as the row-level
//! security policies of privileges.sql allow; row-level security does not restrict the
//! tables' owner or BYPASSRLS roles, so they pass too. Every SQL function that writes a model
//! calls `require_writer` before any work, so a refused caller gets one clear 42501 instead
//! of a row-level security violation halfway or a write of no rows. See docs/security.md.

use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;

use crate::errors::{run, spi_error};
use crate::spi;

/// Checks that the current role may write `model`, or register it when no model has that
/// name yet. A NULL name passes: the calling function reports it as its own argument error.
/// In a read-only transaction (on a hot standby every transaction is one) a write is refused
/// first, with PostgreSQL's own 25006, before anything tries to assign a transaction id.
pub fn require_writer(model: Option<&str>) -> Result<()> {
    // SAFETY: raises PostgreSQL's usual ERROR in a read-only transaction; nothing is held.
    unsafe { pgrx::pg_sys::PreventCommandIfReadOnly(c"a write to a pg_llm model".as_ptr()) };
    let Some(model) = model else {
        return Ok(());
    };
    let mut role = None;
    spi::read(
        "SELECT current_user::text,
                r.rolsuper OR r.rolbypassrls OR pg_has_role(t.relowner, 'USAGE'),
                has_table_privilege(t.oid, 'SELECT'),
                has_table_privilege(t.oid, 'INSERT')
           FROM pg_class t, pg_roles r
          WHERE t.oid = 'llm_model_config'::regclass AND r.rolname = current_user",
        &[],
        |row| {
            let flag = |i| -> Result<bool> { Ok(row.get(i).map_err(spi_error)?.unwrap_or(false)) };
            role = Some((
                row.get::<String>(1).map_err(spi_error)?.unwrap_or_default(),
                flag(2)?,
                flag(3)?,
                flag(4)?,
            ));
            Ok(())
        },
    )?;
    let (user, bypasses_rls, may_read, may_register) =
        role.ok_or_else(|| EngineError::Internal("the current role is not in pg_roles".into()))?;
    if bypasses_rls {
        return Ok(());
    }
    if !may_read {
        return Err(EngineError::InsufficientPrivilege(format!(
            "permission denied for model \"{model}\": role \"{user}\" has no privileges on \
             llm_model_config (GRANT llm_reader or llm_writer to it)"
        )));
    }
    let mut owner = None;
    spi::read(
        "SELECT llm_has_privileges_of(owner) FROM llm_model_config WHERE model = $1",
        &[model.into()],
        |row| {
            owner = Some(row.get::<bool>(1).map_err(spi_error)?.unwrap_or(false));
            Ok(())
        },
    )?;
    match owner {
        Some(true) => Ok(()),
        Some(false) => Err(EngineError::InsufficientPrivilege(format!(
            "must be owner of model \"{model}\""
        ))),
        None if may_register => Ok(()),
        None => Err(EngineError::InsufficientPrivilege(format!(
            "permission denied to register model \"{model}\": role \"{user}\" may not insert \
             into llm_model_config (GRANT llm_writer to it)"
        ))),
    }
}

/// Raises 42501 unless the current role may write `model` (see `require_writer`); the
/// checkpoint functions of training.sql call it first, and applications may too.
#[pg_extern(stable)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_require_writer(model: Option<&str>) {
    run("llm_require_writer", || require_writer(model))
}
