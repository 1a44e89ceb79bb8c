//! The HTTP worker's own thread: a database session that takes jobs from the HTTP thread,
//! checks each request's API key, reads its model and tokenizer as the key's role, and decodes
//! every running request of a model together (continuous batching: requests join and leave
//! between steps, each step is one pass over the weights for all of them).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use pg_llm_engine::generate::{check_fits, next_tokens_with, GenerateOptions, Generator};
use pg_llm_engine::model::Model;
use pg_llm_engine::sample::SamplingParams;
use pg_llm_engine::tokenizer::Bpe;
use pg_llm_engine::{memory, Cancel, EngineError};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::openai::{ApiError, Completion, Prompt};
use super::{anonymous_role, publish, Event, Job, Limits, MAX_BATCH};
use crate::stats::{self, Counter};
use crate::{guc, model_cache, spi, tokenizer_cache};

/// Prompts up to this many tokens are processed within a decoding pass (see `start`).
const BATCHED_PROMPT_TOKENS: usize = 64;

/// A completion waiting for its turn.
struct Waiting {
    key: Option<String>,
    request: Completion,
    events: UnboundedSender<Event>,
}

/// A running completion.
struct Running {
    generator: Generator<Rc<Model>>,
    out: Output,
}

/// What a running completion has sent its client.
struct Output {
    bpe: Rc<Bpe>,
    events: UnboundedSender<Event>,
    /// Generated ids, EOS excluded.
    ids: Vec<u32>,
    /// Tokens produced, EOS included.
    produced: usize,
    eos: Option<u32>,
    stop: Vec<String>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    timing: stats::Request,
    finished: bool,
}

pub fn run(jobs: Receiver<Job>, limits: &Limits) {
    guc::apply();
    publish(limits);
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    loop {
        if shutdown_requested() {
            break;
        }
        absorb_barriers();
        if BackgroundWorker::sighup_received() {
            // SAFETY: the worker's thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            publish(limits);
            guc::apply();
        }
        if running.is_empty() && waiting.is_empty() {
            match jobs.recv_timeout(Duration::from_millis(200)) {
                Ok(job) => take(job, &mut waiting),
                Err(RecvTimeoutError::Timeout) => {
                    // False once the postmaster is gone (or a SIGTERM came).
                    if !BackgroundWorker::wait_latch(Some(Duration::ZERO)) {
                        break;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            take(job, &mut waiting);
        }
        while running.len() < MAX_BATCH.get().max(1) as usize {
            let Some(w) = waiting.pop_front() else { break };
            if w.events.is_closed() {
                stats::count(Counter::RequestsCancelled, 1);
                continue;
            }
            let events = w.events.clone();
            match start(w) {
                Ok(Some(r)) => running.push(r),
                Ok(None) => {}
                Err(e) => fail(&events, e),
            }
        }
        step(&mut running);
    }
    let gone = ApiError::unavailable("the pg_llm HTTP worker is shutting down");
    for w in waiting {
        let _ = w.events.send(Event::Error(gone.clone()));
    }
    for r in running {
        let _ = r.out.events.send(Event::Error(gone.clone()));
    }
}

/// Answers PostgreSQL's process-signal barriers (which commands such as DROP DATABASE wait on
/// in every process) without taking other interrupts: the loop never runs
/// CHECK_FOR_INTERRUPTS, whose cancel or die handling would end the worker with an ERROR.
fn absorb_barriers() {
    // SAFETY: a flag set by PostgreSQL's SIGUSR1 handler, and its own absorbing function,
    // called on the worker's thread outside any transaction.
    unsafe {
        if std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::ProcSignalBarrierPending)) != 0 {
            pg_sys::ProcessProcSignalBarrier();
        }
    }
}

fn shutdown_requested() -> bool {
    // SAFETY: a flag the SIGTERM handler sets; safe to read from any thread.
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::ShutdownRequestPending)) != 0 }
}

static PROBE: fn() -> bool = shutdown_requested;

fn fail(events: &UnboundedSender<Event>, e: ApiError) {
    if let Some(code) = &e.code {
        if code.len() == 5 {
            stats::count_error(code);
        }
    }
    let _ = events.send(Event::Error(e));
}

