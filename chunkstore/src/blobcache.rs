//! A node-local cache of verified blobs, named by hash, and the pre-pull that fills it: a node
//! about to take a workspace over downloads the latest generation while the current holder
//! still runs, so that after the handoff it reads from local disk and fetches only the delta.
//! Content addressing makes every cached blob valid for any later generation that still
//! refers to it; each read is verified again, so a damaged cache file is a miss, never data.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fetch::{fetch_blobs, FetchPlan};
use crate::generation::GenRecord;
use crate::hash::Hash;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::tree::{Content, Kind};

const FETCH_PLAN: FetchPlan = FetchPlan {
    coalesce_gap: 1 << 20,
    max_range: 16 << 20,
    in_flight: 8,
};

pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    pub fn open(dir: &Path) -> Result<BlobCache> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(BlobCache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, h: &Hash) -> bool {
        self.path(h).exists()
    }

    /// The blob's bytes if cached and intact; a damaged file is removed and reads as a miss.
    pub fn get(&self, h: &Hash) -> Option<Vec<u8>> {
        let p = self.path(h);
        let raw = std::fs::read(&p).ok()?;
        if Hash::of(&raw) == *h {
            Some(raw)
        } else {
            let _ = std::fs::remove_file(&p);
            None
        }
    }

    /// Stores verified bytes (write to a temporary name, then rename: never a torn file).
    pub fn put(&self, h: &Hash, raw: &[u8]) -> Result<()> {
        let p = self.path(h);
        let parent = p.parent().expect("hash path has a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(raw).map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
    }
}

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
    let mut dirs = vec![(rec.root_hash()?, String::new())];
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
                    for c in repo.chunk_list(&e.content, &child)? {
                        if seen.insert(c.hash) {
                            wanted.push((c.hash, c.len));
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
