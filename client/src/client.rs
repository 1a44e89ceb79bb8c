//! The connection: how a `Client` is made (a DSN, an existing tokio-postgres client, a pool,
//! TLS), the per-call timeout and cancelling a running call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio_postgres::{CancelToken, NoTls, Row, RowStream};

use crate::Error;

/// A connection to a database with the `pg_llm` extension. Calls take `&self` and may run
/// concurrently on one connection (tokio-postgres pipelines them); the ones that need a
/// transaction of their own (checkpoint upload and download) take `&mut self`.
pub struct Client {
    conn: Conn,
    canceller: Canceller,
    timeout: Option<Duration>,
}

enum Conn {
    Owned(tokio_postgres::Client),
    #[cfg(feature = "pool")]
    Pooled(deadpool_postgres::Object),
}

/// How a cancel request reaches the server: over a new connection, with TLS when the
/// connection uses it.
#[derive(Clone)]
pub(crate) enum Canceller {
    Plain,
    #[cfg(feature = "tls")]
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Canceller {
    pub(crate) async fn cancel(&self, token: &CancelToken) -> Result<(), Error> {
        match self {
            Canceller::Plain => token.cancel_query(NoTls).await?,
            #[cfg(feature = "tls")]
            Canceller::Tls(tls) => token.cancel_query(tls.clone()).await?,
        }
        Ok(())
    }
}

impl Client {
    /// Connects with a libpq-style connection string or URL, without TLS (use
    /// `connect_tls` for a server that requires it), and drives the connection on a
    /// background task of the current tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), pg_gpt3_client::Error> {
    /// let client = pg_gpt3_client::Client::connect("host=localhost user=postgres dbname=llm").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(dsn: &str) -> Result<Self, Error> {
        let (inner, connection) = tokio_postgres::connect(dsn, NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self::new(Conn::Owned(inner), Canceller::Plain))
    }

    /// Connects over TLS (`sslmode=require` in the DSN makes TLS mandatory; the default,
    /// `prefer`, uses it when the server offers it). The server's certificate is verified
    /// against `tls`'s roots.
    #[cfg(feature = "tls")]
    pub async fn connect_tls(dsn: &str, tls: &crate::tls::TlsConfig) -> Result<Self, Error> {
        let connector = tls.connector();
        let (inner, connection) = tokio_postgres::connect(dsn, connector.clone()).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self::new(Conn::Owned(inner), Canceller::Tls(connector)))
    }

    #[cfg(feature = "pool")]
    pub(crate) fn pooled(object: deadpool_postgres::Object, canceller: Canceller) -> Self {
        Self::new(Conn::Pooled(object), canceller)
    }

    fn new(conn: Conn, canceller: Canceller) -> Self {
        Self {
            conn,
            canceller,
            timeout: None,
        }
    }

    /// Bounds every later call of this client to `limit` (`None`: no bound). A call that runs
    /// longer is cancelled on the server and returns `Error::Timeout`; a stream's bound is
    /// its whole run. The server's own `statement_timeout` applies as well.
    pub fn set_timeout(&mut self, limit: Option<Duration>) {
        self.timeout = limit;
    }

    /// This client with a per-call timeout (see `set_timeout`).
    pub fn with_timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// A handle that cancels this connection's running call from anywhere (another task, a
    /// signal handler): the call then fails with `ErrorKind::Cancelled` and its transaction
    /// rolls back.
    pub fn canceller(&self) -> CancelHandle {
        CancelHandle {
            token: self.pg().cancel_token(),
            canceller: self.canceller.clone(),
        }
    }

    /// The tokio-postgres cancel token of this connection (`canceller` also knows whether
    /// the cancel request needs TLS).
    pub fn cancel_token(&self) -> CancelToken {
        self.pg().cancel_token()
    }

    /// The underlying tokio-postgres client, for queries this crate does not wrap.
    pub fn raw(&self) -> &tokio_postgres::Client {
        self.pg()
    }

    /// Runs one or more statements separated by semicolons (setup in tools and tests).
    pub async fn execute(&self, sql: &str) -> Result<(), Error> {
        self.bounded(async { Ok(self.pg().batch_execute(sql).await?) })
            .await
    }

    pub(crate) fn pg(&self) -> &tokio_postgres::Client {
        match &self.conn {
            Conn::Owned(c) => c,
            #[cfg(feature = "pool")]
            Conn::Pooled(o) => o,
        }
    }

    pub(crate) fn pg_mut(&mut self) -> &mut tokio_postgres::Client {
        match &mut self.conn {
            Conn::Owned(c) => c,
            #[cfg(feature = "pool")]
            Conn::Pooled(o) => o,
        }
    }

    /// Runs `call` under the per-call timeout: past it, the server is asked to cancel and the
    /// call is awaited to its end (so the connection is free for the next one).
    pub(crate) async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.deadline().run(call).await
    }

    /// The per-call timeout with what it needs to cancel, apart from the client (for calls
    /// that borrow it mutably, in a transaction).
    pub(crate) fn deadline(&self) -> Deadline {
        Deadline {
            limit: self.timeout,
            cancel: self.canceller(),
        }
    }

    pub(crate) async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.bounded(async { Ok(self.pg().query_one(sql, params).await?) })
            .await
    }

    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.bounded(async { Ok(self.pg().query(sql, params).await?) })
            .await
    }

    /// The rows of `sql` as they arrive, each turned into a `T` by `row`.
    pub(crate) async fn stream<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        row: fn(&Row) -> Result<T, Error>,
        last: impl Fn(&T, usize) -> bool + Send + 'static,
    ) -> Result<RowsOf<T>, Error> {
        let deadline = self.timeout.map(|t| (t, tokio::time::Instant::now() + t));
        let rows = self
            .bounded(async { Ok(self.pg().query_raw(sql, params.iter().copied()).await?) })
            .await?;
        Ok(RowsOf {
            rows: Box::pin(rows),
            row,
            last: Box::new(last),
            seen: 0,
            cancel: Some(self.canceller()),
            deadline: deadline.map(|(t, at)| (t, Box::pin(tokio::time::sleep_until(at)))),
            finished: false,
        })
    }
}

