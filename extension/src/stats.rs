//! Serving and training metrics, kept in shared memory so that every backend and the HTTP
//! workers count into one set: requests, tokens, latency histograms (time to first token, time
//! per token), errors by SQLSTATE, model loads and cache hits, training steps. Read as rows
//! (`llm_stats`) or as Prometheus text (`llm_metrics()`, and `/metrics` of the HTTP endpoint).
//!
//! Everything is an atomic, so any thread may count without a lock. The shared segment exists
//! when pg_llm is in `shared_preload_libraries`; without it each backend counts into memory of
//! its own and `llm_stats` says so (scope = 'backend').

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::pg_sys;

/// What is counted; the names are the Prometheus metric names without the `pg_llm_` prefix.
#[derive(Clone, Copy)]
pub enum Counter {
    RequestsSql,
    RequestsHttp,
    RequestsRejected,
    RequestsCancelled,
    PromptTokens,
    GeneratedTokens,
    DecodeSteps,
    DecodeRows,
    ModelLoads,
    ModelCacheHits,
    TrainingSteps,
}

const COUNTERS: [(Counter, &str, &str, &str); 11] = [
    (
        Counter::RequestsSql,
        "requests_total",
        "source=\"sql\"",
        "Generation requests.",
    ),
    (
        Counter::RequestsHttp,
        "requests_total",
        "source=\"http\"",
        "",
    ),
    (
        Counter::RequestsRejected,
        "requests_rejected_total",
        "",
        "HTTP requests refused with 429 (pg_llm.http_max_requests reached).",
    ),
    (
        Counter::RequestsCancelled,
        "requests_cancelled_total",
        "",
        "HTTP generations stopped because the client went away.",
    ),
    (
        Counter::PromptTokens,
        "prompt_tokens_total",
        "",
        "Prompt tokens processed by generation.",
    ),
    (
        Counter::GeneratedTokens,
        "generated_tokens_total",
        "",
        "Tokens generated.",
    ),
    (
        Counter::DecodeSteps,
        "decode_steps_total",
        "",
        "Batched decoding steps of the HTTP workers.",
    ),
    (
        Counter::DecodeRows,
        "decode_rows_total",
        "",
        "Sequences advanced by those steps (rows / steps = mean batch).",
    ),
    (
        Counter::ModelLoads,
        "model_loads_total",
        "",
        "Models materialised by a backend (a cache miss).",
    ),
    (
        Counter::ModelCacheHits,
        "model_cache_hits_total",
        "",
        "Calls served from a backend's loaded model.",
    ),
    (
        Counter::TrainingSteps,
        "training_steps_total",
        "",
        "Optimizer steps taken by llm_train_step / llm_train.",
    ),
];

/// Upper bounds of the latency buckets, in milliseconds (the last bucket is +Inf).
const BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000,
];

#[repr(C)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        let i = BUCKETS_MS
            .iter()
            .position(|&b| ms <= b as f64)
            .unwrap_or(BUCKETS_MS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

/// Errors by SQLSTATE: a fixed table of slots, each claimed once by a code.
const ERROR_SLOTS: usize = 64;
/// Seconds of the recent-throughput window.
const RECENT_SECONDS: usize = 64;

#[repr(C)]
pub struct Stats {
    started_unix: AtomicU64,
    counters: [AtomicU64; COUNTERS.len()],
    first_token: Histogram,
    per_token: Histogram,
    error_codes: [AtomicU32; ERROR_SLOTS],
    error_counts: [AtomicU64; ERROR_SLOTS],
    /// Tokens generated in each of the last seconds: slot = second % RECENT_SECONDS, tagged
    /// with its second so a slot from a previous lap counts as zero.
    recent_second: [AtomicU64; RECENT_SECONDS],
    recent_tokens: [AtomicU64; RECENT_SECONDS],
}

static SHARED: AtomicPtr<Stats> = AtomicPtr::new(std::ptr::null_mut());
static LOCAL: std::sync::OnceLock<&'static Stats> = std::sync::OnceLock::new();

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fresh() -> &'static Stats {
    // SAFETY: Stats is atomics only; all zeros is a valid value of each.
    let s: &'static Stats = Box::leak(Box::new(unsafe { std::mem::zeroed::<Stats>() }));
    s.started_unix.store(unix_now(), Relaxed);
    s
}

