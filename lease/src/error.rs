//! The lease's own errors: held by another node, lost, a wait that timed out, settings that
//! cannot be safe, and the store's errors wrapped. The binary maps each to its exit status
//! (docs/EXIT_CODES.md).

use std::time::Duration;

use crate::record::{Holder, LeaseRecord};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "workspace {} is held by {}, epoch {}; its lease expires in {}. Use --wait to wait \
         for it, or --takeover to fence it out (it will be stopped).",
        .record.workspace,
        holder_text(&.record.holder),
        .record.epoch,
        fmt_seconds(*.expires_in)
    )]
    Held {
        /// Boxed: the error stays small for every `Result` that carries it.
        record: Box<LeaseRecord>,
        /// Until the lease may be taken without `--takeover` (by our wall clock, skew
        /// included).
        expires_in: Duration,
    },

    #[error(
        "gave up waiting for workspace {}: it is still held by {}, epoch {}. Try again \
         later, or use --takeover to fence it out (it will be stopped).",
        .record.workspace,
        holder_text(&.record.holder),
        .record.epoch
    )]
    Timeout { record: Box<LeaseRecord> },

    /// Another node took the lease, a newer epoch published, or our deadline passed: this
    /// holder must stop writing.
    #[error("lost the lease: {reason}")]
    Lost { reason: String },

    /// `LeaseConfig::validate` refused the settings.
    #[error("invalid lease settings: {0}")]
    Config(String),

    /// The store failed (unreachable, refused, damaged record): the lease is as it was.
    #[error("lease: {0}")]
    Store(#[from] chunkstore::Error),
}

pub(crate) fn holder_text(h: &Holder) -> String {
    format!("node {} (host {}, pid {})", h.node, h.host, h.pid)
}

/// Whole seconds, rounded up ("12 s").
fn fmt_seconds(d: Duration) -> String {
    format!("{} s", d.as_millis().div_ceil(1000))
}

/// "5 s", or "250 ms" when not whole seconds.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