impl From<tokio_postgres::Client> for Client {
    /// Wraps a connection made with tokio-postgres directly (any TLS setup; cancel requests
    /// from this client then go without TLS).
    fn from(inner: tokio_postgres::Client) -> Self {
        Self::new(Conn::Owned(inner), Canceller::Plain)
    }
}

/// A per-call timeout and how to cancel the call that runs past it.
pub(crate) struct Deadline {
    limit: Option<Duration>,
    cancel: CancelHandle,
}

impl Deadline {
    pub(crate) async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let Some(limit) = self.limit else {
            return call.await;
        };
        tokio::pin!(call);
        match tokio::time::timeout(limit, &mut call).await {
            Ok(result) => result,
            Err(_) => {
                let _ = self.cancel.cancel().await;
                let _ = call.await;
                Err(Error::Timeout(limit))
            }
        }
    }
}

/// Cancels the call running on a client's connection (see `Client::canceller`).
#[derive(Clone)]
pub struct CancelHandle {
    token: CancelToken,
    canceller: Canceller,
}

impl CancelHandle {
    /// Asks the server to cancel the running call; a no-op if none runs.
    pub async fn cancel(&self) -> Result<(), Error> {
        self.canceller.cancel(&self.token).await
    }
}

/// Whether a row (with the count of rows so far) is a query's last one.
type IsLast<T> = Box<dyn Fn(&T, usize) -> bool + Send>;

/// A stream of typed rows that arrive as the server sends them (a generation's tokens, a
/// training run's steps). Dropping it before its last row cancels the query on the server
/// (a cancel request, like libpq's: should the query end on its own just as the request
/// arrives, the request can hit the connection's next query instead).
pub struct RowsOf<T> {
    rows: Pin<Box<RowStream>>,
    row: fn(&Row) -> Result<T, Error>,
    /// Whether a row (with the count of rows so far) is the query's last one.
    last: IsLast<T>,
    seen: usize,
    /// Present until the query ended: what dropping the stream uses to cancel it.
    cancel: Option<CancelHandle>,
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    finished: bool,
}

impl<T> Stream for RowsOf<T> {
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rows.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(row))) => {
                let item = (self.row)(&row);
                self.seen += 1;
                if item.as_ref().is_ok_and(|t| (self.last)(t, self.seen)) {
                    // Nothing is left to cancel: dropping the stream now must not send a
                    // cancel request that could hit the next query.
                    self.cancel = None;
                    self.deadline = None;
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some((limit, sleep)) = self.deadline.as_mut() else {
                    return Poll::Pending;
                };
                let limit = *limit;
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.cancel_in_background();
                self.finish();
                Poll::Ready(Some(Err(Error::Timeout(limit))))
            }
        }
    }
}

impl<T> RowsOf<T> {
    fn finish(&mut self) {
        self.finished = true;
        self.cancel = None;
        self.deadline = None;
    }

    fn cancel_in_background(&mut self) {
        let Some(handle) = self.cancel.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = handle.cancel().await;
            });
        }
    }
}

impl<T> Drop for RowsOf<T> {
    fn drop(&mut self) {
        self.cancel_in_background();
    }
}
