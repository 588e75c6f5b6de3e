//! The library's error type. Errors say what went wrong and where (which file, which tensor, which request
//! field and its allowed range); the binary renders them as one line.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is outside what the model or the API accepts.
    #[error("invalid request: `{field}` {message}")]
    InvalidRequest { field: &'static str, message: String },

    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model file exists but its contents are not what we need (bad JSON, wrong layout, missing tensor...).
    #[error("{}: {message}", path.display())]
    Model { path: PathBuf, message: String },

    /// A model or component could not be found.
    #[error("{0}")]
    NotFound(String),

    /// An unknown scheduler name (the message lists the valid ones).
    #[error("{0}")]
    UnknownScheduler(String),

    /// Generation was stopped by the caller (progress callback returned `Control::Stop`).
    #[error("generation cancelled")]
    Cancelled,

    /// A tensor operation failed (shapes, device, dtype support…).
    #[error("{0}")]
    Tensor(candle_core::Error),

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest { field, message: message.into() }
    }

    pub fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model { path: path.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

impl From<candle_core::Error> for Error {
    /// Keeps the message and drops candle's captured backtrace, so errors stay one readable line.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Tensor(e)
    }
}
