//! One error type for the crate. Every variant says what happened and where; the binary adds
//! what to do and maps each kind to a distinct exit status (see `docs/EXIT_CODES.md`). The
//! lease's failures (held, lost) are the lease crate's own (`lease::Error`).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid store URL {url:?}: {reason}")]
    BadStoreUrl { url: String, reason: String },

    #[error("store {store} is unreachable: {detail}")]
    Unreachable { store: String, detail: String },

    #[error("store {store} refused access: {detail}")]
    AccessDenied { store: String, detail: String },

    #[error("workspace {0:?} does not exist in this store")]
    UnknownWorkspace(String),

    #[error("generation {ws}@{number} does not exist")]
    UnknownGeneration { ws: String, number: u64 },

    #[error("workspace {ws} has no generation at or before {when} (its first, {ws}@{first}, is from {first_at})")]
    NoGenerationAt {
        ws: String,
        when: String,
        first: u64,
        first_at: String,
    },

    #[error("no such path {path:?} in {at}")]
    UnknownPath { at: String, path: String },

    #[error("object {key} is missing from the store ({what})")]
    Missing { key: String, what: String },

    #[error("corrupt data: {what}")]
    Corrupt { what: String },

    #[error("unsupported format: {what}")]
    Format { what: String },

    #[error("unsafe manifest: {what}")]
    Unsafe { what: String },

    #[error("{0}")]
    Conflict(String),

    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: String },

    /// A command-line or mount option with a value that cannot be used (`commit_interval_ms=x`,
    /// `--wait=soon`, `fork` with `rollback`).
    #[error("invalid option {option:?}: {reason}")]
    BadOption { option: String, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("store {store}: {detail}")]
    Store { store: String, detail: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into() }
    }

    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unreachable { .. } | Error::Store { .. })
    }

    /// Whether the error says that stored data is damaged or absent (what a drill reports).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Error::Missing { .. }
                | Error::Corrupt { .. }
                | Error::Format { .. }
                | Error::Unsafe { .. }
        )
    }

    /// Adds the path inside the workspace where damage was met, so that the message names it.
    pub fn at_path(self, path: &str) -> Self {
        match self {
            Error::Missing { key, what } => Error::Missing {
                key,
                what: format!("{what}, needed by {path:?}"),
            },
            Error::Corrupt { what } => Error::Corrupt {
                what: format!("{what}, needed by {path:?}"),
            },
            other => other,
        }
    }
}

/// For I/O inside helpers that know no path; callers re-wrap with the path they know.
impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Io {
            path: PathBuf::new(),
            source,
        }
    }
}
