//! The lease record `ws/W/lease`: what it holds, its stored form, reading it, and whether it
//! may be taken without forcing.

use std::time::Duration;

use bytes::Bytes;
use chunkstore::store::Version;
use chunkstore::{Result, Store};
use serde::{Deserialize, Serialize};

use crate::LeaseConfig;

/// `LeaseRecord::format` written and understood.
pub const FORMAT: u32 = 1;

/// Key of the lease object of workspace `ws`.
pub fn lease_key(ws: &str) -> String {
    format!("ws/{ws}/lease")
}

/// Who holds (or held) a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The node's name (`--node`, else the host name).
    pub node: String,
    pub host: String,
    pub pid: u32,
}

impl Holder {
    /// This process on this host, under the node name `node`.
    pub fn this_process(node: &str) -> Holder {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Holder {
            node: node.to_string(),
            host,
            pid: std::process::id(),
        }
    }
}

/// The content of `ws/W/lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// 1.
    pub format: u32,
    pub workspace: String,
    /// Bumped by every acquisition; the holder's publishes carry it (fencing).
    pub epoch: u64,
    pub holder: Holder,
    /// Holder's wall clock (ms since the Unix epoch) when this epoch was acquired.
    pub acquired_ms: u64,
    /// Holder's wall clock at the start of the last renewal.
    pub renewed_ms: u64,
    /// `renewed_ms + ttl_ms`: others may take over once their wall clock passes this plus
    /// their `max_skew`.
    pub expires_ms: u64,
    pub ttl_ms: u64,
    /// Planned release: free at once, no fence needed.
    pub released: bool,
    /// Random per write: tells our own write from another's after an ambiguous failure.
    pub nonce: String,
}

/// The stored form of a lease record: pretty JSON and a newline.
pub fn encode(record: &LeaseRecord) -> Bytes {
    let mut json = serde_json::to_vec_pretty(record).expect("a lease record serializes");
    json.push(b'\n');
    Bytes::from(json)
}

/// Reads the lease record of `ws` from its stored form: any bytes give a record or an error
/// (lease/tests/hostile.rs).
pub fn decode(bytes: &[u8], ws: &str) -> Result<LeaseRecord> {
    let key = lease_key(ws);
    let record: LeaseRecord = serde_json::from_slice(bytes).map_err(|e| {
        chunkstore::Error::corrupt(format!("lease record {key} is not valid JSON: {e}"))
    })?;
    if record.format != FORMAT {
        return Err(chunkstore::Error::Format {
            what: format!(
                "lease record {key} has format {} (this owfs knows {FORMAT}): upgrade owfs",
                record.format
            ),
        });
    }
    if record.workspace != ws {
        return Err(chunkstore::Error::corrupt(format!(
            "lease record {key} names workspace {:?}",
            record.workspace
        )));
    }
    // The next holder takes epoch + 1: u64::MAX has no successor (an overflow panic, or a
    // wrap to 0 that would undo fencing).
    if record.epoch == u64::MAX {
        return Err(chunkstore::Error::corrupt(format!(
            "lease record {key} has epoch {}, which cannot be followed",
            record.epoch
        )));
    }
    Ok(record)
}

/// Whether others may take `record` over now (without forcing), by wall clock `wall_ms`.
pub fn is_free(record: &LeaseRecord, wall_ms: u64, cfg: &LeaseConfig) -> bool {
    record.released || wall_ms > record.expires_ms.saturating_add(ms(cfg.max_skew))
}

/// Time until `record` may be taken over without forcing (1 ms more and it is free).
pub(crate) fn until_free(record: &LeaseRecord, wall_ms: u64, cfg: &LeaseConfig) -> Duration {
    let free_at = record.expires_ms.saturating_add(ms(cfg.max_skew));
    Duration::from_millis(free_at.saturating_sub(wall_ms))
}

pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The current lease record of `ws`; None if it never had one.
pub async fn read(store: &Store, ws: &str) -> Result<Option<LeaseRecord>> {
    Ok(read_versioned(store, ws).await?.map(|(record, _)| record))
}

/// The current lease record of `ws` with its version (for the next CAS); None if absent.
pub(crate) async fn read_versioned(
    store: &Store,
    ws: &str,
) -> Result<Option<(LeaseRecord, Version)>> {
    match store.get_versioned(&lease_key(ws)).await? {
        None => Ok(None),
        Some((bytes, version)) => Ok(Some((decode(&bytes, ws)?, version))),
    }
}
