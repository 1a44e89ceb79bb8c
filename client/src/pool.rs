//! A connection pool for services (feature `pool`, deadpool-postgres): connections are made
//! on demand up to a bound and reused; a `Client` taken from the pool goes back when dropped.

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};

use crate::client::Canceller;
use crate::{Client, Error};

/// A pool of connections to one server.
///
/// ```no_run
/// # async fn demo() -> Result<(), pg_gpt3_client::Error> {
/// use pg_gpt3_client::{GenerateOptions, Pool};
/// let pool = Pool::new("host=localhost user=postgres dbname=llm", 8)?;
/// let client = pool.get().await?;
/// let text = client.generate("Hello", &GenerateOptions::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: deadpool_postgres::Pool,
    canceller: Canceller,
}

fn manager_config() -> ManagerConfig {
    // A pooled connection is checked with a round trip before reuse, so one whose server
    // went away is replaced rather than handed out.
    ManagerConfig {
        recycling_method: RecyclingMethod::Verified,
    }
}

fn parse(dsn: &str) -> Result<tokio_postgres::Config, Error> {
    dsn.parse()
        .map_err(|e: tokio_postgres::Error| Error::Invalid(format!("bad connection string: {e}")))
}

impl Pool {
    /// A pool of at most `max_size` connections made with `dsn`, without TLS.
    pub fn new(dsn: &str, max_size: usize) -> Result<Self, Error> {
        let manager = Manager::from_config(parse(dsn)?, tokio_postgres::NoTls, manager_config());
        Self::build(manager, max_size, Canceller::Plain)
    }

    /// A pool of TLS connections (see `Client::connect_tls`).
    #[cfg(feature = "tls")]
    pub fn new_tls(dsn: &str, max_size: usize, tls: &crate::TlsConfig) -> Result<Self, Error> {
        let connector = tls.connector();
        let manager = Manager::from_config(parse(dsn)?, connector.clone(), manager_config());
        Self::build(manager, max_size, Canceller::Tls(connector))
    }

    fn build(manager: Manager, max_size: usize, canceller: Canceller) -> Result<Self, Error> {
        let inner = deadpool_postgres::Pool::builder(manager)
            .max_size(max_size)
            .build()
            .map_err(|e| Error::Invalid(format!("pool: {e}")))?;
        Ok(Self { inner, canceller })
    }

    /// A client on a pooled connection, waiting while all are in use; it returns to the pool
    /// when dropped.
    pub async fn get(&self) -> Result<Client, Error> {
        let object = self.inner.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => Error::from(e),
            other => Error::Connection(other.to_string()),
        })?;
        Ok(Client::pooled(object, self.canceller.clone()))
    }

    /// Connections open and idle now.
    pub fn status(&self) -> (usize, usize) {
        let s = self.inner.status();
        (s.size, s.available)
    }
}