/// Answers the quick jobs at once; completions wait for a place in the batch.
fn take(job: Job, waiting: &mut VecDeque<Waiting>) {
    match job {
        Job::Health(reply) => {
            let _ = reply.send(in_transaction(|| {
                let installed = spi::read_one::<bool>(
                    "SELECT true FROM pg_catalog.pg_extension WHERE extname = 'pg_llm'",
                    &[],
                )?;
                installed.map(|_| ()).ok_or_else(|| {
                    EngineError::NotReady("pg_llm is not installed in pg_llm.http_database".into())
                })
            }));
        }
        Job::Metrics(reply) => {
            let _ = reply.send(in_transaction(|| {
                set_search_path()?;
                Ok(stats::prometheus(&crate::api::serving::weight_versions()?))
            }));
        }
        Job::Models { key, reply } => {
            let _ = reply.send(as_key_role(key.as_deref(), || {
                let mut models = Vec::new();
                spi::read(
                    "SELECT model, owner::text FROM llm_model_config ORDER BY model",
                    &[],
                    |row| {
                        let text = |i| row.get::<String>(i).map_err(crate::errors::spi_error);
                        models.push((text(1)?.unwrap_or_default(), text(2)?.unwrap_or_default()));
                        Ok(())
                    },
                )?;
                Ok(models)
            }));
        }
        Job::Complete {
            key,
            request,
            events,
        } => waiting.push_back(Waiting {
            key,
            request,
            events,
        }),
    }
}

/// Reads the request's model and tokenizer as its role and processes its prompt; `None` when
/// it asks for no tokens (answered at once).
fn start(w: Waiting) -> Result<Option<Running>, ApiError> {
    let req = &w.request;
    let (model, bpe, prompt) = as_key_role(w.key.as_deref(), || {
        let bpe = tokenizer_cache::for_model(&req.model)?;
        let prompt = match &req.prompt {
            Prompt::Text(t) => bpe.encode(t)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        let need = |cfg: &_, dtype| {
            check_fits(cfg, prompt.len(), req.max_tokens)?;
            memory::generation(cfg, prompt.len(), req.max_tokens, 1, dtype, guc::threads())
        };
        let model = model_cache::get_within(&req.model, "POST /v1/completions", need)?;
        Ok((model, bpe, prompt))
    })?;
    let engine_error = |e: EngineError| ApiError::from_sqlstate(e.sqlstate(), e.to_string());
    let opts = GenerateOptions {
        max_tokens: req.max_tokens,
        sampling: SamplingParams::new(req.temperature, req.top_k, req.top_p)
            .map_err(engine_error)?,
        eos: bpe.end_of_text(),
        seed: req.seed,
    };
    let timing = stats::Request::start(Counter::RequestsHttp, prompt.len());
    // A short prompt is processed in the next decoding pass, beside the other requests' rows;
    // a long one now, on its own (one row at a time would be slower than its matrix products).
    // Either way by a rule of the request alone, so its tokens do not depend on the others.
    let generator = if prompt.len() <= BATCHED_PROMPT_TOKENS {
        Generator::deferred(model, &prompt, opts)
    } else {
        Generator::new(model, &prompt, opts, Cancel::new(&PROBE))
    }
    .map_err(engine_error)?;
    let _ = w.events.send(Event::Started {
        prompt_tokens: prompt.len(),
    });
    if req.echo {
        let _ = w
            .events
            .send(Event::Text(bpe.decode(&prompt).map_err(engine_error)?));
    }
    if req.max_tokens == 0 {
        let _ = w.events.send(Event::Done {
            finish_reason: "length",
            completion_tokens: 0,
        });
        return Ok(None);
    }
    Ok(Some(Running {
        generator,
        out: Output {
            eos: bpe.end_of_text(),
            bpe,
            events: w.events,
            ids: Vec::new(),
            produced: 0,
            stop: req.stop.clone(),
            sent: 0,
            timing,
            finished: false,
        },
    }))
}

/// One decoding step of every running completion, those of one model together. Each token is
/// sent as soon as it is drawn, before the pass that prepares the next one.
fn step(running: &mut Vec<Running>) {
    running.retain(|r| {
        let gone = r.out.events.is_closed();
        if gone {
            stats::count(Counter::RequestsCancelled, 1);
        }
        !gone
    });
    let mut models: Vec<*const Model> = running.iter().map(model_of).collect();
    models.sort();
    models.dedup();
    for model in models {
        let (mut gens, mut outs): (Vec<_>, Vec<_>) = running
            .iter_mut()
            .filter(|r| model_of(r) == model)
            .map(|r| (&mut r.generator, &mut r.out))
            .unzip();
        stats::count(Counter::DecodeSteps, 1);
        stats::count(Counter::DecodeRows, gens.len() as u64);
        let send = |tokens: &[Option<(u32, bool)>]| {
            for (out, &t) in outs.iter_mut().zip(tokens) {
                if let Err(e) = out.accept(t) {
                    fail(
                        &out.events,
                        ApiError::from_sqlstate(e.sqlstate(), e.to_string()),
                    );
                    out.finished = true;
                }
            }
        };
        if let Err(e) = next_tokens_with(&mut gens, Cancel::new(&PROBE), send) {
            let e = ApiError::from_sqlstate(e.sqlstate(), e.to_string());
            for r in running.iter_mut().filter(|r| model_of(r) == model) {
                if !r.out.finished {
                    fail(&r.out.events, e.clone());
                    r.out.finished = true;
                }
            }
        }
    }
    running.retain(|r| !r.out.finished);
}

fn model_of(r: &Running) -> *const Model {
    r.generator.model() as *const Model
}

impl Output {
    /// Takes the step's token: sends the text it completes, and the end when it is the last.
    fn accept(&mut self, token: Option<(u32, bool)>) -> pg_llm_engine::Result<()> {
        // None: the pass processed this request's prompt.
        let Some((token, last)) = token else {
            return Ok(());
        };
        self.timing.token();
        self.produced += 1;
        let eos = Some(token) == self.eos;
        if !eos {
            self.ids.push(token);
        }
        let text = self.bpe.decode(&self.ids)?;
        let mut reason = last.then_some(if eos { "stop" } else { "length" });
        let mut end = text.len();
        if let Some(at) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            end = at;
            reason = Some("stop");
        } else if reason.is_none() {
            // Hold back what may be the start of a stop sequence or of a character whose
            // bytes are still coming (decoded as U+FFFD for now).
            let hold = self.stop.iter().map(|s| s.len() - 1).max().unwrap_or(0);
            end = end.saturating_sub(hold);
            if let Some(at) = text.rfind('\u{FFFD}') {
                if at + '\u{FFFD}'.len_utf8() == text.len() {
                    end = end.min(at);
                }
            }
            while !text.is_char_boundary(end) {
                end -= 1;
            }
        }
        if end > self.sent {
            let _ = self
                .events
                .send(Event::Text(text[self.sent..end].to_string()));
            self.sent = end;
        }
        if let Some(finish_reason) = reason {
            let _ = self.events.send(Event::Done {
                finish_reason,
                completion_tokens: self.produced,
            });
            self.finished = true;
        }
        Ok(())
    }
}

