//! A checkpoint's files in PostgreSQL large objects (`checkpoint::Files`), so a client can
//! upload a checkpoint of any size in pieces (`lo_from_bytea`, `lo_put`) and import it without
//! touching the server's disk. Reads go through SQL (`lo_get`, `lo_lseek64`), so PostgreSQL's
//! own large object privileges apply: a role imports only what it may read.

use std::collections::HashMap;

use pg_llm_engine::{EngineError, Result};
use pgrx::pg_sys;

use crate::errors::spi_error;
use crate::spi;

/// Bytes fetched by one `lo_get` (and between two interrupt checks).
const BLOCK: usize = 16 << 20;

/// `INV_READ` of libpq-fs.h: open a large object for reading (under the active snapshot).
const INV_READ: i32 = 0x40000;

/// Large objects by the file names a checkpoint refers to them by; sizes asked once.
pub struct LargeObjects {
    oids: HashMap<String, pg_sys::Oid>,
    sizes: HashMap<String, u64>,
}

impl LargeObjects {
    /// Pairs `objects` with `files` (same length, no NULL, no name twice).
    pub fn new(
        objects: Option<Vec<Option<pg_sys::Oid>>>,
        files: Option<Vec<Option<String>>>,
    ) -> Result<Self> {
        let objects = crate::api::args::required(objects, "objects")?;
        let files = crate::api::args::required(files, "files")?;
        if objects.len() != files.len() {
            return Err(EngineError::invalid(format!(
                "objects and files must have the same length, got {} and {}",
                objects.len(),
                files.len()
            )));
        }
        if objects.is_empty() {
            return Err(EngineError::invalid(
                "objects and files are empty: give at least one checkpoint file",
            ));
        }
        let mut oids = HashMap::new();
        for (i, (oid, name)) in objects.into_iter().zip(files).enumerate() {
            let null = |what: &str| {
                EngineError::NullValue(format!("{what} has a NULL at element {}", i + 1))
            };
            let oid = oid.ok_or_else(|| null("objects"))?;
            let name = name.ok_or_else(|| null("files"))?;
            if name.is_empty() {
                return Err(EngineError::invalid(format!(
                    "files has an empty name at element {}",
                    i + 1
                )));
            }
            if oids.insert(name.clone(), oid).is_some() {
                return Err(EngineError::invalid(format!(
                    "file name \"{name}\" is given twice"
                )));
            }
        }
        Ok(Self {
            oids,
            sizes: HashMap::new(),
        })
    }

    /// The file names given, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.oids.keys().map(String::as_str).collect();
        names.sort();
        names
    }

    pub fn contains(&self, file: &str) -> bool {
        self.oids.contains_key(file)
    }

    fn oid(&self, file: &str) -> Result<pg_sys::Oid> {
        self.oids
            .get(file)
            .copied()
            .ok_or_else(|| EngineError::invalid(format!("\"{file}\" is not among the files given")))
    }

    /// A whole (small) file: a manifest or a shard index.
    pub fn read_all(&mut self, file: &str) -> Result<Vec<u8>> {
        use pg_llm_engine::formats::checkpoint::Files;
        let size = self.size(file)?;
        if size > 1 << 30 {
            return Err(EngineError::too_large(format!(
                "\"{file}\" has {size} bytes, more than a manifest or an index may"
            )));
        }
        let mut bytes = vec![0; size as usize];
        self.read_at(file, 0, &mut bytes)?;
        Ok(bytes)
    }
}

/// An object id as a query argument: a bigint cast back in SQL (pgrx passes the invalid oid 0
/// as NULL, where PostgreSQL should say that large object 0 does not exist).
fn oid_arg(oid: pg_sys::Oid) -> pgrx::datum::DatumWithOid<'static> {
    i64::from(u32::from(oid)).into()
}

impl pg_llm_engine::formats::checkpoint::Files for LargeObjects {
    fn size(&mut self, file: &str) -> Result<u64> {
        if let Some(&size) = self.sizes.get(file) {
            return Ok(size);
        }
        let oid = self.oid(file)?;
        // lo_open checks the role may read the object (42501) and that it exists (42704).
        let size: i64 = spi::read_one(
            "SELECT lo_lseek64(fd, 0, 2), lo_close(fd) FROM (SELECT lo_open($1::oid, $2) AS fd) s",
            &[oid_arg(oid), INV_READ.into()],
        )?
        .ok_or_else(|| EngineError::Internal(format!("no size for large object {oid}")))?;
        let size = size.max(0) as u64;
        self.sizes.insert(file.to_string(), size);
        Ok(size)
    }

    fn read_at(&mut self, file: &str, offset: u64, out: &mut [u8]) -> Result<()> {
        let size = self.size(file)?;
        let oid = self.oid(file)?;
        let end = offset.saturating_add(out.len() as u64);
        let short = || {
            EngineError::data(format!(
                "\"{file}\" (large object {oid}) ends before byte {end} ({size} bytes)"
            ))
        };
        if end > size {
            return Err(short());
        }
        for (k, block) in out.chunks_mut(BLOCK).enumerate() {
            pgrx::check_for_interrupts!();
            let at = offset + (k * BLOCK) as u64;
            let mut filled = false;
            spi::read(
                "SELECT lo_get($1::oid, $2, $3)",
                &[
                    oid_arg(oid),
                    (at as i64).into(),
                    (block.len() as i32).into(),
                ],
                |row| {
                    let bytes: &[u8] = row.get(1).map_err(spi_error)?.unwrap_or_default();
                    // Shorter when the object was cut since its size was asked.
                    if bytes.len() != block.len() {
                        return Err(short());
                    }
                    block.copy_from_slice(bytes);
                    filled = true;
                    Ok(())
                },
            )?;
            if !filled {
                return Err(short());
            }
        }
        Ok(())
    }
}
