//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in r1v2-actors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A checkpoint that does not fit the model: missing, mis-shaped or unexpected tensors.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    /// A configuration value that cannot be used; `key` names it.
    #[error("config key `{key}`: {msg}")]
    Config { key: String, msg: String },

    #[error("{0}")]
    Msg(String),

    /// A JSON config file whose `key` (a path like `rope_scaling.type`) cannot be used.
    #[error("{path}: key `{key}`: {msg}")]
    ConfigFile {
        path: PathBuf,
        key: String,
        msg: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }

    /// A [`Error::Config`] raised while validating what was read from `path` becomes a
    /// [`Error::ConfigFile`] naming that file; other errors pass through.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            Error::Config { key, msg } => Error::ConfigFile {
                path: path.to_path_buf(),
                key,
                msg,
            },
            other => other,
        }
    }
}

/// `Ok(())` when `ok`, else a [`Error::Config`] naming `key`: the one-line validation the config
/// structs use.
pub(crate) fn check(ok: bool, key: &str, msg: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Config {
            key: key.to_string(),
            msg: msg.to_string(),
        })
    }
}