/// The shared statistics, or this process's own when there is no shared segment.
pub fn get() -> &'static Stats {
    let p = SHARED.load(Relaxed);
    if !p.is_null() {
        // SAFETY: set once to PostgreSQL's shared memory, which lives as long as the process.
        return unsafe { &*p };
    }
    LOCAL.get_or_init(fresh)
}

/// Whether the counts are shared by the whole server (pg_llm preloaded).
pub fn is_shared() -> bool {
    !SHARED.load(Relaxed).is_null()
}

pub fn count(c: Counter, n: u64) {
    get().counters[c as usize].fetch_add(n, Relaxed);
}

/// Counts an error by its SQLSTATE (five characters).
pub fn count_error(sqlstate: &str) {
    let code = pack(sqlstate);
    let s = get();
    for i in 0..ERROR_SLOTS {
        let slot = &s.error_codes[i];
        let held = match slot.compare_exchange(0, code, Relaxed, Relaxed) {
            Ok(_) => code,
            Err(current) => current,
        };
        if held == code {
            s.error_counts[i].fetch_add(1, Relaxed);
            return;
        }
    }
}

fn pack(sqlstate: &str) -> u32 {
    // PostgreSQL's own packing of the five characters (MAKE_SQLSTATE), never 0 for a code.
    sqlstate.bytes().take(5).enumerate().fold(0, |acc, (i, b)| {
        acc | (((b - b'0') as u32 & 0x3f) << (6 * i))
    })
}

fn unpack(code: u32) -> String {
    (0..5)
        .map(|i| (((code >> (6 * i)) & 0x3f) as u8 + b'0') as char)
        .collect()
}

/// The SQLSTATE of PostgreSQL's packed error code.
pub fn sqlstate_of(code: i32) -> String {
    unpack(code as u32)
}

/// Timing of one generation request: time to first token, then time per token.
pub struct Request {
    last: Instant,
    tokens: u64,
}

impl Request {
    /// Counts a request of `source` with a prompt of `prompt_tokens`; timing starts now.
    pub fn start(source: Counter, prompt_tokens: usize) -> Self {
        count(source, 1);
        count(Counter::PromptTokens, prompt_tokens as u64);
        Self {
            last: Instant::now(),
            tokens: 0,
        }
    }

    /// One more token produced.
    pub fn token(&mut self) {
        let now = Instant::now();
        let s = get();
        let h = if self.tokens == 0 {
            &s.first_token
        } else {
            &s.per_token
        };
        h.observe(now - self.last);
        self.last = now;
        self.tokens += 1;
        s.counters[Counter::GeneratedTokens as usize].fetch_add(1, Relaxed);
        let second = unix_now();
        let slot = second as usize % RECENT_SECONDS;
        if s.recent_second[slot].swap(second, Relaxed) != second {
            s.recent_tokens[slot].store(0, Relaxed);
        }
        s.recent_tokens[slot].fetch_add(1, Relaxed);
    }
}

/// Tokens per second over the last `window` whole seconds.
fn recent_rate(s: &Stats, window: u64) -> f64 {
    let now = unix_now();
    let total: u64 = (1..=window)
        .map(|ago| {
            let second = now - ago;
            let slot = second as usize % RECENT_SECONDS;
            if s.recent_second[slot].load(Relaxed) == second {
                s.recent_tokens[slot].load(Relaxed)
            } else {
                0
            }
        })
        .sum();
    total as f64 / window as f64
}

