//! The epoch-fenced lease of a workspace (docs/decisions/lease.md,
//! docs/decisions/fencing-in-one-place.md).
//!
//! The lease of workspace W is the mutable object `ws/W/lease`: a pretty JSON `LeaseRecord`
//! (`record`) changed only by compare-and-swap (`Store::put_cas`). Everything a holder does
//! with it is in `fence`: acquiring it creates it (epoch 1) or replaces a released or expired
//! record (or any record, with `Mode::Takeover`) by one with the next epoch; a holder that took
//! it from one that had not released publishes a fence generation before anything else; it
//! renews the lease well inside the TTL and may serve only until its deadline (monotonic
//! clock); another node takes over only once its wall clock passes `expires_ms + max_skew`.
//! Its timing (`config`) is checked before use, its time comes from a `Clock` (`clock`), and
//! its failures are its own `Error` (`error`).

pub mod clock;
pub mod config;
pub mod error;
pub mod fence;
pub mod record;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::LeaseConfig;
pub use error::Error;
pub use fence::{acquire, Lease, Mode, ServingDeadline};
pub use record::{decode, encode, is_free, lease_key, read, Holder, LeaseRecord, FORMAT};
