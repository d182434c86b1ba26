//! A store opened for owfs: its configuration, the blob index, and verified reads of blobs
//! and trees. Every byte read back is checked against its hash. A generation's files are read
//! through `read.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::blobcache::BlobCache;
use crate::chunker::ChunkParams;
use crate::error::{Error, Result};
use crate::generation::{GenRecord, PackAt};
use crate::hash::Hash;
use crate::index::{Index, IndexFile};
use crate::pack::{open_blob, pack_key, BlobKind, PackEntry, Tail};
use crate::store::{Created, Store};
use crate::tree::Tree;

const CONFIG_KEY: &str = "config";
pub const STORE_FORMAT: u32 = 1;
/// Whole packs of trees and segments kept in memory, by total size.
const PACK_CACHE_BYTES: usize = 64 << 20;
/// Parallel index downloads.
const INDEX_FETCH_PARALLEL: usize = 16;

/// Fixed per store: chunk boundaries must agree for identical content to be stored once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoreConfig {
    pub format: u32,
    pub chunk_min: u32,
    pub chunk_avg: u32,
    pub chunk_max: u32,
    pub zstd_level: i32,
    pub created_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let p = ChunkParams::default();
        StoreConfig {
            format: STORE_FORMAT,
            chunk_min: p.min,
            chunk_avg: p.avg,
            chunk_max: p.max,
            zstd_level: 1,
            created_ms: crate::generation::now_ms(),
        }
    }
}

/// Whole packs of trees and segments, bounded by their total size. A pack is large next to
/// the budget (a few MiB of 64), so the cache is one shard: split in several, each would hold
/// a few packs at most.
type PackCache = quick_cache::sync::Cache<Hash, Bytes, PackWeight>;

/// A cached pack weighs its length.
#[derive(Clone)]
struct PackWeight;

impl quick_cache::Weighter<Hash, Bytes> for PackWeight {
    fn weight(&self, _: &Hash, pack: &Bytes) -> u64 {
        (pack.len() as u64).max(1)
    }
}

fn pack_cache() -> PackCache {
    let options = quick_cache::OptionsBuilder::new()
        .shards(1)
        .estimated_items_capacity(PACK_CACHE_BYTES / (4 << 20))
        .weight_capacity(PACK_CACHE_BYTES as u64)
        .build()
        .expect("pack cache options");
    PackCache::with_options(options, PackWeight, Default::default(), Default::default())
}

pub struct Repo {
    pub store: Store,
    pub rt: tokio::runtime::Handle,
    pub config: StoreConfig,
    index: RwLock<Index>,
    index_loaded: Mutex<bool>,
    pack_cache: PackCache,
    /// Node-local verified blobs (filled by a pre-pull), consulted before the store.
    blob_cache: RwLock<Option<Arc<BlobCache>>>,
    /// Index objects this process wrote recently, which `compact_own_index` may merge.
    own_index: Mutex<Vec<OwnIndex>>,
    /// Packs this process uploaded whose index object it has not written yet
    /// (`defer_index`; docs/decisions/one-pack-a-commit.md): in the in-memory index, kept
    /// there across a reload, written by `write_deferred_index`.
    deferred: Mutex<Option<OwnIndex>>,
    /// Packs whose trailers `adopt_unindexed` read, and when it last listed the packs.
    adopted: Mutex<(HashSet<Hash>, Option<std::time::Instant>)>,
    /// The last listing of condemned packs and when it was made (`condemned_listing`).
    condemned: Mutex<Option<(std::time::Instant, Condemned)>>,
    /// `index_what_it_adopts` was called.
    pays_adopted: std::sync::atomic::AtomicBool,
    /// Packs read from generation records (`root_of`), by name: their home and entries,
    /// kept across a refresh of the index (forgotten when gc replaced it: `unregister_all`).
    registered: Mutex<HashMap<Hash, Registered>>,
    /// Packs inside earlier records that generations read here may need
    /// (`GenRecord::pending`), not read yet: `locate` reads them when it misses a blob.
    lazy: Mutex<HashSet<PackAt>>,
    /// Packs of pending lists whose record was gone when read: gc copied them out and an
    /// index object names them, or nothing needs them any more; not carried on.
    gone_pending: Mutex<HashSet<String>>,
    /// When `refresh_index` last listed the index objects.
    index_listed_at: Mutex<Option<std::time::Instant>>,
}

/// A pack read from a generation record: the record's key and the pack's entries.
type Registered = (String, Arc<Vec<PackEntry>>);

/// gc's condemned packs, each with when it was condemned (ms).
pub type Condemned = Arc<HashMap<Hash, i64>>;

/// An index object this process wrote, with what it names and the time before its oldest
/// pack was uploaded.
struct OwnIndex {
    key: String,
    packs_since_ms: u64,
    packs: Vec<(Hash, Vec<PackEntry>)>,
    /// Those of `packs` that live inside another object (`IndexFile::homes`).
    homes: Vec<(Hash, String)>,
}

