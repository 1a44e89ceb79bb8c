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
        EngineError::OutOfMemory(_) => ERRCODE_OUT_OF_MEMORY,
        EngineError::OutOfRange(_) => ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        EngineError::UndefinedObject(_) => ERRCODE_UNDEFINED_OBJECT,
        EngineError::NotReady(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        EngineError::InsufficientPrivilege(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
        EngineError::Io(_) => ERRCODE_IO_ERROR,
        EngineError::Conflict(_) => ERRCODE_T_R_SERIALIZATION_FAILURE,
        EngineError::Cancelled => ERRCODE_QUERY_CANCELED,
        EngineError::Internal(_) => ERRCODE_INTERNAL_ERROR,
    }
}

/// An SPI failure as an engine error (the statement text is ours; a failure is unexpected data).
pub fn spi_error(e: pgrx::spi::SpiError) -> EngineError {
    EngineError::data(format!("SPI: {e}"))
}

/// Raises `err` as an SQL ERROR. A cancellation is handed to PostgreSQL's own interrupt
/// processing first, so the user sees the usual cancel / statement_timeout message.
pub fn report(function: &str, err: EngineError) -> ! {
    crate::stats::count_error(err.sqlstate());
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

/// True when PostgreSQL wants the running statement to end: a query cancel (raised by
/// pg_cancel_backend, statement_timeout, lock/recovery conflicts), termination, or a client
/// that went away. Any other interrupt (timers, signal barriers, memory-context dumps, catch-up
/// of invalidations) only asks to be served and must not end the call.
fn stop_requested() -> bool {
    // SAFETY: plain reads of flags that PostgreSQL's signal handlers set; no PostgreSQL function
    // is called, so this is safe from any thread.
    unsafe {
        std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::QueryCancelPending)) != 0
            || std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::ProcDiePending)) != 0
            || std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::ClientConnectionLost)) != 0
    }
}

fn interrupt_pending() -> bool {
    // SAFETY: as above.
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::InterruptPending)) != 0 }
}

/// The backend's own thread (compute threads never call into PostgreSQL).
fn on_backend_thread() -> bool {
    // SAFETY: plain system calls. A process's main thread has the process id as thread id.
    unsafe { libc::gettid() == libc::getpid() }
}

/// The probe behind `cancel()`, called between blocks of engine work on any thread. On the
/// backend's thread a pending interrupt that is not a stop is served right away, as PostgreSQL
/// serves interrupts between the rows of a query, so barriers (CREATE/DROP DATABASE) and
/// requests such as pg_log_backend_memory_contexts never wait for a long call to end.
fn probe() -> bool {
    if stop_requested() {
        return true;
    }
    if interrupt_pending() && on_backend_thread() {
        // Raises the usual ERROR itself should a cancel arrive in between.
        pg_sys::check_for_interrupts!();
    }
    false
}

static PROBE: fn() -> bool = probe;

/// A cancellation probe for engine work running in this backend.
pub fn cancel() -> Cancel<'static> {
    Cancel::new(&PROBE)
}
