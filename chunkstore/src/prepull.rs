//! The pre-pull: a node about to take a workspace over downloads the latest generation into
//! its blob cache (`blobcache.rs`) while the current holder still runs, so that after the
//! handoff it reads from local disk and fetches only the delta.

use std::collections::HashSet;
use std::sync::Arc;

use crate::blobcache::BlobCache;
use crate::error::Result;
use crate::fetch::{fetch_blobs, FetchPlan};
use crate::generation::GenRecord;
use crate::hash::Hash;
use crate::progress::Progress;
use crate::read::chunk_list;
use crate::repo::Repo;
use crate::tree::{Content, Kind, Part};

const FETCH_PLAN: FetchPlan = FetchPlan {
    coalesce_gap: 1 << 20,
    max_range: 16 << 20,
    in_flight: 8,
};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PrepullReport {
    pub generation: String,
    pub files: u64,
    pub blobs: u64,
    pub blobs_already_cached: u64,
    pub bytes_fetched: u64,
    pub requests: u64,
}

/// Downloads every blob of `rec` (trees, segments, file chunks) that `cache` lacks, and
/// makes `repo` read through `cache` from now on.
pub fn prepull(
    repo: &Arc<Repo>,
    rec: &GenRecord,
    cache: &Arc<BlobCache>,
    progress: &Progress,
) -> Result<PrepullReport> {
    repo.set_blob_cache(Some(cache.clone()));
    let mut report = PrepullReport {
        generation: rec.spec(),
        ..Default::default()
    };
    // Trees and segments come through read_blob, which fills the cache once it is set.
    let mut wanted: Vec<(Hash, u32)> = Vec::new();
    let mut seen: HashSet<Hash> = HashSet::new();
    let mut dirs = vec![(repo.root_of(rec)?, String::new())];
    while let Some((tree, path)) = dirs.pop() {
        let t = repo.read_tree(&tree, &path)?;
        for e in t.entries {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let child = format!("{path}/{name}");
            match e.kind {
                Kind::Dir => {
                    if let Some(h) = e.subtree {
                        dirs.push((h, child));
                    }
                }
                Kind::File => {
                    report.files += 1;
                    progress
                        .total_bytes
                        .fetch_add(e.size, std::sync::atomic::Ordering::Relaxed);
                    if matches!(e.content, Content::Empty) {
                        continue;
                    }
                    for p in chunk_list(repo, &e.content, &child)? {
                        if let Part::Chunk(c) = p {
                            if seen.insert(c.hash) {
                                wanted.push((c.hash, c.len));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    report.blobs = wanted.len() as u64;
    let mut locs = Vec::new();
    for (h, len) in wanted {
        if cache.contains(&h) {
            report.blobs_already_cached += 1;
            progress.add(0, len as u64);
            continue;
        }
        locs.push(repo.locate(&h, "pre-pull")?);
    }
    report.requests = fetch_blobs(repo, &locs, FETCH_PLAN, |i, raw| {
        let raw = raw?;
        report.bytes_fetched += locs[i].1.stored_len as u64;
        cache.put(&locs[i].1.hash, &raw)?;
        progress.add(0, raw.len() as u64);
        Ok(())
    })?;
    Ok(report)
}
