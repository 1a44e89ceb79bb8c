//! Reading the extension's tables.
//!
//! pgrx's convenience calls (`Spi::get_one` and friends) run every query as a write: they
//! assign a transaction id, which fails on a hot standby, and take a fresh snapshot for each
//! query, so a model read tensor by tensor could mix two committed states. Reads here run
//! read-only under a snapshot this module takes: inside one `consistent` block every query sees
//! the same committed state (plus this transaction's own earlier writes), and no transaction id
//! is ever assigned. Writes keep using pgrx's read-write calls.
//!
//! Name resolution is the caller's concern: every function that runs SQL pins a safe
//! `search_path` in its definition (see `#[search_path]` on the `#[pg_extern]`s).

use std::cell::Cell;
use std::ffi::CString;

use pg_llm_engine::{EngineError, Result};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{SpiError, SpiErrorCodes, SpiResult};

use crate::errors::spi_error;

thread_local! {
    /// Nesting depth of `consistent` blocks: only the outermost takes a snapshot.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` with one snapshot active for every `read` inside it. The snapshot is taken after
/// this transaction's earlier writes (so they are visible) and, in READ COMMITTED, sees
/// everything committed before the block starts.
pub fn consistent<R>(f: impl FnOnce() -> R) -> R {
    if DEPTH.get() > 0 {
        return f();
    }
    // SAFETY: called on the backend thread inside a transaction (a SQL function is running);
    // the pushed snapshot is popped by the guard (or by transaction abort on error).
    unsafe {
        pg_sys::CommandCounterIncrement();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    DEPTH.set(1);
    let _pop = PopOnDrop;
    f()
}

struct PopOnDrop;

impl Drop for PopOnDrop {
    fn drop(&mut self) {
        DEPTH.set(0);
        // On an ERROR the (sub)transaction abort that follows releases the snapshot stack;
        // popping here could pop a snapshot SPI pushed above ours.
        if !std::thread::panicking() {
            // SAFETY: the snapshot pushed by `consistent` is on top again once its body ended.
            unsafe { pg_sys::PopActiveSnapshot() };
        }
    }
}

/// Runs the read-only query `sql` and hands each row to `row`, under the active `consistent`
/// snapshot (or a fresh one of its own). Values borrowed from a row live until `read` returns.
pub fn read(
    sql: &str,
    args: &[DatumWithOid],
    mut row: impl FnMut(&Row) -> Result<()>,
) -> Result<()> {
    let cmd = CString::new(sql).map_err(|_| EngineError::Internal("query holds a NUL".into()))?;
    let mut types: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
    let (mut values, nulls): (Vec<pg_sys::Datum>, Vec<std::ffi::c_char>) = args
        .iter()
        .map(|a| match a.datum() {
            Some(d) => (d.sans_lifetime(), b' ' as std::ffi::c_char),
            None => (pg_sys::Datum::from(0usize), b'n' as std::ffi::c_char),
        })
        .unzip();
    consistent(|| {
        Spi::connect(|_| {
            // SAFETY: argument arrays match `args` in length and type; read_only = true makes
            // SPI run under the active snapshot instead of taking a new one, and refuses any
            // statement that would write.
            let status = unsafe {
                pg_sys::SPI_execute_with_args(
                    cmd.as_ptr(),
                    args.len() as i32,
                    types.as_mut_ptr(),
                    values.as_mut_ptr(),
                    nulls.as_ptr(),
                    true,
                    0,
                )
            };
            if status < 0 {
                return Err(EngineError::Internal(format!(
                    "SPI read failed with status {status}"
                )));
            }
            // SAFETY: SPI_tuptable belongs to the query just run and lives until SPI_finish.
            let table = unsafe { pg_sys::SPI_tuptable.as_ref() };
            let Some(table) = table else { return Ok(()) };
            for i in 0..table.numvals as usize {
                // SAFETY: `vals` holds `numvals` tuples described by `tupdesc`.
                row(&Row {
                    tupdesc: table.tupdesc,
                    tuple: unsafe { *table.vals.add(i) },
                })?;
            }
            Ok(())
        })
    })
}

/// One row of a `read`. pgrx's own row type converts values in the memory context above
/// SPI's, which is the transaction's: a detoasted 256 MB weight chunk would stay there until
/// the transaction ends, so reading a model tensor by tensor would still hold all of it.
/// Values here are converted in SPI's context, freed when `read` returns.
pub struct Row {
    tupdesc: pg_sys::TupleDesc,
    tuple: pg_sys::HeapTuple,
}

impl Row {
    /// Column `ordinal` (from 1), None when NULL.
    pub fn get<T: IntoDatum + FromDatum>(&self, ordinal: usize) -> SpiResult<Option<T>> {
        // SAFETY: `tuple` and `tupdesc` come from the tuple table of the query being read and
        // live until SPI_finish, after every use of this row; the ordinal is checked first.
        unsafe {
            if ordinal < 1 || ordinal > (*self.tupdesc).natts as usize {
                return Err(SpiError::SpiError(SpiErrorCodes::NoAttribute));
            }
            let mut is_null = false;
            let datum =
                pg_sys::SPI_getbinval(self.tuple, self.tupdesc, ordinal as i32, &mut is_null);
            let oid = pg_sys::SPI_gettypeid(self.tupdesc, ordinal as i32);
            T::try_from_datum(datum, is_null, oid).map_err(SpiError::DatumError)
        }
    }
}

/// The first column of the first row, if any row and the value is not NULL.
pub fn read_one<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Result<Option<T>> {
    let mut value = None;
    read(sql, args, |row| {
        if value.is_none() {
            value = row.get::<T>(1).map_err(spi_error)?;
        }
        Ok(())
    })?;
    Ok(value)
}
