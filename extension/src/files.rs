//! Server-side file access, restricted like `COPY FROM` a file: superusers and roles with the
//! privileges of pg_read_server_files only (42501 otherwise).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use pg_llm_engine::{EngineError, Result};
use pgrx::pg_sys;

/// Checks the current role may read server files; `function` names the caller in the message.
pub fn require_read_privilege(function: &str) -> Result<()> {
    require_role(
        pg_sys::ROLE_PG_READ_SERVER_FILES,
        "read",
        function,
        "bytea/text variants need",
    )
}

/// Checks the current role may write server files (superuser or pg_write_server_files, as
/// `COPY TO` a file requires).
pub fn require_write_privilege(function: &str) -> Result<()> {
    require_role(
        pg_sys::ROLE_PG_WRITE_SERVER_FILES,
        "write",
        function,
        "bytea variant needs",
    )
}

/// The test COPY makes: superuser or the privileges of `pg_{verb}_server_files`.
fn require_role(role: u32, verb: &str, function: &str, instead: &str) -> Result<()> {
    // SAFETY: plain catalog lookups on the backend thread.
    let allowed =
        unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), pg_sys::Oid::from(role)) };
    if allowed {
        Ok(())
    } else {
        Err(EngineError::InsufficientPrivilege(format!(
            "permission denied to {verb} server files; {function} requires superuser or the \
             privileges of pg_{verb}_server_files (the {instead} no file privilege)"
        )))
    }
}

/// Bytes read between two interrupt checks: a few tens of ms even from a cold disk.
const READ_BLOCK: usize = 4 << 20;

/// Reads a whole regular server file (see `open_regular`). Cancel is honoured between blocks.
pub fn read(path: &str) -> Result<Vec<u8>> {
    let (file, size) = open_regular(path)?;
    read_limited(file, path, size)
}

/// Opens a regular file for reading and returns its size. Anything else (a FIFO, a device, a
/// directory) is refused before a read could block: the file is opened non-blocking and
/// checked on the open handle, so it cannot be swapped between the check and the read.
fn open_regular(path: &str) -> Result<(File, u64)> {
    let io = |what: &str, e: std::io::Error| {
        EngineError::Io(format!("could not {what} file \"{path}\": {e}"))
    };
    let file = File::options()
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
    Ok((file, meta.len()))
}

/// Reads up to `size` bytes in blocks, honouring cancel between them.
fn read_limited(file: File, path: &str, size: u64) -> Result<Vec<u8>> {
    let size = usize::try_from(size)
        .map_err(|_| EngineError::too_large(format!("file \"{path}\" is too large")))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(size).map_err(|_| {
        EngineError::too_large(format!(
            "file \"{path}\" ({size} bytes) does not fit in memory"
        ))
    })?;
    let mut file = file.take(size as u64);
    loop {
        pgrx::check_for_interrupts!();
        let start = bytes.len();
        let n = (&mut file)
            .take(READ_BLOCK as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| EngineError::Io(format!("could not read file \"{path}\": {e}")))?;
        if n == 0 || bytes.len() == start {
            return Ok(bytes);
        }
    }
}

/// Server files opened on first use and read by range (`checkpoint::Files`), with the checks
/// of `open_regular` and cancel honoured between blocks.
#[derive(Default)]
pub struct ServerFiles {
    open: std::collections::HashMap<String, (File, u64)>,
}

impl ServerFiles {
    fn get(&mut self, path: &str) -> Result<&(File, u64)> {
        if !self.open.contains_key(path) {
            let opened = open_regular(path)?;
            self.open.insert(path.to_string(), opened);
        }
        Ok(&self.open[path])
    }
}

impl pg_llm_engine::formats::checkpoint::Files for ServerFiles {
    fn size(&mut self, file: &str) -> Result<u64> {
        Ok(self.get(file)?.1)
    }

    fn read_at(&mut self, file: &str, offset: u64, out: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let (handle, size) = self.get(file)?;
        if offset.saturating_add(out.len() as u64) > *size {
            return Err(EngineError::data(format!(
                "file \"{file}\" ends before byte {} ({size} bytes)",
                offset.saturating_add(out.len() as u64)
            )));
        }
        for (k, block) in out.chunks_mut(READ_BLOCK).enumerate() {
            pgrx::check_for_interrupts!();
            handle
                .read_exact_at(block, offset + (k * READ_BLOCK) as u64)
                .map_err(|e| EngineError::Io(format!("could not read file \"{file}\": {e}")))?;
        }
        Ok(())
    }
}

pub fn read_text(path: &str) -> Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| EngineError::data(format!("file \"{path}\" is not valid UTF-8")))
}

/// Files written under temporary names and renamed into place together by `commit`, so an
/// error or a cancel part-way leaves no partial file behind: the temporaries of an
/// uncommitted set are removed when it is dropped (also while an ERROR unwinds).
#[derive(Default)]
pub struct StagedFiles {
    staged: Vec<(std::path::PathBuf, std::path::PathBuf)>,
}

impl StagedFiles {
    /// A new file that becomes `path` at commit; refuses to follow a symlink at the
    /// temporary name.
    pub fn create(&mut self, path: &std::path::Path) -> Result<File> {
        let name = path
            .file_name()
            .ok_or_else(|| EngineError::invalid(format!("\"{}\" names no file", path.display())))?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| {
                EngineError::Io(format!("could not create file \"{}\": {e}", tmp.display()))
            })?;
        self.staged.push((tmp, path.to_path_buf()));
        Ok(file)
    }

    /// Flushes every file to disk and renames each into place.
    pub fn commit(mut self) -> Result<()> {
        for (tmp, _) in &self.staged {
            File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| {
                EngineError::Io(format!("could not sync \"{}\": {e}", tmp.display()))
            })?;
        }
        for (tmp, path) in std::mem::take(&mut self.staged) {
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                EngineError::Io(format!(
                    "could not rename \"{}\" to \"{}\": {e}",
                    tmp.display(),
                    path.display()
                ))
            })?;
        }
        Ok(())
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
