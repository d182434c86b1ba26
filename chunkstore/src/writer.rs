//! The blob writer: deduplicates blobs against the index, compresses them on worker threads,
//! appends them to one open pack per kind (a small commit's two are uploaded as one), and
//! uploads full packs with a bounded number in flight. Memory stays bounded: a bounded queue
//! to the workers, two open packs, and a bounded upload window.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::generation::now_ms;
use crate::hash::Hash;
use crate::index::IndexFile;
use crate::pack::{compress, pack_key, BlobKind, PackBuilder, PackEntry};
use crate::repo::Repo;

/// A data pack is sealed at this size; trees and segments use smaller packs (read whole).
const DATA_PACK_BYTES: usize = 16 << 20;
const META_PACK_BYTES: usize = 4 << 20;
/// The last data and tree packs of a commit are uploaded as one up to this size (a reader
/// of a tree fetches its whole pack, so at most this much data with it).
const COMBINED_PACK_BYTES: usize = 1 << 20;
/// Blobs queued to the compression workers.
const QUEUE_BLOBS: usize = 64;
/// Packs uploading at once.
const UPLOADS_IN_FLIGHT: usize = 3;

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WriteStats {
    pub blobs_new: u64,
    pub raw_bytes_new: u64,
    pub stored_bytes_new: u64,
    pub packs: u64,
    pub blobs_reused: u64,
}

struct Job {
    hash: Hash,
    kind: BlobKind,
    data: Vec<u8>,
}

struct Shared {
    repo: Arc<Repo>,
    uploads: Mutex<Vec<JoinHandle<Result<()>>>>,
    sealed: Mutex<Vec<(Hash, Vec<PackEntry>)>>,
    window: Arc<Semaphore>,
    stored_bytes: AtomicU64,
    raw_bytes: AtomicU64,
    level: i32,
    /// The open data pack and the open tree/segment pack.
    open: Mutex<(PackBuilder, PackBuilder)>,
    /// Made by `BlobWriter::embedding`: a write whose only pack is small keeps it here for
    /// its generation record to carry, instead of uploading it.
    embed: bool,
    embedded: Mutex<Option<PackBuilder>>,
}

pub struct BlobWriter {
    shared: Arc<Shared>,
    tx: Option<SyncSender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    queued: HashSet<Hash>,
    /// Blobs this commit relies on that were already in the store (gc checks these).
    pub reused: HashSet<Hash>,
    blobs_new: u64,
    /// Before any pack of this writer was uploaded: what index compaction ages it by.
    started_ms: u64,
    /// `defer_index` was called.
    defer: bool,
}

/// A pack to store inside another object can be at most this large (a reader of a tree in
/// it fetches the whole object).
pub const EMBED_MAX_BYTES: usize = COMBINED_PACK_BYTES;

impl BlobWriter {
    pub fn new(repo: Arc<Repo>) -> Result<BlobWriter> {
        Self::with_embedding(repo, false)
    }

    /// A writer that keeps a small write's only pack for the caller to store inside its
    /// generation record (`finish_embedding`): a mount's small commit is then one PUT
    /// (docs/decisions/one-request-a-commit.md).
    pub fn embedding(repo: Arc<Repo>) -> Result<BlobWriter> {
        Self::with_embedding(repo, true)
    }

