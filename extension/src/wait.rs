//! Waiting inside a backend without becoming deaf to a cancel: naps on the backend's latch,
//! and the pacing of bulk writes to the WAL's flush.

use std::time::Duration;

use pgrx::pg_sys;

/// Sleeps `pause` on the backend's latch, serving interrupts (a cancel raises its ERROR).
pub fn nap(pause: Duration) {
    // SAFETY: the backend's own latch on the backend's thread; WL_EXIT_ON_PM_DEATH ends the
    // backend should the postmaster die.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            pause.as_millis() as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// WAL that a bulk writer may leave unflushed before its next row (one 4 MB chunk row and
/// its headers).
const WAL_SLACK: u64 = 6 * 1024 * 1024;

/// Call before each large row a bulk write stores (model rows: hundreds of MB of WAL per
/// statement). Waits, serving interrupts, until the WAL this backend inserted is flushed to
/// within `WAL_SLACK`, waking the WAL writer to flush it.
///
/// Why: a backend that outruns the disk fills the WAL buffers and then waits inside
/// PostgreSQL's WAL insertion for the WAL write lock, held by whoever is in `fdatasync` —
/// measured at up to 200 ms on a 2-core machine while a checkpoint writes — and PostgreSQL
/// does not serve a cancel there. Waiting here instead keeps the writer at the disk's pace
/// (which it was held to anyway) and lets a cancel land within a millisecond.
pub fn pace_to_wal_flush() {
    pgrx::check_for_interrupts!();
    // SAFETY: plain reads of the WAL positions in shared memory and a latch set; callable
    // from any backend at any time (the same calls an asynchronous commit makes).
    unsafe {
        // A single-user backend has no WAL writer to wait for.
        if !pg_sys::IsUnderPostmaster {
            return;
        }
        let inserted = pg_sys::GetXLogInsertRecPtr();
        loop {
            let flushed = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
            if inserted <= flushed + WAL_SLACK {
                return;
            }
            // Asks the WAL writer to flush up to `inserted` (it sleeps up to
            // wal_writer_delay otherwise).
            pg_sys::XLogSetAsyncXactLSN(inserted);
            nap(Duration::from_millis(1));
        }
    }
}
