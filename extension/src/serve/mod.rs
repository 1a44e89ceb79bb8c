//! The HTTP endpoint: background workers (`shared_preload_libraries = 'pg_llm'`,
//! `pg_llm.http_enabled = on`) that serve OpenAI-compatible completions from pg_llm's models.
//!
//! A worker has two threads. The HTTP thread (http.rs, axum on tokio) parses requests and never
//! calls PostgreSQL. The worker's own thread (scheduler.rs) is a database session: it checks
//! API keys, runs each request as the key's role (so the privilege model of docs/security.md
//! applies), loads models and tokenizers through the same caches as SQL calls, and decodes all
//! running requests of a model together, one pass over the weights per step. See
//! docs/serving.md.

use std::ffi::CStr;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use tokio::sync::{mpsc, oneshot};

mod http;
pub mod openai;
mod scheduler;

use openai::{ApiError, Completion};

pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static LISTEN_ADDRESS: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"127.0.0.1"));
pub static PORT: GucSetting<i32> = GucSetting::<i32>::new(8432);
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static DATABASE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"postgres"));
pub static MAX_REQUESTS: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static MAX_BATCH: GucSetting<i32> = GucSetting::<i32>::new(16);
pub static ANONYMOUS_ROLE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);

/// Settings the HTTP thread reads; the worker's thread copies them from the GUCs at start and
/// on reload (GUC memory belongs to the worker's thread).
pub struct Limits {
    pub max_requests: AtomicUsize,
}

/// A request handed from the HTTP thread to the scheduler.
pub enum Job {
    Health(oneshot::Sender<Result<(), ApiError>>),
    Metrics(oneshot::Sender<Result<String, ApiError>>),
    Models {
        key: Option<String>,
        reply: oneshot::Sender<Result<Vec<(String, String)>, ApiError>>,
    },
    Complete {
        key: Option<String>,
        request: Completion,
        events: mpsc::UnboundedSender<Event>,
    },
}

/// What the scheduler tells the HTTP thread about a completion.
pub enum Event {
    Started {
        prompt_tokens: usize,
    },
    Text(String),
    Done {
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    Error(ApiError),
}

/// Defines the endpoint's settings and registers its workers; called from `_PG_init` while
/// the postmaster preloads the library (the only time background workers may be registered).
pub fn register() {
    GucRegistry::define_bool_guc(
        c"pg_llm.http_enabled",
        c"Start pg_llm's HTTP endpoint (OpenAI-compatible completions) with the server.",
        c"Needs pg_llm in shared_preload_libraries. See docs/serving.md.",
        &ENABLED,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_llm.http_listen_address",
        c"Address the HTTP endpoint listens on.",
        c"An IPv4 or IPv6 address; 0.0.0.0 listens on every interface.",
        &LISTEN_ADDRESS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_llm.http_port",
        c"TCP port of the HTTP endpoint.",
        c"",
        &PORT,
        1,
        65535,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_llm.http_workers",
        c"Background workers serving the HTTP endpoint (they share the port).",
        c"Each worker decodes its own requests together; more workers use more cores and memory.",
        &WORKERS,
        1,
        64,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_llm.http_database",
        c"Database whose pg_llm models the HTTP endpoint serves.",
        c"",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_llm.http_max_requests",
        c"Most requests one HTTP worker holds at once; more get 429 with Retry-After.",
        c"Running and waiting requests together.",
        &MAX_REQUESTS,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_llm.http_max_batch",
        c"Most requests one HTTP worker decodes together; the others wait their turn.",
        c"",
        &MAX_BATCH,
        1,
        1024,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_llm.http_anonymous_role",
        c"Role that HTTP requests without an API key run as (empty: a key is required).",
        c"",
        &ANONYMOUS_ROLE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    if !ENABLED.get() {
        return;
    }
    for i in 0..WORKERS.get() {
        BackgroundWorkerBuilder::new(&format!("pg_llm http worker {i}"))
            .set_type("pg_llm http")
            .set_library("pg_llm")
            .set_function("pg_llm_http_main")
            .set_argument(i.into_datum())
            .enable_spi_access()
            // Hot standbys serve too (reads only), once recovery is consistent.
            .set_start_time(BgWorkerStartTime::ConsistentState)
            .set_restart_time(Some(std::time::Duration::from_secs(5)))
            .load();
    }
}

fn setting(s: &GucSetting<Option<std::ffi::CString>>) -> String {
    s.get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Entry point of an HTTP worker process.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_llm_http_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = setting(&DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    let addr: SocketAddr = match format!("{}:{}", setting(&LISTEN_ADDRESS), PORT.get())
        .parse()
        .or_else(|_| format!("[{}]:{}", setting(&LISTEN_ADDRESS), PORT.get()).parse())
    {
        Ok(a) => a,
        Err(_) => error!(
            "pg_llm.http_listen_address \"{}\" is not an IP address",
            setting(&LISTEN_ADDRESS)
        ),
    };
    let limits = Arc::new(Limits {
        max_requests: AtomicUsize::new(MAX_REQUESTS.get() as usize),
    });
    let (jobs_tx, jobs) = std::sync::mpsc::channel();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let http_limits = limits.clone();
    let shared_port = WORKERS.get() > 1;
    let started = pg_llm_engine::parallel::spawn("pg_llm http", move || {
        http::serve(addr, shared_port, jobs_tx, http_limits, ready_tx)
    });
    if let Err(e) = started {
        error!("pg_llm http worker: cannot start its HTTP thread: {e}");
    }
    match ready.recv() {
        Ok(Ok(())) => log!("pg_llm http worker listening on {addr} (database \"{database}\")"),
        Ok(Err(e)) => error!("pg_llm http worker: {e}"),
        Err(_) => error!("pg_llm http worker: the HTTP thread ended"),
    }
    scheduler::run(jobs, &limits);
    log!("pg_llm http worker on {addr} stopped");
    // Exit status 1 asks the postmaster to start the worker again after its restart time (0
    // would deregister it for the server's life): a SIGTERM that is not a shutdown (DROP
    // DATABASE ... WITH (FORCE), pg_terminate_backend) must not end the endpoint for good.
    // During a shutdown the postmaster restarts nothing.
    // SAFETY: ends the process the way PostgreSQL's own code does.
    unsafe { pg_sys::proc_exit(1) };
}

/// Copies the reloadable settings for the HTTP thread.
fn publish(limits: &Limits) {
    limits
        .max_requests
        .store(MAX_REQUESTS.get().max(1) as usize, Ordering::Relaxed);
}

/// The anonymous role's name, if requests without a key are allowed.
fn anonymous_role() -> Option<String> {
    ANONYMOUS_ROLE
        .get()
        .and_then(|c| CStr::to_str(&c).ok().map(str::to_string))
        .filter(|s| !s.is_empty())
}
