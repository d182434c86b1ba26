//! Fetching many blobs at once (restore, pre-pull): neighbouring blobs of a pack become one
//! range request, a bounded number of requests are in flight, and every blob is verified.

use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::pack::{open_blob, PackEntry};
use crate::repo::Repo;

/// How blobs are grouped into requests.
#[derive(Debug, Clone, Copy)]
pub struct FetchPlan {
    /// Blobs of one pack closer than this are fetched in one request.
    pub coalesce_gap: u64,
    /// No request is longer than this (bounds memory: `max_range × in_flight`).
    pub max_range: u64,
    pub in_flight: usize,
}

/// Fetches the blobs at `locs` (pack, entry) and calls `each(i, raw bytes or error)` for every
/// one, in no particular order (`i` indexes `locs`). A failed request fails each of its
/// blobs. Stops at the first error `each` returns. Returns the number of requests made.
pub fn fetch_blobs(
    repo: &Repo,
    locs: &[(Hash, PackEntry)],
    plan: FetchPlan,
    mut each: impl FnMut(usize, Result<Vec<u8>>) -> Result<()>,
) -> Result<u64> {
    let mut order: Vec<usize> = (0..locs.len()).collect();
    order.sort_by_key(|&i| (locs[i].0, locs[i].1.offset));
    let mut ranges: Vec<(Hash, u64, u64, Vec<usize>)> = Vec::new();
    for i in order {
        let (pack, e) = &locs[i];
        let (s, end) = (e.offset as u64, e.offset as u64 + e.stored_len as u64);
        match ranges.last_mut() {
            Some((p, rs, re, idx))
                if p == pack && s <= *re + plan.coalesce_gap && end - *rs <= plan.max_range =>
            {
                *re = (*re).max(end);
                idx.push(i);
            }
            _ => ranges.push((*pack, s, end, vec![i])),
        }
    }
    let requests = ranges.len() as u64;
    let mut pending = ranges.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < plan.in_flight {
            let Some((pack, s, e, idx)) = pending.next() else {
                break;
            };
            let store = repo.store.clone();
            let at = repo.pack_location(&pack);
            running.push(repo.rt.spawn(async move {
                let r = crate::repo::get_pack_at(&store, &at, &pack, Some(s..e))
                    .await
                    .map(|(b, _)| b);
                (pack, s, idx, r)
            }));
        }
        let Some(done) = repo.block_on(running.next()) else {
            break;
        };
        let (pack, start, idx, bytes) = done.map_err(|e| Error::Store {
            store: repo.store.url().to_string(),
            detail: format!("fetch task failed: {e}"),
        })?;
        for i in idx {
            let entry = &locs[i].1;
            let raw = bytes
                .as_ref()
                .map_err(|e| clone_err(e, &pack))
                .and_then(|b| {
                    let off = (entry.offset as u64 - start) as usize;
                    let stored = &b[off..off + entry.stored_len as usize];
                    open_blob(entry, stored, &format!("pack {}", pack.short()))
                });
            each(i, raw)?;
        }
    }
    Ok(requests)
}

/// Errors are not `Clone`; a failed range fails each blob in it with the same description.
fn clone_err(e: &Error, pack: &Hash) -> Error {
    match e {
        Error::Missing { key, .. } => Error::Missing {
            key: key.clone(),
            what: format!("pack {}", pack.short()),
        },
        Error::Corrupt { what } => Error::Corrupt { what: what.clone() },
        Error::Unreachable { store, detail } => Error::Unreachable {
            store: store.clone(),
            detail: detail.clone(),
        },
        Error::AccessDenied { store, detail } => Error::AccessDenied {
            store: store.clone(),
            detail: detail.clone(),
        },
        other => Error::Store {
            store: String::new(),
            detail: other.to_string(),
        },
    }
}