/// Index compaction (docs/decisions/index-compaction.md): only index objects whose packs are
/// younger than this are merged, so a merged object never names a pack gc may have condemned
/// (gc leaves packs younger than its grace period, 1 h by default, alone).
pub const COMPACT_MAX_AGE_MS: u64 = 10 * 60 * 1000;
/// Merge once this many own index objects are young enough ...
pub const COMPACT_AT: usize = 16;
/// ... or, with at least two, once the last merge is this old.
pub const COMPACT_EVERY_MS: u64 = 60 * 1000;
/// An index object naming more blobs than this (about 45 KiB) is never merged by the mount:
/// merging re-uploads what it merges, and a commit that wrote a large database's pages would
/// otherwise be uploaded again at every merge for ten minutes. gc merges it.
pub const COMPACT_MAX_ENTRIES: usize = 1024;

/// What one compaction did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Compaction {
    pub merged: usize,
    pub key: String,
    pub bytes: usize,
}

impl Repo {
    /// Opens the store; with `create`, initialises an empty one. Without it, a store that was
    /// never written reads as empty.
    pub fn open(store: Store, rt: tokio::runtime::Handle, create: bool) -> Result<Arc<Repo>> {
        let config = rt.block_on(async {
            match store.get_opt(CONFIG_KEY).await? {
                Some(b) => decode_config(&b, store.url()),
                None if create => {
                    let cfg = StoreConfig::default();
                    let body = serde_json::to_vec_pretty(&cfg).expect("config json");
                    match store.put_if_absent(CONFIG_KEY, body.into()).await? {
                        Created::Yes => Ok(cfg),
                        Created::AlreadyExists => {
                            decode_config(&store.get(CONFIG_KEY).await?, store.url())
                        }
                    }
                }
                None => Ok(StoreConfig::default()),
            }
        })?;
        Ok(Arc::new(Repo {
            store,
            rt,
            config,
            index: RwLock::default(),
            index_loaded: Mutex::new(false),
            pack_cache: pack_cache(),
            blob_cache: RwLock::default(),
            own_index: Mutex::default(),
            deferred: Mutex::default(),
            adopted: Mutex::default(),
            condemned: Mutex::default(),
            pays_adopted: Default::default(),
            registered: Mutex::default(),
            lazy: Mutex::default(),
            gone_pending: Mutex::default(),
            index_listed_at: Mutex::default(),
        }))
    }

