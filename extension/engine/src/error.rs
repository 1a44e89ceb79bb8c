//! Engine errors. Each kind corresponds to one PostgreSQL SQLSTATE, so the SQL layer can
//! report it faithfully without inspecting messages.

use thiserror::Error;

/// Result alias used throughout the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EngineError {
    /// A scalar argument or a shape is wrong (SQLSTATE 22023 invalid_parameter_value).
    #[error("{0}")]
    InvalidParameter(String),
    /// Tensor contents are unusable: wrong byte length, NaN, infinity (22000 data_exception).
    #[error("{0}")]
    Data(String),
    /// A required argument was NULL (22004 null_value_not_allowed).
    #[error("{0}")]
    NullValue(String),
    /// The request is larger than the engine or PostgreSQL can hold (54000 program_limit_exceeded).
    #[error("{0}")]
    TooLarge(String),
    /// The work needs more memory than it may use (53200 out_of_memory): refused before it
    /// starts when an estimate exceeds `pg_llm.max_memory`, or an allocation failed.
    #[error("{0}")]
    OutOfMemory(String),
    /// A result overflowed float32 (22003 numeric_value_out_of_range).
    #[error("{0}")]
    OutOfRange(String),
    /// A named object (model, tensor, tokenizer) does not exist (42704 undefined_object).
    #[error("{0}")]
    UndefinedObject(String),
    /// The objects involved are not ready for this, e.g. a model without training data
    /// (55000 object_not_in_prerequisite_state).
    #[error("{0}")]
    NotReady(String),
    /// The role may not do this (42501 insufficient_privilege).
    #[error("{0}")]
    InsufficientPrivilege(String),
    /// A file could not be read or written (58P01 undefined_file / 58030 io_error).
    #[error("{0}")]
    Io(String),
    /// What a call read changed under it between two of its reads, e.g. a model written
    /// while an export streams it (40001 serialization_failure: retry).
    #[error("{0}")]
    Conflict(String),
    /// The caller asked the work to stop (query cancel, statement_timeout).
    #[error("computation cancelled")]
    Cancelled,
    /// An internal consistency check failed: a bug, never a user error (XX000 internal_error).
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidParameter(msg.into())
    }
    pub fn data(msg: impl Into<String>) -> Self {
        Self::Data(msg.into())
    }
    pub fn too_large(msg: impl Into<String>) -> Self {
        Self::TooLarge(msg.into())
    }

    /// The five-character SQLSTATE this error should be reported with.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::InvalidParameter(_) => "22023",
            Self::Data(_) => "22000",
            Self::NullValue(_) => "22004",
            Self::TooLarge(_) => "54000",
            Self::OutOfMemory(_) => "53200",
            Self::OutOfRange(_) => "22003",
            Self::UndefinedObject(_) => "42704",
            Self::NotReady(_) => "55000",
            Self::InsufficientPrivilege(_) => "42501",
            Self::Io(_) => "58030",
            Self::Conflict(_) => "40001",
            Self::Cancelled => "57014",
            Self::Internal(_) => "XX000",
        }
    }
}

/// Shorthand for `return Err(EngineError::InvalidParameter(format!(...)))`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { return Err($crate::EngineError::InvalidParameter(format!($($arg)*))) };
}
