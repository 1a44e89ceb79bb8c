//! TLS for connections to a remote or managed server (feature `tls`): rustls with the ring
//! provider, trusting the system's roots or a CA you give.

use std::path::Path;
use std::sync::Arc;

use tokio_postgres_rustls::MakeRustlsConnect;

use crate::Error;

/// Which certificate authorities a TLS connection trusts.
///
/// ```no_run
/// # async fn demo() -> Result<(), pg_gpt3_client::Error> {
/// use pg_gpt3_client::{Client, TlsConfig};
/// let tls = TlsConfig::system_roots()?;
/// let client = Client::connect_tls("host=db.example.com user=app sslmode=require", &tls).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ClientConfig>,
}

impl TlsConfig {
    /// The operating system's trusted roots (what a managed server's certificate chains to).
    pub fn system_roots() -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // Skips the odd certificate rustls cannot parse, as browsers do.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(Error::Invalid(format!(
                "no trusted root certificates found on this system ({:?})",
                found.errors
            )));
        }
        Self::with_roots(roots)
    }

    /// Trusts only the CA certificates in the PEM file `path` (a private CA, or a server's
    /// self-signed certificate), like libpq's `sslrootcert`.
    pub fn root_cert_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        Self::root_cert_pem(&pem)
    }

    /// Trusts only the CA certificates in `pem`.
    pub fn root_cert_pem(pem: &[u8]) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| Error::Invalid(format!("bad PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Invalid(format!("bad CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Invalid("no certificate in the PEM data".into()));
        }
        Self::with_roots(roots)
    }

    fn with_roots(roots: rustls::RootCertStore) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Invalid(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
        })
    }

    pub(crate) fn connector(&self) -> MakeRustlsConnect {
        MakeRustlsConnect::new((*self.config).clone())
    }
}