    pub fn chunk_params(&self) -> ChunkParams {
        ChunkParams {
            min: self.config.chunk_min,
            avg: self.config.chunk_avg,
            max: self.config.chunk_max,
        }
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Runs `futs` (store requests) INDEX_FETCH_PARALLEL at a time; their outputs in the
    /// order they finish.
    fn block_on_all<F: std::future::Future>(
        &self,
        futs: impl IntoIterator<Item = F>,
    ) -> Vec<F::Output> {
        self.block_on(
            futures::stream::iter(futs)
                .buffer_unordered(INDEX_FETCH_PARALLEL)
                .collect(),
        )
    }

    /// Fetches index objects not merged yet. Cheap when nothing is new: one LIST.
    pub fn refresh_index(&self) -> Result<()> {
        let mut known: std::collections::HashSet<String> = self
            .index
            .read()
            .expect("index lock")
            .files
            .iter()
            .cloned()
            .collect();
        let at = std::time::Instant::now();
        let listed: Vec<String> = self
            .block_on(self.store.list("index"))?
            .into_iter()
            .map(|l| l.key)
            .collect();
        *self.index_listed_at.lock().expect("listed at") = Some(at);
        let listed_set: std::collections::HashSet<&String> = listed.iter().collect();
        if known.iter().any(|k| !listed_set.contains(k)) {
            // gc replaced index objects: packs may have been dropped, so forget everything
            // rather than keep locations of blobs that may be gone.
            *self.index.write().expect("index lock") = Index::default();
            self.adopted.lock().expect("adopted").0.clear();
            self.unregister_all();
            known.clear();
        }
        let new: Vec<String> = listed.into_iter().filter(|k| !known.contains(k)).collect();
        let store = &self.store;
        let fetched: Vec<Result<(String, IndexFile)>> =
            self.block_on_all(new.into_iter().map(|key| async move {
                match store.get(&key).await {
                    Ok(bytes) => IndexFile::decode(&bytes, &key).map(|f| (key, f)),
                    // Replaced by gc since the listing: its successor is in the next listing.
                    Err(Error::Missing { .. }) => Ok((key, IndexFile::default())),
                    Err(e) => Err(e),
                }
            }));
        let mut index = self.index.write().expect("index lock");
        for r in fetched {
            let (key, file) = r?;
            index.merge(&file);
            index.files.push(key);
        }
        // Our packs that no index object names yet stay known, and those read from records.
        if let Some(d) = &*self.deferred.lock().expect("deferred") {
            index.add_packs(&d.packs, &d.homes);
        }
        for (name, (home, entries)) in self.registered.lock().expect("registered").iter() {
            if !index.is_named(name) {
                index.add_pack_at(*name, entries, Some(home));
            }
        }
        *self.index_loaded.lock().expect("index flag") = true;
        Ok(())
    }

    /// Packs just uploaded (`BlobWriter::finish`) whose index object is written later, by
    /// `write_deferred_index`: a commit then costs one PUT less. Until then a reader in
    /// another process finds them by their trailers (`adopt_unindexed`).
    pub fn defer_index(&self, packs_since_ms: u64, packs: Vec<(Hash, Vec<PackEntry>)>) {
        self.defer_index_at(packs_since_ms, packs, Vec::new());
    }

    /// `defer_index` for packs some of which live inside other objects (`homes`): a small
    /// commit's pack inside its generation record (docs/decisions/one-request-a-commit.md).
    pub fn defer_index_at(
        &self,
        packs_since_ms: u64,
        packs: Vec<(Hash, Vec<PackEntry>)>,
        homes: Vec<(Hash, String)>,
    ) {
        self.index
            .write()
            .expect("index lock")
            .add_packs(&packs, &homes);
        let mut d = self.deferred.lock().expect("deferred");
        let d = d.get_or_insert_with(|| OwnIndex {
            key: String::new(),
            packs_since_ms,
            packs: Vec::new(),
            homes: Vec::new(),
        });
        d.packs_since_ms = d.packs_since_ms.min(packs_since_ms);
        d.packs.extend(packs);
        d.homes.extend(homes);
    }

    /// What a new generation's record lists as `pending` (packs inside records that no
    /// index object names yet): of `candidates` (its parent's or source's, from
    /// `publish::record` and `publish::derived`) and of this process's deferred packs that
    /// live in records, those the loaded index does not name.
    pub fn pending_for(&self, candidates: &[PackAt]) -> Result<Vec<PackAt>> {
        self.ensure_index()?;
        let mut all: Vec<PackAt> = candidates.to_vec();
        if let Some(d) = &*self.deferred.lock().expect("deferred") {
            all.extend(d.homes.iter().filter_map(|(n, h)| PackAt::from_key(n, h)));
        }
        let mut seen = HashSet::new();
        let gone = self.gone_pending.lock().expect("gone").clone();
        Ok(self.with_index(|i| {
            all.into_iter()
                .filter(|p| !gone.contains(&p.pack))
                .filter(|p| p.name().is_some_and(|n| !i.is_named(&n)))
                .filter(|p| seen.insert(p.pack.clone()))
                .collect()
        }))
    }

    /// Makes a generation's blobs findable before its tree is read: the pack inside its
    /// record (entries read with the record), and the records it lists as pending (read
    /// only if a blob is missed). Returns its root. Every reader of a generation starts
    /// here.
    pub fn root_of(&self, rec: &GenRecord) -> Result<Hash> {
        let root = rec.root_hash()?;
        if let (Some(name), Some(entries)) = (rec.pack_name()?, rec.embedded.clone()) {
            self.register(name, rec.key(), entries);
        }
        self.lazy
            .lock()
            .expect("lazy")
            .extend(rec.pending.iter().cloned());
        Ok(root)
    }

    /// A pack read from a record: into the index (and, for a mount that pays for what it
    /// adopts, into its next index object, unless one names it already).
    fn register(&self, name: Hash, home: String, entries: Arc<Vec<PackEntry>>) {
        // A pack the index knows already stays where the index says (a record naming
        // another pack's name would otherwise move it).
        let known = self.with_index(|i| i.has_pack(&name) && i.home(&name) != Some(&home));
        if known {
            return;
        }
        self.registered
            .lock()
            .expect("registered")
            .insert(name, (home.clone(), entries.clone()));
        self.index
            .write()
            .expect("index lock")
            .add_pack_at(name, &entries, Some(&home));
        self.defer_if_unnamed(name, home, &entries);
    }

    /// For a mount that pays for what it adopts: a pack read from a record that no index
    /// object names joins the next one this process writes (unless it waits there already).
    fn defer_if_unnamed(&self, name: Hash, home: String, entries: &[PackEntry]) {
        if !self.pays_adopted.load(std::sync::atomic::Ordering::Relaxed)
            || self.with_index(|i| i.is_named(&name))
        {
            return;
        }
        let deferred = self
            .deferred
            .lock()
            .expect("deferred")
            .as_ref()
            .is_some_and(|d| d.packs.iter().any(|(n, _)| *n == name));
        if !deferred {
            self.defer_index_at(
                crate::generation::now_ms(),
                vec![(name, entries.to_vec())],
                vec![(name, home)],
            );
        }
    }

    /// Reads the records `root_of` noted as pending whose packs are not known yet; returns
    /// how many packs it found. A record gone meanwhile was deleted by gc after it copied
    /// the pack to its own key and named it in an index object: nothing to read.
    fn read_lazy(&self) -> Result<usize> {
        let todo: Vec<PackAt> = {
            let lazy = self.lazy.lock().expect("lazy");
            self.with_index(|i| {
                lazy.iter()
                    .filter(|p| {
                        p.name()
                            .is_some_and(|n| i.home(&n).is_none() && !i.is_named(&n))
                    })
                    .cloned()
                    .collect()
            })
        };
        let store = &self.store;
        let got: Vec<(PackAt, Result<Option<Bytes>>)> = self.block_on_all(
            todo.into_iter()
                .map(|p| async move { (p.clone(), store.get_opt(&p.key()).await) }),
        );
        let mut found = 0;
        for (p, r) in got {
            let r = r?;
            // Read once: found, or gone (its pack copied out by gc, named in an index object,
            // or not needed any more), or unreadable (said, and skipped: one damaged record
            // must not hide the blobs others hold).
            self.lazy.lock().expect("lazy").remove(&p);
            let Some(bytes) = r else {
                self.gone_pending
                    .lock()
                    .expect("gone")
                    .insert(p.pack.clone());
                continue;
            };
            let pack = crate::generation::decode_record(&bytes, &p.ws, p.n)
                .and_then(|rec| Ok((rec.pack_name()?, rec.embedded.clone(), rec.key())));
            match pack {
                Ok((Some(name), Some(entries), key)) if name.to_hex() == p.pack => {
                    self.register(name, key, entries);
                    found += 1;
                }
                Ok(_) => eprintln!(
                    "owfs: generation {}@{} does not carry pack {} that a later one lists",
                    p.ws,
                    p.n,
                    &p.pack[..12.min(p.pack.len())]
                ),
                Err(e) => eprintln!("owfs: a record a later generation lists is unreadable: {e}"),
            }
        }
        Ok(found)
    }

    /// Where `pack` is stored: inside a record, or at its own key.
    pub fn pack_location(&self, pack: &Hash) -> String {
        self.with_index(|i| i.home(pack).map(str::to_string))
            .unwrap_or_else(|| pack_key(pack))
    }

    /// Reads `range` of `pack` (None: all of it); a pack whose home (a record) is gone is
    /// read at its own key, where gc copied it before deleting the record.
    async fn get_pack(&self, pack: &Hash, range: Option<std::ops::Range<u64>>) -> Result<Bytes> {
        let at = self.pack_location(pack);
        let (b, moved) = get_pack_at(&self.store, &at, pack, range).await?;
        if moved {
            self.forget_home(pack);
        }
        Ok(b)
    }

    /// `pack` is at its own key now, not inside a record (gc copied it there).
    pub fn forget_home(&self, pack: &Hash) {
        self.index.write().expect("index lock").clear_home(pack);
        self.registered.lock().expect("registered").remove(pack);
    }

    /// gc's condemned packs, listed again when the last listing is `max_age` old.
    pub fn condemned_listing(&self, max_age: std::time::Duration) -> Result<Condemned> {
        if let Some((at, l)) = &*self.condemned.lock().expect("condemned") {
            if at.elapsed() < max_age {
                return Ok(l.clone());
            }
        }
        let at = std::time::Instant::now();
        let l = Arc::new(self.block_on(crate::gc::condemned(self))?);
        *self.condemned.lock().expect("condemned") = Some((at, l.clone()));
        Ok(l)
    }

    /// Packs waiting for their index object, and when the oldest was begun (ms).
    pub fn deferred(&self) -> Option<(usize, u64)> {
        let d = self.deferred.lock().expect("deferred");
        d.as_ref().map(|d| (d.packs.len(), d.packs_since_ms))
    }

    /// Writes one index object naming every deferred pack (then merged like any index
    /// object this process wrote). Ok(false) when nothing waits; on failure they wait on.
    pub fn write_deferred_index(&self) -> Result<bool> {
        let Some(mut d) = self.deferred.lock().expect("deferred").take() else {
            return Ok(false);
        };
        // A gc whose grace is shorter than these packs' age (only the library allows one
        // while a workspace is mounted) may have condemned or deleted one: naming it again
        // would let a later commit deduplicate against it. Such packs are left out, and
        // forgotten by the in-memory index.
        let gone = match self.gone_packs(&d.packs) {
            Ok(g) => g,
            Err(e) => {
                self.restore_deferred(d);
                return Err(e);
            }
        };
        if !gone.is_empty() {
            d.packs.retain(|(name, _)| !gone.contains(name));
            d.homes.retain(|(name, _)| !gone.contains(name));
            self.reset_index();
        }
        // A pack gc copied out of its record (found at its own key) is named there.
        d.homes
            .retain(|(name, _)| self.with_index(|i| i.home(name).is_some() || !i.has_pack(name)));
        if d.packs.is_empty() {
            return Ok(false);
        }
        let file = IndexFile {
            packs: d.packs.clone(),
            homes: d.homes.clone(),
        };
        let bytes = file.encode();
        let key = file.key(crate::generation::now_ms(), &bytes);
        if let Err(e) = self.block_on(self.store.put(&key, bytes.into())) {
            self.restore_deferred(d);
            return Err(e);
        }
        self.note_index_file(&key);
        self.note_own_index(key, d.packs_since_ms, file.packs, file.homes);
        Ok(true)
    }

    /// Puts deferred packs taken for an index object back in front of newer ones.
    fn restore_deferred(&self, d: OwnIndex) {
        let mut slot = self.deferred.lock().expect("deferred");
        match &mut *slot {
            Some(newer) => {
                newer.packs_since_ms = newer.packs_since_ms.min(d.packs_since_ms);
                let later = std::mem::replace(&mut newer.packs, d.packs);
                newer.packs.extend(later);
                newer.homes.extend(d.homes);
            }
            None => *slot = Some(d),
        }
    }

    /// Of `packs`, those gc condemned or deleted. A deleted pack has lost its marker, but gc
    /// leaves traces in `index/`: it replaces the index objects it merges. Only when the
    /// listing differs from the index objects this process read or wrote is each pack's
    /// presence read (a one-byte range each); another writer's new index object costs that
    /// too, harmlessly.
    fn gone_packs(&self, packs: &[(Hash, Vec<PackEntry>)]) -> Result<HashSet<Hash>> {
        let condemned = self.block_on(crate::gc::condemned(self))?;
        let mut gone: HashSet<Hash> = packs
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| condemned.contains_key(n))
            .collect();
        let listed: HashSet<String> = self
            .block_on(self.store.list("index"))?
            .into_iter()
            .map(|l| l.key)
            .collect();
        let known: HashSet<String> = self.with_index(|i| i.files.iter().cloned().collect());
        if listed == known {
            return Ok(gone);
        }
        let checked: Vec<(Hash, Result<Bytes>)> = self.block_on_all(
            packs
                .iter()
                .map(|(name, _)| async move { (*name, self.get_pack(name, Some(0..1)).await) }),
        );
        for (name, r) in checked {
            match r {
                Ok(_) => {}
                Err(Error::Missing { .. }) => {
                    gone.insert(name);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(gone)
    }

    /// Reads the trailers of listed packs that no index object names and adds their blobs
    /// to the in-memory index (packs read before aside, and packs gc condemned: a commit
    /// must not deduplicate against those, and no generation needs them). This is how a
    /// reader finds the blobs of a commit whose index object is not written yet (a mount
    /// writes it after up to 16 commits or 30 s, or never if it crashed; gc writes it then).
    /// Returns how many packs it read.
    pub fn adopt_unindexed(&self) -> Result<usize> {
        let skip = self.block_on(crate::gc::condemned(self))?;
        let listed = self.block_on(self.store.list("packs"))?;
        let known: HashSet<Hash> = self.with_index(|i| i.pack_names().iter().copied().collect());
        let todo: Vec<(Hash, u64, i64)> = {
            let mut a = self.adopted.lock().expect("adopted");
            a.1 = Some(std::time::Instant::now());
            listed
                .iter()
                .filter_map(|l| {
                    let name = Hash::from_hex(l.key.rsplit('/').next()?)?;
                    Some((name, l.size, l.modified_ms))
                })
                .filter(|(h, _, _)| !known.contains(h) && !skip.contains_key(h) && !a.0.contains(h))
                .collect()
        };
        let store = &self.store;
        let found: Vec<(Hash, i64, Result<Vec<PackEntry>>)> =
            self.block_on_all(todo.into_iter().map(|(name, size, at)| async move {
                (name, at, fetch_trailer(store, &name, size).await)
            }));
        let mut adopted = Vec::new();
        let mut oldest_ms = u64::MAX;
        for (name, at, r) in found {
            match r {
                Ok(entries) => {
                    self.add_to_index(name, &entries);
                    self.adopted.lock().expect("adopted").0.insert(name);
                    oldest_ms = oldest_ms.min(at.max(0) as u64);
                    adopted.push((name, entries));
                }
                // Deleted by gc since the listing: nothing to adopt.
                Err(Error::Missing { .. }) => {}
                // A damaged trailer hides only that pack's blobs: a reader that needs one
                // is told it is missing, the others read on (gc reads the whole pack).
                Err(Error::Corrupt { what }) => {
                    eprintln!("owfs: a pack no index object names is unreadable: {what}");
                    self.adopted.lock().expect("adopted").0.insert(name);
                }
                Err(e) => return Err(e),
            }
        }
        let n = adopted.len();
        if n > 0 && self.pays_adopted.load(std::sync::atomic::Ordering::Relaxed) {
            self.defer_index(oldest_ms, adopted);
        }
        Ok(n)
    }

    /// Packs `adopt_unindexed` finds join this process's deferred ones, so that its next
    /// `write_deferred_index` names them and later readers need not read their trailers (a
    /// mount after a crash: the dead mount's last commits).
    pub fn index_what_it_adopts(&self) {
        self.pays_adopted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // And those read from records before (the fence of a takeover reads the latest).
        let registered: Vec<(Hash, Registered)> = self
            .registered
            .lock()
            .expect("registered")
            .iter()
            .map(|(n, r)| (*n, r.clone()))
            .collect();
        for (name, (home, entries)) in registered {
            self.defer_if_unnamed(name, home, &entries);
        }
    }

    pub fn ensure_index(&self) -> Result<()> {
        if !*self.index_loaded.lock().expect("index flag") {
            self.refresh_index()?;
        }
        Ok(())
    }

    pub fn with_index<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.read().expect("index lock"))
    }

    pub fn add_to_index(&self, name: Hash, entries: &[PackEntry]) {
        self.index
            .write()
            .expect("index lock")
            .add_pack(name, entries);
    }

    /// Marks an index object as merged (we wrote it), so a refresh does not fetch it again.
    pub fn note_index_file(&self, key: &str) {
        self.index
            .write()
            .expect("index lock")
            .files
            .push(key.to_string());
    }

    /// Remembers an index object this process just wrote (BlobWriter::finish).
    pub fn note_own_index(
        &self,
        key: String,
        packs_since_ms: u64,
        packs: Vec<(Hash, Vec<PackEntry>)>,
        homes: Vec<(Hash, String)>,
    ) {
        {
            let mut index = self.index.write().expect("index lock");
            for (name, _) in &packs {
                index.note_named(name);
            }
        }
        self.own_index.lock().expect("own index").push(OwnIndex {
            key,
            packs_since_ms,
            packs,
            homes,
        });
    }

    /// Merges the index objects this process wrote in the last COMPACT_MAX_AGE_MS into one
    /// when there are COMPACT_AT of them (or at least two and `last_ms`, the previous merge,
    /// is COMPACT_EVERY_MS old), then deletes them. Without it a long-lived committer leaves
    /// one index object per commit, and every later reader of the store (a mount on a fresh
    /// node) lists and fetches them all. Objects that aged out are left to gc. A reader that
    /// listed a deleted object finds it missing and its content in the merged one
    /// (`refresh_index`).
    pub fn compact_own_index(&self, last_ms: u64) -> Result<Option<Compaction>> {
        let now = crate::generation::now_ms();
        let inputs = {
            let mut own = self.own_index.lock().expect("own index");
            own.retain(|o| {
                now.saturating_sub(o.packs_since_ms) < COMPACT_MAX_AGE_MS
                    && o.packs.iter().map(|(_, e)| e.len()).sum::<usize>() <= COMPACT_MAX_ENTRIES
            });
            let due = own.len() >= COMPACT_AT
                || (own.len() >= 2 && now.saturating_sub(last_ms) >= COMPACT_EVERY_MS);
            if !due {
                return Ok(None);
            }
            std::mem::take(&mut *own)
        };
        // gc deletes the index objects it merged into its own (which keeps only the packs it
        // did not condemn): merging such an object from memory would name its condemned packs
        // again. Only objects still in the store are merged; the others are forgotten.
        let listed: std::collections::HashSet<String> =
            match self.block_on(self.store.list("index")) {
                Ok(l) => l.into_iter().map(|l| l.key).collect(),
                Err(e) => {
                    self.restore_own_index(inputs);
                    return Err(e);
                }
            };
        let inputs: Vec<OwnIndex> = inputs
            .into_iter()
            .filter(|o| listed.contains(&o.key))
            .collect();
        if inputs.len() < 2 {
            self.restore_own_index(inputs);
            return Ok(None);
        }
        let file = IndexFile {
            packs: inputs.iter().flat_map(|o| o.packs.clone()).collect(),
            homes: inputs.iter().flat_map(|o| o.homes.clone()).collect(),
        };
        let bytes = file.encode();
        let key = file.key(now, &bytes);
        let size = bytes.len();
        if let Err(e) = self.block_on(self.store.put(&key, bytes.into())) {
            // Nothing changed in the store: merge them next time.
            self.restore_own_index(inputs);
            return Err(e);
        }
        {
            let mut index = self.index.write().expect("index lock");
            index.files.retain(|f| !inputs.iter().any(|o| &o.key == f));
            index.files.push(key.clone());
        }
        let packs_since_ms = inputs.iter().map(|o| o.packs_since_ms).min().unwrap_or(now);
        self.own_index.lock().expect("own index").insert(
            0,
            OwnIndex {
                key: key.clone(),
                packs_since_ms,
                packs: file.packs,
                homes: file.homes,
            },
        );
        // The merged object holds everything: a failed delete leaves a duplicate (harmless;
        // gc merges it).
        let store = &self.store;
        let deleted: Vec<Result<()>> =
            self.block_on_all(inputs.iter().map(|o| store.delete(&o.key)));
        match deleted.into_iter().find_map(|r| r.err()) {
            Some(e) => Err(e),
            None => Ok(Some(Compaction {
                merged: inputs.len(),
                key,
                bytes: size,
            })),
        }
    }

    /// Puts index objects taken for a merge back in front of any written meanwhile.
    fn restore_own_index(&self, inputs: Vec<OwnIndex>) {
        let mut own = self.own_index.lock().expect("own index");
        let newer = std::mem::replace(&mut *own, inputs);
        own.extend(newer);
    }

    /// Drops the in-memory index (after gc rewrote it).
    pub fn reset_index(&self) {
        *self.index.write().expect("index lock") = Index::default();
        self.adopted.lock().expect("adopted").0.clear();
        self.unregister_all();
        *self.index_loaded.lock().expect("index flag") = false;
    }

    /// Forgets the packs read from records, keeping them as pending: after gc rewrote the
    /// index, such a pack may have been copied out of its record, condemned and deleted, so
    /// it is read again from its record only if a blob is missed and the record still exists.
    fn unregister_all(&self) {
        let registered = std::mem::take(&mut *self.registered.lock().expect("registered"));
        let mut lazy = self.lazy.lock().expect("lazy");
        for (name, (home, _)) in registered {
            if let Some(p) = PackAt::from_key(&name, &home) {
                lazy.insert(p);
            }
        }
    }

    /// `refresh_index` when the last listing of the index objects is `max_age` old or older
    /// (a mount before a commit: a commit must deduplicate against an index loaded well
    /// within gc's grace, docs/decisions/gc-safety.md).
    pub fn refresh_index_within(&self, max_age: std::time::Duration) -> Result<()> {
        let fresh = self
            .index_listed_at
            .lock()
            .expect("listed at")
            .is_some_and(|t| t.elapsed() < max_age);
        if fresh {
            Ok(())
        } else {
            self.refresh_index()
        }
    }

    /// Where a blob lives; reloads the index once before declaring it missing.
    pub fn locate(&self, hash: &Hash, what: &str) -> Result<(Hash, PackEntry)> {
        self.ensure_index()?;
        if let Some(loc) = self.with_index(|i| i.get(hash)) {
            return Ok(loc);
        }
        self.refresh_index()?;
        if let Some(loc) = self.with_index(|i| i.get(hash)) {
            return Ok(loc);
        }
        // Inside a record an earlier generation listed as pending.
        if self.read_lazy()? > 0 {
            if let Some(loc) = self.with_index(|i| i.get(hash)) {
                return Ok(loc);
            }
        }
        // A pack no index object names yet (a recent commit's): at most one listing a
        // second, so a store that truly lost a blob is not listed once per lookup.
        let listed_lately = self
            .adopted
            .lock()
            .expect("adopted")
            .1
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1));
        if !listed_lately {
            self.adopt_unindexed()?;
        }
        self.with_index(|i| i.get(hash))
            .ok_or_else(|| Error::Missing {
                key: format!("blob {}", hash.short()),
                what: format!("{what}; no pack holds it"),
            })
    }

    async fn fetch_pack(&self, name: &Hash) -> Result<Bytes> {
        if let Some(b) = self.pack_cache.get(name) {
            return Ok(b);
        }
        // Not checked against its name as a whole: every blob taken from it is checked
        // against its own hash (`open_blob`), and a byte damaged in one blob must not make
        // the others unreadable (a small commit's data and trees share one pack).
        let bytes = self.get_pack(name, None).await?;
        self.pack_cache.insert(*name, bytes.clone());
        Ok(bytes)
    }

    /// Reads and verifies one blob. Trees and segments come from whole (cached) packs; data
    /// blobs with one range read.
    pub fn read_blob(&self, hash: &Hash, what: &str) -> Result<Vec<u8>> {
        let cache = self.blob_cache.read().expect("blob cache").clone();
        if let Some(raw) = cache.as_ref().and_then(|c| c.get(hash)) {
            return Ok(raw);
        }
        let (raw, kind) = self.read_blob_from_store(hash, what)?;
        if let Some(c) = cache {
            // Trees and segment lists are small and read again at the next mount.
            if kind != BlobKind::Data {
                let _ = c.put(hash, &raw);
            }
        }
        Ok(raw)
    }

    /// A blob from the node's blob cache, if it holds it.
    pub fn cached_blob(&self, hash: &Hash) -> Option<Vec<u8>> {
        let cache = self.blob_cache.read().expect("blob cache").clone();
        cache.and_then(|c| c.get(hash))
    }

    /// Reads blobs from `cache` first (set by a mount whose node ran a pre-pull).
    pub fn set_blob_cache(&self, cache: Option<Arc<BlobCache>>) {
        *self.blob_cache.write().expect("blob cache") = cache;
    }

    /// The blob's bytes, verified, and its kind (from the index entry that located it).
    fn read_blob_from_store(&self, hash: &Hash, what: &str) -> Result<(Vec<u8>, BlobKind)> {
        let (pack, entry) = self.locate(hash, what)?;
        crate::pack::check_entry(&entry, what)?;
        let stored = self.block_on(async {
            if entry.kind == BlobKind::Data {
                let start = entry.offset as u64;
                self.get_pack(&pack, Some(start..start + entry.stored_len as u64))
                    .await
            } else {
                let whole = self.fetch_pack(&pack).await?;
                // In u64: offset + stored_len overflows u32 in a damaged index.
                let (s, e) = (
                    entry.offset as u64,
                    entry.offset as u64 + entry.stored_len as u64,
                );
                if e > whole.len() as u64 {
                    return Err(Error::corrupt(format!(
                        "pack {} is shorter than its index says",
                        pack.short()
                    )));
                }
                Ok(whole.slice(s as usize..e as usize))
            }
        });
        let stored = stored.map_err(|e| match e {
            Error::Missing { key, .. } => Error::Missing {
                key,
                what: what.to_string(),
            },
            other => other,
        })?;
        Ok((open_blob(&entry, &stored, what)?, entry.kind))
    }

    pub fn read_tree(&self, hash: &Hash, dir: &str) -> Result<Tree> {
        let bytes = self.read_blob(hash, &format!("tree of {dir:?}"))?;
        Tree::decode(&bytes, dir)
    }
}

