//! The HTTP side of the endpoint: an axum server on a thread of its own (a tokio runtime that
//! never calls into PostgreSQL). Each request becomes a `Job` for the worker's main thread
//! (the scheduler), and its answer or its stream of events comes back over a channel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::openai::{self, ApiError, Envelope, Usage};
use super::{Event, Job, Limits};

#[derive(Clone)]
struct App {
    jobs: Sender<Job>,
    limits: Arc<Limits>,
    in_flight: Arc<AtomicUsize>,
}

/// Serves `addr` until the process ends; `ready` gets the outcome of binding the socket.
pub fn serve(
    addr: SocketAddr,
    shared_port: bool,
    jobs: Sender<Job>,
    limits: Arc<Limits>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start the HTTP runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match bind(addr, shared_port) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot listen on {addr}: {e}")));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let app = App {
            jobs,
            limits,
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        let router = Router::new()
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .route("/v1/models", get(models))
            .route("/v1/completions", post(completions))
            .with_state(app);
        // Serving ends only with the process (the worker exits on SIGTERM).
        let _ = axum::serve(listener, router).await;
    });
}

/// The listening socket. With several workers each binds it with SO_REUSEPORT and the kernel
/// spreads connections over them; a single worker does not, so that a port already taken (by
/// another server, say) is an error rather than a silently shared port.
fn bind(addr: SocketAddr, shared: bool) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(shared)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

/// Sends `job` to the scheduler and waits for its answer.
async fn ask<T>(app: &App, make: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    app.jobs
        .send(make(tx))
        .map_err(|_| ApiError::unavailable("the pg_llm worker is shutting down"))?;
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .map_err(|_| ApiError::unavailable("the pg_llm worker did not answer in 30 s"))?
        .map_err(|_| ApiError::unavailable("the pg_llm worker is shutting down"))
}

fn api_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ").unwrap_or(value).trim();
    (!key.is_empty()).then(|| key.to_string())
}

async fn health(State(app): State<App>) -> Response {
    match ask(&app, Job::Health).await.and_then(|r| r) {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    match ask(&app, Job::Metrics).await.and_then(|r| r) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => error_response(&e),
    }
}

async fn models(State(app): State<App>, headers: HeaderMap) -> Response {
    let key = api_key(&headers);
    match ask(&app, |reply| Job::Models { key, reply })
        .await
        .and_then(|r| r)
    {
        Ok(list) => Json(openai::models_body(&list)).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Holds one of the worker's request slots until dropped (the end of a response or stream).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn take_slot(app: &App) -> Option<Slot> {
    let max = app.limits.max_requests.load(Ordering::Relaxed);
    let taken = app
        .in_flight
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        });
    taken.ok().map(|_| Slot(app.in_flight.clone()))
}

fn too_many() -> Response {
    crate::stats::count(crate::stats::Counter::RequestsRejected, 1);
    let e = ApiError {
        status: 429,
        kind: "rate_limit_error",
        message: "too many concurrent requests for this pg_llm HTTP worker \
                  (pg_llm.http_max_requests); retry later"
            .into(),
        code: Some("rate_limit_exceeded".into()),
    };
    let mut r = error_response(&e);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let request = match openai::parse_completion(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let Some(slot) = take_slot(&app) else {
        return too_many();
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let job = Job::Complete {
        key: api_key(&headers),
        request: request.clone(),
        events: events_tx,
    };
    if app.jobs.send(job).is_err() {
        return error_response(&ApiError::unavailable("the pg_llm worker is shutting down"));
    }
    let envelope = Envelope {
        id: format!("cmpl-{:x}", rand_id()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: request.model.clone(),
    };
    if request.stream {
        stream_response(events, envelope, request.include_usage, slot).await
    } else {
        whole_response(events, envelope).await
    }
}

fn rand_id() -> u128 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    nanos ^ ((NEXT.fetch_add(1, Ordering::Relaxed) as u128) << 96) ^ std::process::id() as u128
}

/// Waits for the whole completion (dropping `events` on a client disconnect stops the work).
async fn whole_response(
    mut events: mpsc::UnboundedReceiver<Event>,
    envelope: Envelope,
) -> Response {
    let mut text = String::new();
    let mut prompt_tokens = 0;
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Started { prompt_tokens: p } => prompt_tokens = p,
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                completion_tokens,
            } => {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                };
                return Json(envelope.completion(&text, finish_reason, usage)).into_response();
            }
            Event::Error(e) => return error_response(&e),
        }
    }
    error_response(&ApiError::unavailable("the pg_llm worker stopped"))
}

/// Server-sent events: one chunk per piece of text, a last chunk with the finish reason, the
/// usage when asked, then `[DONE]`. An error before the first piece is an HTTP error; after it,
/// an error event. The stream owns the request slot and the channel: a client that goes away
/// drops both, and the scheduler stops its generation.
async fn stream_response(
    mut events: mpsc::UnboundedReceiver<Event>,
    envelope: Envelope,
    include_usage: bool,
    slot: Slot,
) -> Response {
    // Wait for the start (or the refusal) so that an error gets its HTTP status.
    let prompt_tokens = match events.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Error(e)) => return error_response(&e),
        _ => return error_response(&ApiError::unavailable("the pg_llm worker stopped")),
    };
    let envelope = Arc::new(envelope);
    let chunks = stream::unfold((events, false, slot), move |(mut events, done, slot)| {
        let envelope = envelope.clone();
        async move {
            if done {
                return None;
            }
            let data: Vec<String> = match events.recv().await {
                Some(Event::Text(t)) => vec![envelope.chunk(&t, None).to_string()],
                Some(Event::Done {
                    finish_reason,
                    completion_tokens,
                }) => {
                    let mut out = vec![envelope.chunk("", Some(finish_reason)).to_string()];
                    if include_usage {
                        let usage = Usage {
                            prompt_tokens,
                            completion_tokens,
                        };
                        out.push(envelope.usage_chunk(usage).to_string());
                    }
                    out.push("[DONE]".into());
                    out
                }
                Some(Event::Error(e)) => vec![e.body().to_string(), "[DONE]".into()],
                Some(Event::Started { .. }) => Vec::new(),
                None => vec!["[DONE]".into()],
            };
            let finished = data.last().is_some_and(|d| d == "[DONE]");
            Some((data, (events, finished, slot)))
        }
    });
    let events = chunks.flat_map(|data| {
        stream::iter(
            data.into_iter()
                .map(|d| Ok::<_, Infallible>(SseEvent::default().data(d))),
        )
    });
    sse(events).into_response()
}

fn sse<S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static>(s: S) -> Sse<S> {
    Sse::new(s)
}
