//! Running the async Rust client from Python: one shared tokio runtime, calls that release
//! the GIL while they wait, and Ctrl-C (SIGINT) that cancels the running query.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pg_gpt3_client::CancelHandle;
use pyo3::prelude::*;

use crate::errors::to_py;

/// How often a waiting call looks at Python's signal flags.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pg_gpt3_client")
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// Runs `call` to its end with the GIL released. Every 50 ms it checks Python's signals: on
/// Ctrl-C (or any signal handler raising) it asks the server to cancel through `cancel`,
/// lets the call end, and raises the handler's exception (KeyboardInterrupt).
pub fn wait<T: Send>(
    py: Python<'_>,
    cancel: Option<&CancelHandle>,
    call: impl Future<Output = Result<T, pg_gpt3_client::Error>> + Send,
) -> PyResult<T> {
    let rt = runtime();
    let mut call = Box::pin(call);
    loop {
        // The timer is made inside the runtime (block_on's context), which it needs.
        let step =
            py.detach(|| rt.block_on(async { tokio::time::timeout(SIGNAL_POLL, &mut call).await }));
        match step {
            Ok(result) => return result.map_err(|e| to_py(py, e)),
            Err(_) => {
                if let Err(interrupt) = py.check_signals() {
                    if let Some(cancel) = cancel {
                        py.detach(|| {
                            let _ = rt.block_on(cancel.cancel());
                            let _ = rt.block_on(&mut call);
                        });
                    }
                    return Err(interrupt);
                }
            }
        }
    }
}