    fn with_embedding(repo: Arc<Repo>, embed: bool) -> Result<BlobWriter> {
        let started_ms = now_ms();
        repo.ensure_index()?;
        let level = repo.config.zstd_level;
        let shared = Arc::new(Shared {
            repo,
            uploads: Mutex::default(),
            sealed: Mutex::default(),
            window: Arc::new(Semaphore::new(UPLOADS_IN_FLIGHT)),
            stored_bytes: AtomicU64::new(0),
            raw_bytes: AtomicU64::new(0),
            level,
            open: Mutex::default(),
            embed,
            embedded: Mutex::default(),
        });
        let (tx, rx) = sync_channel::<Job>(QUEUE_BLOBS);
        let rx = Arc::new(Mutex::new(rx));
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        let workers = (0..n)
            .map(|i| {
                let (shared, rx) = (shared.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("owfs-pack-{i}"))
                    .spawn(move || worker(shared, rx))
                    .expect("spawning a pack worker")
            })
            .collect();
        Ok(BlobWriter {
            shared,
            tx: Some(tx),
            workers,
            queued: HashSet::new(),
            reused: HashSet::new(),
            blobs_new: 0,
            started_ms,
            defer: false,
        })
    }

    /// Stores `data` under `hash` unless the store or this commit already has it.
    pub fn add(&mut self, hash: Hash, kind: BlobKind, data: Vec<u8>) -> Result<()> {
        if self.queued.contains(&hash) {
            return Ok(());
        }
        if self.shared.repo.with_index(|i| i.contains(&hash)) {
            self.reused.insert(hash);
            return Ok(());
        }
        self.queued.insert(hash);
        self.blobs_new += 1;
        self.shared
            .raw_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let tx = self.tx.as_ref().expect("writer is open");
        if tx.send(Job { hash, kind, data }).is_err() {
            return Err(self.first_upload_error().unwrap_or_else(|| Error::Store {
                store: self.shared.repo.store.url().to_string(),
                detail: "pack workers stopped".into(),
            }));
        }
        Ok(())
    }

    /// The blobs this writer is uploading (tests).
    #[cfg(test)]
    pub fn queued_hashes(&self) -> Vec<Hash> {
        self.queued.iter().copied().collect()
    }

    /// Records that this commit refers to a blob it did not write (e.g. from the parent).
    pub fn note_reused(&mut self, hash: Hash) {
        if !self.queued.contains(&hash) {
            self.reused.insert(hash);
        }
    }

    pub fn stored_bytes(&self) -> u64 {
        self.shared.stored_bytes.load(Ordering::Relaxed)
    }

    fn first_upload_error(&self) -> Option<Error> {
        let handles = std::mem::take(&mut *self.shared.uploads.lock().expect("uploads"));
        for h in handles {
            if let Ok(Err(e)) = self.shared.repo.block_on(h) {
                return Some(e);
            }
        }
        None
    }

    /// `finish` leaves the index object of a small write (up to COMPACT_MAX_ENTRIES blobs) to
    /// `Repo::write_deferred_index`, which the caller runs later (a mount's commit).
    pub fn defer_index(&mut self) {
        self.defer = true;
    }

    /// Seals the last packs, waits for every upload, then writes one index object naming the
    /// new packs (or defers it: `defer_index`). Only after this returns may a generation
    /// refer to the new blobs.
    pub fn finish(self) -> Result<WriteStats> {
        let (stats, pack) = self.finish_embedding()?;
        assert!(pack.is_none(), "only an embedding writer keeps a pack");
        Ok(stats)
    }

