//! The library's error type. Errors say what went wrong and where (which file, which tensor, which request
//! field and its allowed range); the binary renders them as one line. Variants are typed where a caller would
//! branch on them (a bad request field, an unknown scheduler, an unsupported config value, a component that failed
//! to load).

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

    /// A key of a config file (a model's `config.json`, `scheduler_config.json`, …) holds a value that cannot be
    /// used: missing, of the wrong type, empty, or inconsistent with another key.
    #[error("{}: `{key}` {message}", path.display())]
    ConfigKey { path: PathBuf, key: String, message: String },

    /// A model or component could not be found.
    #[error("{0}")]
    NotFound(String),

    /// An unknown scheduler name; `valid` lists the registered names.
    #[error("unknown scheduler {name:?}; valid names: {}", valid.join(", "))]
    UnknownScheduler { name: String, valid: Vec<&'static str> },

    /// A scheduler config key holds a value this scheduler does not implement (or diffusers' class does not
    /// accept); `accepted` says what it takes.
    #[error("{scheduler}: scheduler config `{key}` = {value} is not supported (accepted: {accepted})")]
    UnsupportedSchedulerConfig { scheduler: &'static str, key: &'static str, value: String, accepted: String },

    /// A model component (`"unet"`, `"vae"`, `"text_encoder"`, `"text_encoder_2"`, …) failed to load; `hint` may
    /// say how to fix it (e.g. pass `--config` for a single file).
    #[error("loading the {component} weights: {source}{hint}")]
    ComponentLoad {
        component: &'static str,
        #[source]
        source: Box<Error>,
        hint: String,
    },

    /// The tokenizer could not be built or could not read a prompt.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An output file (image, chart, table) or folder could not be written.
    #[error("{}: {message}", path.display())]
    Output { path: PathBuf, message: String },

    /// The HTTP service or its generation worker could not start or stopped unexpectedly.
    #[error("{0}")]
    Service(String),

    /// Generation was stopped by the caller (progress callback returned `Control::Stop`).
    #[error("generation cancelled")]
    Cancelled,

    /// A tensor operation failed (shapes, device, dtype support…).
    #[error("{0}")]
    Tensor(candle_core::Error),
}

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest { field, message: message.into() }
    }

    pub fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model { path: path.into(), message: message.into() }
    }

    pub fn config_key(path: impl Into<PathBuf>, key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::ConfigKey { path: path.into(), key: key.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn output(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Output { path: path.into(), message: message.to_string() }
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
