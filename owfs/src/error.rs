//! What an owfs command or the daemon fails with: the store's errors (with local I/O:
//! `chunkstore::Error`) or the lease's (`lease::Error`). `exit.rs` gives each its exit status
//! and hint (docs/EXIT_CODES.md).

use std::fmt;

#[derive(Debug)]
pub enum Error {
    Store(chunkstore::Error),
    /// Never `lease::Error::Store`: that becomes `Store` (see the `From`).
    Lease(lease::Error),
    /// A command refused because a node has the workspace mounted (holds its lease live) and
    /// the command would stop that mount: `owfs rollback`. The text says what to do instead.
    Mounted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Store(e) => e.fmt(f),
            Error::Lease(e) => e.fmt(f),
            Error::Mounted(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Store(e) => e.source(),
            Error::Lease(e) => e.source(),
            Error::Mounted(_) => None,
        }
    }
}

impl From<chunkstore::Error> for Error {
    fn from(e: chunkstore::Error) -> Self {
        Error::Store(e)
    }
}

/// A store error met by the lease is reported as the store's: same message, same status.
impl From<lease::Error> for Error {
    fn from(e: lease::Error) -> Self {
        match e {
            lease::Error::Store(e) => Error::Store(e),
            e => Error::Lease(e),
        }
    }
}
