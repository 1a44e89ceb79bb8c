//! Server-side file access, restricted like `COPY FROM` a file: superusers and members of
//! pg_read_server_files only (42501 otherwise).

use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;

/// Checks the current role may read server files; `function` names the caller in the message.
pub fn require_read_privilege(function: &str) -> Result<()> {
    let allowed = Spi::get_one::<bool>(
        "SELECT pg_has_role(current_user, 'pg_read_server_files', 'USAGE') \
         OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if allowed {
        Ok(())
    } else {
        Err(EngineError::InsufficientPrivilege(format!(
            "permission denied to read server files; {function} requires superuser or membership in \
             pg_read_server_files (the bytea/text variants work for any role)"
        )))
    }
}

/// Reads a whole server file.
pub fn read(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| EngineError::Io(format!("could not read file \"{path}\": {e}")))
}

pub fn read_text(path: &str) -> Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| EngineError::data(format!("file \"{path}\" is not valid UTF-8")))
}
