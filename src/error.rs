//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the r1v2 crate (CLI, config, data, images, tokenizer).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Actors(#[from] r1v2_actors::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("{0}")]
    Msg(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