/// Reads `range` of `pack` (None: all of it) at `at` (`Repo::pack_location`); when `at` is
/// a record that is gone, at the pack's own key, where gc copied it before deleting the
/// record. Returns whether it read it there.
pub async fn get_pack_at(
    store: &Store,
    at: &str,
    pack: &Hash,
    range: Option<std::ops::Range<u64>>,
) -> Result<(Bytes, bool)> {
    let get = |key: String| {
        let range = range.clone();
        async move {
            match range {
                Some(r) => store.get_range(&key, r).await,
                None => store.get(&key).await,
            }
        }
    };
    match get(at.to_string()).await {
        Err(Error::Missing { .. }) if at != pack_key(pack) => {
            Ok((get(pack_key(pack)).await?, true))
        }
        other => other.map(|b| (b, false)),
    }
}

/// A pack's trailer by range reads of its end (one, or two for a trailer over 64 KiB).
async fn fetch_trailer(store: &Store, name: &Hash, size: u64) -> Result<Vec<PackEntry>> {
    let key = pack_key(name);
    let what = format!("pack {}", name.short());
    let first = size.min(64 << 10);
    let tail = store.get_range(&key, size - first..size).await?;
    match crate::pack::read_trailer_from_tail(&tail, size, &what)? {
        Tail::Entries(e) => Ok(e),
        Tail::Needs(n) => {
            let tail = store.get_range(&key, size - n..size).await?;
            match crate::pack::read_trailer_from_tail(&tail, size, &what)? {
                Tail::Entries(e) => Ok(e),
                Tail::Needs(_) => Err(Error::corrupt(format!("{what}: trailer unreadable"))),
            }
        }
    }
}

