//! Engine errors become SQL errors with the matching SQLSTATE, prefixed by the SQL function's
//! name so the message says where it came from.

use pg_llm_engine::{Cancel, EngineError};
use pgrx::pg_sys;
use pgrx::prelude::*;

fn sqlstate(err: &EngineError) -> PgSqlErrorCode {
    use PgSqlErrorCode::*;
    match err {
        EngineError::InvalidParameter(_) => ERRCODE_INVALID_PARAMETER_VALUE,
        EngineError::Data(_) => ERRCODE_DATA_EXCEPTION,
        EngineError::NullValue(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
        EngineError::TooLarge(_) => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        EngineError::OutOfRange(_) => ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        EngineError::UndefinedObject(_) => ERRCODE_UNDEFINED_OBJECT,
        EngineError::InsufficientPrivilege(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
        EngineError::Io(_) => ERRCODE_IO_ERROR,
        EngineError::Cancelled => ERRCODE_QUERY_CANCELED,
        EngineError::Internal(_) => ERRCODE_INTERNAL_ERROR,
    }
}

/// An SPI failure as an engine error (the statement text is ours; a failure is unexpected data).
pub fn spi(e: pgrx::spi::SpiError) -> EngineError {
    EngineError::data(format!("SPI: {e}"))
}

/// Raises `err` as an SQL ERROR. A cancellation is handed to PostgreSQL's own interrupt
/// processing first, so the user sees the usual cancel / statement_timeout message.
pub fn report(function: &str, err: EngineError) -> ! {
    if err == EngineError::Cancelled {
        pg_sys::check_for_interrupts!();
    }
    ereport!(ERROR, sqlstate(&err), format!("{function}: {err}"));
}

/// Runs the body of a SQL function: applies the GUCs, then reports an engine error if any.
pub fn run<T>(function: &str, body: impl FnOnce() -> pg_llm_engine::Result<T>) -> T {
    crate::guc::apply();
    match body() {
        Ok(v) => v,
        Err(e) => report(function, e),
    }
}

fn interrupt_pending() -> bool {
    // SAFETY: a plain read of a sig_atomic_t flag that PostgreSQL's signal handlers set; safe
    // from any thread (no PostgreSQL function is called).
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::InterruptPending)) != 0 }
}

static PROBE: fn() -> bool = interrupt_pending;

/// A cancellation probe for engine work running in this backend.
pub fn cancel() -> Cancel<'static> {
    Cancel::new(&PROBE)
}
