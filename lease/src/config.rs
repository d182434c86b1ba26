//! Lease timing, and the relations between its settings that the safety argument needs.

use std::time::Duration;

use crate::error::{fmt_duration, Error};

/// Lease timing. `validate` checks the relations the safety argument needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Validity of a renewal, from its start.
    pub ttl: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// The holder stops serving writes this long before the TTL runs out (by its monotonic
    /// clock): covers clock rate error and the time to stop.
    pub margin: Duration,
    /// Assumed bound on the difference between nodes' wall clocks; a taker waits this long
    /// past `expires_ms`.
    pub max_skew: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            margin: Duration::from_secs(5),
            max_skew: Duration::from_secs(2),
        }
    }
}

impl LeaseConfig {
    /// Checks: margin > 0, margin < ttl, 0 < renew_every < ttl − margin. The error says what
    /// to change.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Config(what));
        if self.margin.is_zero() {
            return bad(
                "the margin must be above 0 (default 5 s): the holder must stop \
                        before its lease runs out"
                    .into(),
            );
        }
        if self.margin >= self.ttl {
            return bad(format!(
                "the margin ({}) must be shorter than the ttl ({}): raise the ttl or lower \
                 the margin",
                fmt_duration(self.margin),
                fmt_duration(self.ttl)
            ));
        }
        if self.renew_every.is_zero() {
            return bad("renew_every must be above 0 (default 10 s)".into());
        }
        let window = self.ttl - self.margin;
        if self.renew_every >= window {
            return bad(format!(
                "renew_every ({}) must be shorter than ttl − margin ({} − {} = {}), else the \
                 holder stops before its first renewal: lower renew_every (ideally to a third \
                 of the ttl or less) or raise the ttl",
                fmt_duration(self.renew_every),
                fmt_duration(self.ttl),
                fmt_duration(self.margin),
                fmt_duration(window)
            ));
        }
        Ok(())
    }
}
