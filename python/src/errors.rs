//! Rust client errors as the Python exceptions of `pg_gpt3_client.errors`, one class per
//! `ErrorKind`, each carrying `.sqlstate` and `.kind`.

use pg_gpt3_client::{Error, ErrorKind};
use pyo3::prelude::*;

fn class_name(e: &Error) -> &'static str {
    if matches!(e, Error::File { .. }) {
        return "ClientFileError";
    }
    match e.kind() {
        ErrorKind::BadInput => "BadInputError",
        ErrorKind::UnknownModel => "UnknownModelError",
        ErrorKind::Permission => "PermissionDeniedError",
        ErrorKind::Cancelled => "CancelledError",
        ErrorKind::Timeout => "QueryTimeoutError",
        ErrorKind::Conflict => "ConflictError",
        ErrorKind::Resources => "ResourcesError",
        ErrorKind::Connection => "ConnectionFailedError",
        ErrorKind::Other => "PgGpt3Error",
    }
}

/// The Python exception for `e`.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = py.import("pg_gpt3_client.errors")?;
        let class = module.getattr(class_name(&e))?;
        let kind = format!("{:?}", e.kind());
        let instance = class.call1((e.to_string(), e.sqlstate(), kind))?;
        Ok(PyErr::from_value(instance))
    };
    build().unwrap_or_else(|err| err)
}