/// Runs `body` in a transaction of its own; a database error or an engine error becomes the
/// HTTP error for its SQLSTATE, and the transaction rolls back.
fn in_transaction<R>(body: impl FnOnce() -> pg_llm_engine::Result<R>) -> Result<R, ApiError> {
    // SAFETY: the worker's thread, between transactions.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let body = AssertUnwindSafe(body);
    let outcome = PgTryBuilder::new(move || {
        let body = body;
        (body.0)().map_err(|e| ApiError::from_sqlstate(e.sqlstate(), e.to_string()))
    })
    .catch_others(|caught| {
        let (code, message) = match &caught {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => (
                stats::sqlstate_of(r.sql_error_code() as i32),
                r.message().to_string(),
            ),
        };
        Err(ApiError::from_sqlstate(&code, message))
    })
    .execute();
    // SAFETY: ends the transaction begun above; an abort also restores the user id.
    unsafe {
        match &outcome {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    outcome
}

/// The worker session looks for pg_llm's tables in the extension's schema.
fn set_search_path() -> pg_llm_engine::Result<()> {
    let schema = spi::read_one::<String>(
        "SELECT n.nspname::text FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_llm'",
        &[],
    )?
    .ok_or_else(|| {
        EngineError::NotReady("pg_llm is not installed in pg_llm.http_database".into())
    })?;
    spi::read(
        "SELECT pg_catalog.set_config('search_path', pg_catalog.quote_ident($1) || ', pg_catalog, pg_temp', true)",
        &[schema.as_str().into()],
        |_| Ok(()),
    )
}

/// Runs `body` in a transaction as the role of API key `key` (or the anonymous role when there
/// is no key and one is configured): 401 for an unknown key.
fn as_key_role<R>(
    key: Option<&str>,
    body: impl FnOnce() -> pg_llm_engine::Result<R>,
) -> Result<R, ApiError> {
    let anonymous = anonymous_role();
    // One transaction: the role is looked up as the worker, then the body runs as that role.
    let out = in_transaction(|| {
        set_search_path()?;
        let role = match key {
            Some(k) => spi::read_one::<pg_sys::Oid>(
                "SELECT r.oid FROM llm_api_key a JOIN pg_catalog.pg_roles r ON r.rolname = a.role_name
                  WHERE a.key_digest = pg_catalog.sha256(pg_catalog.convert_to($1, 'UTF8'))",
                &[k.into()],
            )?,
            None => match &anonymous {
                Some(name) => spi::read_one::<pg_sys::Oid>(
                    "SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1",
                    &[name.as_str().into()],
                )?,
                None => None,
            },
        };
        let Some(role) = role else {
            return Ok(None);
        };
        let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
        // SAFETY: switches the current user for this transaction only (an abort restores it).
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(
                role,
                context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
            );
        }
        let out = body();
        // SAFETY: as above.
        unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
        out.map(Some)
    })?;
    out.ok_or_else(|| match key {
        Some(_) => ApiError::unauthorized("invalid API key"),
        None => ApiError::unauthorized(
            "an API key is required (Authorization: Bearer <key>; see llm_create_api_key)",
        ),
    })
}