    /// `finish` for a writer made by `embedding`: also returns the pack it kept, if the
    /// write was small enough to have only that one, for `generation::publish_record_with`.
    /// The blobs in it are not in the index until the record carrying it is published.
    pub fn finish_embedding(mut self) -> Result<(WriteStats, Option<PackBuilder>)> {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            w.join().map_err(|_| Error::Store {
                store: self.shared.repo.store.url().to_string(),
                detail: "a pack worker panicked".into(),
            })?;
        }
        flush_open(&self.shared);
        let handles = std::mem::take(&mut *self.shared.uploads.lock().expect("uploads"));
        let mut first_err = None;
        for h in handles {
            let res = self.shared.repo.block_on(h).unwrap_or_else(|e| {
                Err(Error::Store {
                    store: self.shared.repo.store.url().to_string(),
                    detail: format!("upload task failed: {e}"),
                })
            });
            if let (Err(e), None) = (res, &first_err) {
                first_err = Some(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let embedded = self.shared.embedded.lock().expect("embedded").take();
        let sealed = std::mem::take(&mut *self.shared.sealed.lock().expect("sealed"));
        let packs = sealed.len() as u64;
        let entries: usize = sealed.iter().map(|(_, e)| e.len()).sum();
        if !sealed.is_empty() && self.defer && entries <= crate::repo::COMPACT_MAX_ENTRIES {
            self.shared.repo.defer_index(self.started_ms, sealed);
        } else if !sealed.is_empty() {
            let file = IndexFile {
                packs: sealed,
                homes: Vec::new(),
            };
            let bytes = file.encode();
            let key = file.key(now_ms(), &bytes);
            let repo = &self.shared.repo;
            repo.block_on(repo.store.put(&key, bytes.into()))?;
            for (name, entries) in &file.packs {
                repo.add_to_index(*name, entries);
            }
            repo.note_index_file(&key);
            repo.note_own_index(key, self.started_ms, file.packs, Vec::new());
        }
        let stats = WriteStats {
            blobs_new: self.blobs_new,
            raw_bytes_new: self.shared.raw_bytes.load(Ordering::Relaxed),
            stored_bytes_new: self.shared.stored_bytes.load(Ordering::Relaxed),
            packs: packs + embedded.is_some() as u64,
            blobs_reused: self.reused.len() as u64,
        };
        Ok((stats, embedded))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: Arc<Shared>, rx: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let job = rx.lock().expect("job queue").recv();
        let Ok(job) = job else { break };
        let (stored, compressed) = compress(&job.data, shared.level);
        let full = {
            let mut open = shared.open.lock().expect("open packs");
            let (pack, limit) = match job.kind {
                BlobKind::Data => (&mut open.0, DATA_PACK_BYTES),
                BlobKind::Tree | BlobKind::Segment => (&mut open.1, META_PACK_BYTES),
            };
            pack.push(job.hash, job.kind, &stored, job.data.len(), compressed);
            (pack.len() >= limit).then(|| std::mem::take(pack))
        };
        if let Some(pack) = full {
            upload(&shared, pack);
        }
    }
}

/// Seals and uploads the packs still open (after the workers have stopped). Together they
/// are one pack when small (the common commit: a few changed chunks and their trees), one
/// PUT instead of two; readers fetch blobs by range, whatever else a pack holds.
fn flush_open(shared: &Arc<Shared>) {
    let (mut data, meta) = std::mem::take(&mut *shared.open.lock().expect("open packs"));
    let meta = if data.len() + meta.len() <= COMBINED_PACK_BYTES {
        data.append(meta);
        PackBuilder::default()
    } else {
        meta
    };
    // The write's only pack, small: kept for the record to carry (`embed`).
    let alone = shared.uploads.lock().expect("uploads").is_empty() && meta.is_empty();
    if shared.embed && alone && !data.is_empty() && data.len() <= EMBED_MAX_BYTES {
        shared
            .stored_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        *shared.embedded.lock().expect("embedded") = Some(data);
        return;
    }
    for pack in [data, meta] {
        if !pack.is_empty() {
            upload(shared, pack);
        }
    }
}

fn upload(shared: &Arc<Shared>, pack: PackBuilder) {
    let (name, bytes, entries) = pack.finish();
    shared
        .stored_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    // Waits for a free upload slot: this is the backpressure on the walker.
    let permit = shared
        .repo
        .block_on(shared.window.clone().acquire_owned())
        .expect("upload window never closes");
    let store = shared.repo.store.clone();
    let handle = shared.repo.rt.spawn(async move {
        let res = store.put(&pack_key(&name), bytes.into()).await;
        drop(permit);
        res
    });
    shared.uploads.lock().expect("uploads").push(handle);
    shared.sealed.lock().expect("sealed").push((name, entries));
}