/// Reads a store's configuration: any bytes give one whose chunk sizes FastCDC accepts and
/// whose zstd level zstd accepts, or an error.
pub fn decode_config(bytes: &[u8], url: &str) -> Result<StoreConfig> {
    let cfg: StoreConfig = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("store configuration of {url} is unreadable: {e}")))?;
    if cfg.format != STORE_FORMAT {
        return Err(Error::Format {
            what: format!(
                "store {url} has format {}, this owfs reads format {STORE_FORMAT}; use a matching owfs release",
                cfg.format
            ),
        });
    }
    // FastCDC's limits (it asserts them), so chunk_max is at most 16 MiB
    // (`pack::MAX_DATA_BLOB`) and a chunker's buffer (16 chunks) at most 256 MiB.
    use fastcdc::v2020::{
        AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
    };
    let (min, avg, max) = (
        cfg.chunk_min as usize,
        cfg.chunk_avg as usize,
        cfg.chunk_max as usize,
    );
    let chunks_ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
        && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
        && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
        && min <= avg
        && avg <= max
        && [min, avg, max].iter().all(|s| s % 2 == 0);
    if !chunks_ok {
        return Err(Error::corrupt(format!(
            "store configuration of {url}: chunk sizes {min}/{avg}/{max} are out of range"
        )));
    }
    if !zstd::compression_level_range().contains(&cfg.zstd_level) {
        return Err(Error::corrupt(format!(
            "store configuration of {url}: zstd level {} is out of range",
            cfg.zstd_level
        )));
    }
    Ok(cfg)
}