/// One metric sample: name (without prefix), labels (Prometheus syntax, may be empty), value.
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// Every sample, plus per model `(name, version)` gauges the caller read from the tables.
pub fn samples(versions: &[(String, i64)]) -> Vec<Sample> {
    let s = get();
    let mut out = Vec::new();
    let mut push = |name: &str, labels: String, value: f64| {
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        })
    };
    for (c, name, labels, _) in COUNTERS {
        push(
            name,
            labels.to_string(),
            s.counters[c as usize].load(Relaxed) as f64,
        );
    }
    for (i, code) in s.error_codes.iter().enumerate() {
        let code = code.load(Relaxed);
        if code != 0 {
            let n = s.error_counts[i].load(Relaxed) as f64;
            push("errors_total", format!("sqlstate=\"{}\"", unpack(code)), n);
        }
    }
    for (name, h) in [
        ("time_to_first_token_seconds", &s.first_token),
        ("time_per_token_seconds", &s.per_token),
    ] {
        let mut cumulative = 0;
        for (i, c) in h.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            let le = BUCKETS_MS
                .get(i)
                .map_or("+Inf".to_string(), |ms| format!("{}", *ms as f64 / 1e3));
            push(
                &format!("{name}_bucket"),
                format!("le=\"{le}\""),
                cumulative as f64,
            );
        }
        push(
            &format!("{name}_sum"),
            String::new(),
            h.sum_us.load(Relaxed) as f64 / 1e6,
        );
        push(&format!("{name}_count"), String::new(), cumulative as f64);
    }
    push(
        "tokens_per_second",
        "window=\"10s\"".into(),
        recent_rate(s, 10),
    );
    push(
        "tokens_per_second",
        "window=\"60s\"".into(),
        recent_rate(s, 60),
    );
    let uptime = unix_now().saturating_sub(s.started_unix.load(Relaxed));
    push("uptime_seconds", String::new(), uptime as f64);
    for (model, version) in versions {
        let label = model.replace('\\', "\\\\").replace('"', "\\\"");
        push(
            "weight_version",
            format!("model=\"{label}\""),
            *version as f64,
        );
    }
    out
}

/// The Prometheus text exposition of `samples(versions)`.
pub fn prometheus(versions: &[(String, i64)]) -> String {
    let help = |name: &str| -> Option<(&'static str, &'static str)> {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        match base {
            "time_to_first_token_seconds" => {
                Some(("histogram", "Time from request to first token."))
            }
            "time_per_token_seconds" => Some(("histogram", "Time between generated tokens.")),
            "errors_total" => Some(("counter", "pg_llm errors by SQLSTATE.")),
            "tokens_per_second" => Some(("gauge", "Tokens generated per second, recent window.")),
            "uptime_seconds" => Some(("gauge", "Seconds since the counters started.")),
            "weight_version" => Some(("gauge", "Current weight version of each model.")),
            _ => COUNTERS
                .iter()
                .find(|c| c.1 == base && !c.3.is_empty())
                .map(|c| ("counter", c.3)),
        }
    };
    let mut text = String::new();
    let mut described = std::collections::HashSet::new();
    for s in samples(versions) {
        let base = s
            .name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count")
            .to_string();
        if described.insert(base.clone()) {
            if let Some((kind, about)) = help(&s.name) {
                text.push_str(&format!(
                    "# HELP pg_llm_{base} {about}\n# TYPE pg_llm_{base} {kind}\n"
                ));
            }
        }
        let labels = if s.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", s.labels)
        };
        text.push_str(&format!("pg_llm_{}{labels} {}\n", s.name, s.value));
    }
    // A family without samples yet is still described, so scrapers and readers know it.
    if !described.contains("errors_total") {
        text.push_str("# HELP pg_llm_errors_total pg_llm errors by SQLSTATE.\n");
        text.push_str("# TYPE pg_llm_errors_total counter\n");
    }
    text
}

// ---- the shared segment (only when preloaded) ----

static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// Asks PostgreSQL for the shared segment; call from `_PG_init` while preloading.
pub fn register_shared_memory() {
    // SAFETY: hooks are installed once by the postmaster while it loads the library.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_shared_memory);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(attach_shared_memory);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_shared_memory() {
    if let Some(prev) = PREV_REQUEST_HOOK {
        prev();
    }
    pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Stats>());
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn attach_shared_memory() {
    if let Some(prev) = PREV_STARTUP_HOOK {
        prev();
    }
    // AddinShmemInitLock, the 22nd of the main LWLocks (a macro in C).
    let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut found = false;
    let p = pg_sys::ShmemInitStruct(
        c"pg_llm stats".as_ptr(),
        std::mem::size_of::<Stats>(),
        &mut found,
    ) as *mut Stats;
    if !found {
        std::ptr::write_bytes(p, 0, 1);
        (*p).started_unix.store(unix_now(), Relaxed);
    }
    pg_sys::LWLockRelease(init_lock);
    SHARED.store(p, Relaxed);
}
