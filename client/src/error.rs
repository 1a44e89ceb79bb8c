//! The client's error type: server errors keep their SQLSTATE and message; `Error::kind`
//! sorts every failure into what a caller reacts to.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Errors from the client. Server errors keep their SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ERROR the server raised (bad input, unknown model, cancel, ...).
    #[error("{message} (SQLSTATE {sqlstate})")]
    Server { sqlstate: String, message: String },
    /// The connection could not be made, or broke.
    #[error("connection: {0}")]
    Connection(String),
    /// The call ran past the client's per-call timeout (`Client::set_timeout`); the server
    /// was asked to cancel it.
    #[error("the call ran past its timeout of {0:?} and was cancelled")]
    Timeout(Duration),
    /// A local file could not be read or written.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// Arguments refused before anything was sent.
    #[error("{0}")]
    Invalid(String),
    /// A reply the client did not expect.
    #[error("{0}")]
    Protocol(String),
}

/// What went wrong, by the SQLSTATE the server reported (or the failure on the client's
/// side), for callers that react by kind rather than by code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Arguments the server refused: wrong sizes, NaN, negative counts, corrupt files,
    /// oversized requests, rows a table's constraints refuse (SQLSTATE classes 22, 23 and
    /// 54, 42601/42804/42P02), or that the client refused before sending them.
    BadInput,
    /// No such model, tokenizer, dataset or checkpoint (42704).
    UnknownModel,
    /// The role lacks a privilege (42501).
    Permission,
    /// The query was cancelled (57014 by request).
    Cancelled,
    /// The query ran past `statement_timeout` (57014 by timeout) or the client's timeout.
    Timeout,
    /// What the call read changed under it, or it lost a deadlock: run it again (class 40,
    /// e.g. a model written while an export in READ COMMITTED streamed it).
    Conflict,
    /// Memory, disk, connections or another server resource ran out (class 53).
    Resources,
    /// The connection could not be made or was lost (class 08, server shutdown, I/O).
    Connection,
    /// Anything else (an internal server error, a local file, a reply the client did not
    /// expect).
    Other,
}

impl Error {
    /// The five-character SQLSTATE of a server error (for example "42704" for an unknown model).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server { sqlstate, .. } => Some(sqlstate),
            _ => None,
        }
    }

    /// The kind of failure (see `ErrorKind`).
    pub fn kind(&self) -> ErrorKind {
        let (code, message) = match self {
            Error::Server { sqlstate, message } => (sqlstate.as_str(), message.as_str()),
            Error::Connection(_) => return ErrorKind::Connection,
            Error::Timeout(_) => return ErrorKind::Timeout,
            Error::Invalid(_) => return ErrorKind::BadInput,
            Error::File { .. } | Error::Protocol(_) => return ErrorKind::Other,
        };
        match code {
            "42704" => ErrorKind::UnknownModel,
            "42501" => ErrorKind::Permission,
            "57014" if message.contains("statement timeout") => ErrorKind::Timeout,
            "57014" => ErrorKind::Cancelled,
            "42601" | "42804" | "42P02" => ErrorKind::BadInput,
            _ if ["22", "23", "54"].iter().any(|c| code.starts_with(c)) => ErrorKind::BadInput,
            _ if code.starts_with("40") => ErrorKind::Conflict,
            _ if code.starts_with("53") => ErrorKind::Resources,
            _ if code.starts_with("08") || code.starts_with("57P") => ErrorKind::Connection,
            _ => ErrorKind::Other,
        }
    }

    pub(crate) fn file(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Error::Server {
                sqlstate: db.code().code().to_string(),
                message: db.message().to_string(),
            },
            None => Error::Connection(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_follow_sqlstates() {
        let server = |code: &str, message: &str| Error::Server {
            sqlstate: code.into(),
            message: message.into(),
        };
        let cases = [
            (server("22023", "x"), ErrorKind::BadInput),
            (server("22P02", "x"), ErrorKind::BadInput),
            (server("54000", "too large"), ErrorKind::BadInput),
            (server("23514", "check violated"), ErrorKind::BadInput),
            (server("42704", "no model"), ErrorKind::UnknownModel),
            (server("42501", "denied"), ErrorKind::Permission),
            (
                server("57014", "canceling statement due to user request"),
                ErrorKind::Cancelled,
            ),
            (
                server("57014", "canceling statement due to statement timeout"),
                ErrorKind::Timeout,
            ),
            (server("53200", "out of memory"), ErrorKind::Resources),
            (server("40001", "changed"), ErrorKind::Conflict),
            (server("40P01", "deadlock"), ErrorKind::Conflict),
            (
                server("57P01", "terminating connection"),
                ErrorKind::Connection,
            ),
            (server("XX000", "internal"), ErrorKind::Other),
            (Error::Connection("refused".into()), ErrorKind::Connection),
            (Error::Timeout(Duration::from_secs(1)), ErrorKind::Timeout),
            (Error::Invalid("bad".into()), ErrorKind::BadInput),
            (Error::Protocol("odd reply".into()), ErrorKind::Other),
        ];
        for (err, kind) in cases {
            assert_eq!(err.kind(), kind, "{err}");
        }
    }
}
