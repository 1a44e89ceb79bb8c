//! Pushing rows already handed to PostgreSQL out to the client before the next one is
//! computed, so a streaming function's rows arrive as they are produced (PostgreSQL otherwise
//! sends its 8 kB output buffer only when it is full or the query ends).

use pgrx::pg_sys;

/// PostgreSQL 15's `PQcommMethods` (libpq/libpq.h); pgrx does not bind it.
#[repr(C)]
struct PqCommMethods {
    comm_reset: unsafe extern "C-unwind" fn(),
    flush: unsafe extern "C-unwind" fn() -> std::ffi::c_int,
    flush_if_writable: unsafe extern "C-unwind" fn() -> std::ffi::c_int,
    is_send_pending: unsafe extern "C-unwind" fn() -> bool,
}

extern "C-unwind" {
    static PqCommMethods: *const PqCommMethods;
}

/// Flushes pending protocol output to a remote client (a no-op for other destinations).
/// A failed flush only marks the connection lost (logged as COMMERROR); it never throws.
pub fn flush_to_client() {
    // SAFETY: reads backend globals on the backend thread; the flush function is PostgreSQL's
    // own socket flush, which reports failures without raising an ERROR.
    unsafe {
        if pg_sys::whereToSendOutput != pg_sys::CommandDest::DestRemote || PqCommMethods.is_null() {
            return;
        }
        ((*PqCommMethods).flush)();
    }
}
