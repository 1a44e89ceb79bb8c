//! Server-side file access, restricted like `COPY FROM` a file: superusers and roles with the
//! privileges of pg_read_server_files only (42501 otherwise).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use pg_llm_engine::{EngineError, Result};
use pgrx::pg_sys;

/// Checks the current role may read server files; `function` names the caller in the message.
pub fn require_read_privilege(function: &str) -> Result<()> {
    // SAFETY: plain catalog lookups on the backend thread; the same test COPY FROM makes.
    let allowed = unsafe {
        pg_sys::has_privs_of_role(
            pg_sys::GetUserId(),
            pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES),
        )
    };
    if allowed {
        Ok(())
    } else {
        Err(EngineError::InsufficientPrivilege(format!(
            "permission denied to read server files; {function} requires superuser or the privileges \
             of pg_read_server_files (the bytea/text variants work for any role)"
        )))
    }
}

/// Bytes read between two interrupt checks.
const READ_BLOCK: usize = 16 << 20;

/// Reads a whole regular server file. Anything else (a FIFO, a device, a directory) is refused
/// before a read could block: the file is opened non-blocking and checked on the open handle,
/// so it cannot be swapped between the check and the read. Cancel is honoured between blocks.
pub fn read(path: &str) -> Result<Vec<u8>> {
    let io = |what: &str, e: std::io::Error| {
        EngineError::Io(format!("could not {what} file \"{path}\": {e}"))
    };
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io("open", e))?;
    let meta = file.metadata().map_err(|e| io("stat", e))?;
    if !meta.file_type().is_file() {
        let kind = match meta.file_type() {
            t if t.is_dir() => "a directory",
            t if t.is_fifo() => "a named pipe",
            t if t.is_socket() => "a socket",
            t if t.is_char_device() || t.is_block_device() => "a device",
            _ => "not a regular file",
        };
        return Err(EngineError::invalid(format!(
            "\"{path}\" is {kind}; only regular files can be read"
        )));
    }
    let size = usize::try_from(meta.len())
        .map_err(|_| EngineError::too_large(format!("file \"{path}\" is too large")))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(size).map_err(|_| {
        EngineError::too_large(format!(
            "file \"{path}\" ({size} bytes) does not fit in memory"
        ))
    })?;
    loop {
        pgrx::check_for_interrupts!();
        let start = bytes.len();
        let n = (&mut file)
            .take(READ_BLOCK as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| io("read", e))?;
        if n == 0 || bytes.len() == start {
            return Ok(bytes);
        }
    }
}

pub fn read_text(path: &str) -> Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| EngineError::data(format!("file \"{path}\" is not valid UTF-8")))
}
