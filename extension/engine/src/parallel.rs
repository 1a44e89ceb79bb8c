//! Compute threads and cooperative cancellation.
//!
//! Worker threads only ever run pure computation; they are created with every signal blocked so
//! that a host process's signal handlers (PostgreSQL's SIGINT / SIGALRM for cancel and
//! statement_timeout) keep running on the host's own thread.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{EngineError, Result};

/// Upper bound on the thread-count setting; protects against absurd configuration values.
pub const MAX_THREADS: usize = 256;

static WANTED_THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: Mutex<Option<(usize, Arc<ThreadPool>)>> = Mutex::new(None);

/// Number of hardware threads available to this process, asked once: std reads the cgroup
/// files for it on every call, which kernels would otherwise pay per product.
pub fn available_threads() -> usize {
    static AVAILABLE: OnceLock<usize> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Sets the number of compute threads (0 = all available hardware threads).
pub fn set_threads(n: usize) {
    WANTED_THREADS.store(n.min(MAX_THREADS), Ordering::Relaxed);
}

/// The number of compute threads kernels will use.
pub fn threads() -> usize {
    match WANTED_THREADS.load(Ordering::Relaxed) {
        0 => available_threads(),
        n => n,
    }
}

fn pool() -> Arc<ThreadPool> {
    let wanted = threads();
    let mut guard = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((n, pool)) = guard.as_ref() {
        if *n == wanted {
            return pool.clone();
        }
    }
    let pool = Arc::new(build_pool(wanted));
    *guard = Some((wanted, pool.clone()));
    pool
}

fn build_pool(n: usize) -> ThreadPool {
    // Threads inherit the creating thread's signal mask: block everything while spawning.
    let _mask = BlockSignals::new();
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("pg_llm compute {i}"))
        .build()
        .expect("failed to start compute threads")
}

/// Runs `f` on the compute pool; rayon calls inside `f` use the configured thread count.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if threads() == 1 {
        return f();
    }
    pool().install(f)
}

/// Values per task for memory-bound elementwise work: below this, a task costs more to hand
/// out than it saves.
const ELEMENTWISE_GRAIN: usize = 32 * 1024;

/// Runs `f(first_row, rows)` over consecutive blocks of whole `row_len`-value rows of `data`,
/// on the compute pool when `data` is large enough to be worth it. Results do not depend on
/// the thread count: each row is processed by exactly one call.
pub fn for_rows(data: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    use rayon::prelude::*;
    let row_len = row_len.max(1);
    let rows_per_task = ELEMENTWISE_GRAIN.div_ceil(row_len);
    if threads() == 1 || data.len() <= ELEMENTWISE_GRAIN {
        return f(0, data);
    }
    install(|| {
        data.par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(i, block)| f(i * rows_per_task, block))
    })
}

/// Zero-fills `buf` on the compute pool, checking `cancel` between blocks, and returns it as
/// initialised floats. For large fresh allocations (a result value), whose first touch is
/// page faults that would otherwise run serially and uncancellably.
pub fn zeroed<'a>(buf: &'a mut [MaybeUninit<f32>], cancel: Cancel) -> Result<&'a mut [f32]> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 20;
    if buf.len() <= BLOCK {
        // One block: not worth a trip to the pool.
        cancel.check()?;
        buf.fill(MaybeUninit::new(0.0));
    } else {
        install(|| {
            buf.par_chunks_mut(BLOCK).try_for_each(|block| {
                cancel.check()?;
                block.fill(MaybeUninit::new(0.0));
                Ok(())
            })
        })?;
    }
    // SAFETY: every element was written above; MaybeUninit<f32> has f32's layout.
    Ok(unsafe { &mut *(buf as *mut [MaybeUninit<f32>] as *mut [f32]) })
}

/// Runs `f` on a thread of its own that nobody waits for (work such as unlinking a large file,
/// which the kernel does without a way to interrupt it). Like the compute threads it starts
/// with every signal blocked, so the host's handlers only ever run on the host's thread.
pub fn detach(f: impl FnOnce() + Send + 'static) {
    // A thread that cannot start leaves the work undone, which callers accept.
    let _ = spawn("pg_llm background", f);
}

/// Starts a named thread with every signal blocked (see `detach`), for work that runs beside
/// the host's thread for long, such as a network server that never calls into the host.
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let _mask = BlockSignals::new();
    std::thread::Builder::new().name(name.into()).spawn(f)
}

/// Blocks all signals on the current thread until dropped.
struct BlockSignals {
    old: libc::sigset_t,
}

impl BlockSignals {
    fn new() -> Self {
        // SAFETY: plain libc calls on properly initialised sigset_t values.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            Self { old }
        }
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }
}

/// A cancellation probe handed to long-running work. The host decides what "stop" means
/// (PostgreSQL: an interrupt is pending). The probe must be cheap and callable from any thread.
#[derive(Clone, Copy)]
pub struct Cancel<'a> {
    probe: Option<&'a (dyn Fn() -> bool + Sync)>,
}

impl<'a> Cancel<'a> {
    /// Work that can never be cancelled (tests, benchmarks).
    pub const NEVER: Cancel<'static> = Cancel { probe: None };

    pub fn new(probe: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Self { probe: Some(probe) }
    }

    /// Returns `Err(Cancelled)` when the host asked the work to stop.
    #[inline]
    pub fn check(&self) -> Result<()> {
        match self.probe {
            Some(p) if p() => Err(EngineError::Cancelled),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_fills_every_value_and_honours_cancel() {
        let mut buf: Vec<MaybeUninit<f32>> = Vec::with_capacity(3_000_001);
        buf.resize(3_000_001, MaybeUninit::new(f32::NAN));
        let values = zeroed(&mut buf, Cancel::NEVER).unwrap();
        assert!(values.iter().all(|v| *v == 0.0));
        let stop = || true;
        assert!(matches!(
            zeroed(&mut buf, Cancel::new(&stop)),
            Err(EngineError::Cancelled)
        ));
    }
}
