//! The committer: cuts a generation from the live state. The cut is a short barrier (no
//! mutation runs while the changed part of the tree is frozen); chunking, hashing and
//! uploading follow while writers continue, reading frozen files through their saved bytes.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::generation::RootAttr;
use chunkstore::layout;
use chunkstore::pack::BlobKind;
use chunkstore::publish::{publish_checked_mount, record, NewGen};
use chunkstore::snapshot::{encode_content, TreeStats};
use chunkstore::tree::{Content, Entry, Part, Tree};
use chunkstore::writer::BlobWriter;
use chunkstore::{Error, GenRecord, Hash, Result};

use super::super::content::{FileData, FrozenView};
use super::super::inodes::{Body, Prior, Table, ROOT};
use super::super::Shared;
use super::checks::Frozen;

/// A commit reloads the index objects it deduplicates against when they were listed this
/// long ago or longer: far inside gc's grace while a workspace is mounted (15 minutes at
/// least, docs/decisions/gc-safety.md), for one LIST every few minutes.
const INDEX_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// A mount moves its workspace's head hint once in this many generations (and at its last).
const HEAD_HINT_EVERY: u64 = 16;
/// A commit checks what it reuses against a listing of gc's condemned packs at most this
/// old: one LIST a minute, not one a commit (docs/decisions/gc-safety.md).
const CONDEMNED_LISTING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// A frozen directory's entries, by name.
type Items = Vec<(Vec<u8>, Item)>;

/// The changed directories of a cut, flat: `dirs[0]` is the root, and a directory's index is
/// always greater than its parent's, so building trees from the last index to the first
/// builds every subtree before the directory that names it. No recursion follows the depth
/// of the tree, which any program can make as deep as it likes (mkdir in a loop).
type FrozenDirs = Vec<Items>;

/// One entry of a frozen directory.
enum Item {
    /// Unchanged since the last generation; the inode whose bytes the working copy holds for
    /// it, when it is a live file of the mount (a name held back at its prior state has none).
    Clean(Arc<Entry>, Option<u64>),
    File {
        ino: u64,
        entry: Entry,
    },
    Dir {
        ino: u64,
        entry: Entry,
        /// Its index in the cut's `FrozenDirs`.
        dir: usize,
    },
    Leaf {
        ino: u64,
        entry: Entry,
    },
    /// A directory changed (its attributes, its name) but never loaded from the store: its
    /// content is its tree in the mounted generation.
    Unloaded {
        ino: u64,
        entry: Entry,
    },
}

pub(super) struct FrozenFile {
    pub(super) data: Arc<FileData>,
    pub(super) size: u64,
    /// Byte ranges written since the last cut.
    pub(super) dirty: Vec<Range<u64>>,
}

/// A regular file of a changed directory, as the database capture sees it (sqlite.rs).
pub(super) enum FileSlot<'a> {
    /// Changed in this cut (written, created, renamed here).
    Frozen(u64, &'a FrozenFile),
    /// As in the last generation (and the live inode that holds its bytes, if any).
    Clean(&'a Entry, Option<u64>),
}

/// A directory this cut changed: its regular files, and its subdirectories that did not
/// change (everything below them is as in the last generation).
pub(super) struct ChangedDir<'a> {
    /// Its path in the workspace ("" for the root, else "a/b").
    pub(super) path: String,
    pub(super) files: std::collections::BTreeMap<&'a [u8], FileSlot<'a>>,
    pub(super) clean_dirs: std::collections::HashSet<&'a [u8]>,
}

pub struct Cut {
    /// The table's cut sequence number at this cut (`Table::cut_seq`; not the lease epoch).
    seq: u64,
    root: Option<(Entry, FrozenDirs)>,
    files: HashMap<u64, FrozenFile>,
    root_attr: RootAttr,
    pub barrier: Duration,
    pending_at_cut: u64,
    /// Files, directories and bytes in the workspace at the cut.
    totals: (i64, i64, i64),
    /// Files this cut held back (a name holds what it held before a rename, see
    /// `inodes::Replaced`): they stay changed for the next cut.
    pub held_back: Vec<u64>,
    /// Directories that show a held-back rename's source at its old name: changed again for
    /// the next cut too.
    held_dirs: Vec<u64>,
}

/// A frozen file, once per inode however many names it has.
fn freeze_file(files: &mut HashMap<u64, FrozenFile>, ino: u64, d: &Arc<FileData>) {
    files.entry(ino).or_insert_with(|| {
        let (size, dirty) = d.freeze();
        FrozenFile {
            data: d.clone(),
            size,
            dirty,
        }
    });
}

/// Freezes every changed directory below the root, and every changed file in them.
fn freeze_tree(
    t: &Table,
    files: &mut HashMap<u64, FrozenFile>,
    held_back: &mut Vec<u64>,
) -> (FrozenDirs, Vec<u64>) {
    let mut dirs: FrozenDirs = vec![Vec::new()];
    let mut todo = vec![(ROOT, 0usize)];
    // Sources of held-back renames, shown where they were (see `inodes::Replaced`).
    let mut sources = t.held_back_sources();
    let mut held_dirs = Vec::new();
    while let Some((ino, index)) = todo.pop() {
        let mut items = freeze_dir(t, ino, files, held_back, |child| {
            dirs.push(Vec::new());
            todo.push((child, dirs.len() - 1));
            dirs.len() - 1
        });
        if let Some(back) = sources.remove(&ino) {
            for (name, src) in back {
                let Some(n) = t.get(src) else { continue };
                let item = match (&n.committed, n.data()) {
                    (Some(e), _) => Item::Clean(e.clone(), None),
                    (None, Some(d)) => {
                        freeze_file(files, src, d);
                        Item::File {
                            ino: src,
                            entry: n.entry(src),
                        }
                    }
                    (None, None) => continue,
                };
                items.push((name, item));
                // Its old directory holds the name only in this generation.
                held_dirs.push(ino);
            }
            items.sort_by(|a, b| a.0.cmp(&b.0));
        }
        dirs[index] = items;
    }
    (dirs, held_dirs)
}

/// Freezes one directory's entries; `subdir` gives a changed subdirectory its index.
fn freeze_dir(
    t: &Table,
    ino: u64,
    files: &mut HashMap<u64, FrozenFile>,
    held_back: &mut Vec<u64>,
    mut subdir: impl FnMut(u64) -> usize,
) -> Items {
    let n = t.get(ino).expect("frozen directory exists");
    let Some(children) = n.children() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(children.len());
    for (name, &child) in children {
        let Some(c) = t.get(child) else { continue };
        if c.local_only || c.kind.to_tree().is_none() || super::inodes::node_local_name(name) {
            continue;
        }
        if let Some(prior) = t.held_back(c, ino, name) {
            held_back.push(child);
            let item = match prior {
                Prior::Committed(e) => Item::Clean(e.clone(), None),
                Prior::Live { ino, entry, data } => {
                    freeze_file(files, *ino, data.data());
                    Item::File {
                        ino: *ino,
                        entry: (**entry).clone(),
                    }
                }
            };
            out.push((name.clone(), item));
            continue;
        }
        if let Some(e) = &c.committed {
            out.push((name.clone(), Item::Clean(e.clone(), Some(child))));
            continue;
        }
        let entry = c.entry(child);
        let item = match &c.body {
            Body::Dir {
                children: None,
                tree: Some(tree),
                ..
            } => {
                let mut entry = entry;
                entry.subtree = Some(*tree);
                Item::Unloaded { ino: child, entry }
            }
            Body::Dir { .. } => Item::Dir {
                ino: child,
                entry,
                dir: subdir(child),
            },
            Body::File(d) => {
                freeze_file(files, child, d);
                Item::File { ino: child, entry }
            }
            _ => Item::Leaf { ino: child, entry },
        };
        out.push((name.clone(), item));
    }
    out
}

impl Cut {
    /// The directories this cut changed, by path (sqlite.rs). Names that are not UTF-8 are
    /// shown lossily.
    pub(super) fn changed_dirs(&self) -> Vec<ChangedDir<'_>> {
        let Some((_, dirs)) = &self.root else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut todo = vec![(0usize, String::new())];
        while let Some((index, path)) = todo.pop() {
            let mut d = ChangedDir {
                path: path.clone(),
                files: Default::default(),
                clean_dirs: Default::default(),
            };
            for (name, item) in &dirs[index] {
                match item {
                    Item::File { ino, .. } => {
                        if let Some(ff) = self.files.get(ino) {
                            d.files.insert(name, FileSlot::Frozen(*ino, ff));
                        }
                    }
                    Item::Clean(e, ino) if e.kind == chunkstore::tree::Kind::File => {
                        d.files.insert(name, FileSlot::Clean(e, *ino));
                    }
                    Item::Clean(e, _) if e.kind == chunkstore::tree::Kind::Dir => {
                        d.clean_dirs.insert(name);
                    }
                    Item::Unloaded { .. } => {
                        d.clean_dirs.insert(name);
                    }
                    Item::Dir { dir, .. } => {
                        let n = String::from_utf8_lossy(name);
                        let child = if path.is_empty() {
                            n.into_owned()
                        } else {
                            format!("{path}/{n}")
                        };
                        todo.push((*dir, child));
                    }
                    _ => {}
                }
            }
            out.push(d);
        }
        out
    }
}

/// What the barrier found.
pub(super) enum CutOutcome {
    /// Nothing changed since the last generation.
    Nothing,
    /// Renames replaced files since the last flush: flush their sources, then cut.
    FlushRenamesFirst,
    Cut(Box<Cut>),
}

impl Shared {
    /// The barrier: freezes what changed. With renames whose sources were not flushed yet,
    /// freezes only if `hold_back` (their names then hold what they held before).
    pub(super) fn cut(&self, hold_back: bool) -> CutOutcome {
        let t0 = Instant::now();
        let _gate = self.gate.write();
        let pending_at_cut = self.pending.load(std::sync::atomic::Ordering::Relaxed);
        let mut t = self.table.lock();
        let root = t.get(ROOT).expect("root");
        if root.committed.is_some() {
            return CutOutcome::Nothing;
        }
        if !hold_back && t.has_unflushed_renames() {
            return CutOutcome::FlushRenamesFirst;
        }
        let root_attr = RootAttr {
            mode: root.attr.perm,
            uid: root.attr.uid,
            gid: root.attr.gid,
            mtime_ns: root.attr.mtime_ns,
        };
        let root_entry = root.entry(ROOT);
        let mut files = HashMap::new();
        let mut held_back = Vec::new();
        let (dirs, held_dirs) = freeze_tree(&t, &mut files, &mut held_back);
        let seq = t.cut_seq;
        t.cut_seq += 1;
        let totals = (t.files, t.dirs, t.bytes);
        drop(t);
        CutOutcome::Cut(Box::new(Cut {
            seq,
            root: Some((root_entry, dirs)),
            files,
            root_attr,
            barrier: t0.elapsed(),
            pending_at_cut,
            totals,
            held_back,
            held_dirs,
        }))
    }

    /// Uploads and publishes a cut; on failure every frozen change is dirty again.
    pub(super) fn commit_cut(
        &self,
        mut cut: Cut,
        parent: &GenRecord,
    ) -> crate::error::Result<GenRecord> {
        let mut results: Vec<(u64, Entry)> = Vec::new();
        let mut contents: HashMap<u64, (Content, Arc<Vec<Part>>)> = HashMap::new();
        let outcome = self.upload(&mut cut, parent, &mut results, &mut contents);
        if let Ok(rec) = &outcome {
            self.report_corruption(rec);
        }
        // Thaw files: success gives them their new base.
        for (ino, ff) in &cut.files {
            let r = if outcome.is_ok() {
                contents.get(ino).cloned()
            } else {
                None
            };
            ff.data.thaw(r, &ff.dirty);
        }
        let mut t = self.table.lock();
        match &outcome {
            Ok(_) => {
                for (ino, e) in results {
                    if let Some(n) = t.get_mut(ino) {
                        if n.touched <= cut.seq {
                            n.committed = Some(Arc::new(e));
                        }
                    }
                }
                // Held back: not in this generation, so not committed.
                for ino in cut.held_back.iter().chain(&cut.held_dirs) {
                    t.touch(*ino);
                }
                self.pending
                    .fetch_sub(cut.pending_at_cut, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => {
                // Everything frozen changes again in the next cut.
                for (ino, _) in results {
                    t.touch(ino);
                }
                for ino in cut.files.keys() {
                    t.touch(*ino);
                }
                t.touch(ROOT);
            }
        }
        drop(t);
        self.backpressure.notify_all();
        outcome
    }

    fn upload(
        &self,
        cut: &mut Cut,
        parent: &GenRecord,
        results: &mut Vec<(u64, Entry)>,
        contents: &mut HashMap<u64, (Content, Arc<Vec<Part>>)>,
    ) -> crate::error::Result<GenRecord> {
        let repo = &self.repo;
        // Deduplicate against an index loaded well within gc's grace (gc-safety.md): a
        // long-lived mount otherwise keeps packs gc has since condemned and deleted.
        repo.refresh_index_within(INDEX_MAX_AGE)?;
        // A small commit's pack travels inside its record, one PUT for both (docs/decisions/
        // one-request-a-commit.md), and its index entry waits for later ones
        // (`write_index_if_due`).
        let mut writer = BlobWriter::embedding(repo.clone())?;
        writer.defer_index();
        let params = repo.chunk_params();
        // Each changed database's state, read from the frozen bytes before any is uploaded.
        let databases = self.capture_databases(cut, parent)?;
        for (ino, ff) in &cut.files {
            let old = ff
                .data
                .base_chunks(repo)
                .map_err(|e| Error::io(&ff.data.path, e))?;
            let view = FrozenView {
                data: &ff.data,
                repo,
            };
            // The per-file checks see the cut's bytes before any of them is uploaded.
            let frozen = Frozen {
                path: &ff.data.path,
                size: ff.size,
                bytes: &view,
            };
            self.checks
                .read()
                .run(&frozen)
                .map_err(|why| Error::io(&ff.data.path, std::io::Error::other(why)))?;
            // Databases and WALs are cut at their pages, other files by content
            // (docs/decisions/sqlite-pages.md).
            let layout =
                layout::detect_file(&view, ff.size).map_err(|e| Error::io(&ff.data.path, e))?;
            let (chunks, _read) = layout::relayout::<Error, _>(
                layout,
                &view,
                ff.size,
                &old,
                ff.dirty.clone(),
                params,
                |data, hash| writer.add(hash, BlobKind::Data, data.to_vec()),
            )
            .map_err(|e| match e {
                Error::Io { source, .. } => Error::io(&ff.data.path, source),
                other => other,
            })?;
            // Chunks kept from the old list are blobs this commit relies on (gc checks them);
            // the writer ignores the ones it is uploading itself.
            for h in chunks.iter().filter_map(Part::blob) {
                writer.note_reused(h);
            }
            let list = Arc::new(chunks.clone());
            let content = encode_content(&mut writer, chunks)?;
            contents.insert(*ino, (content, list));
        }
        let (root_entry, dirs) = cut.root.take().expect("cut has a root");
        let root = build_tree(&mut writer, dirs, contents, results)?;
        let mut re = root_entry;
        re.subtree = Some(root);
        results.push((ROOT, re));
        let reused = std::mem::take(&mut writer.reused);
        let (write, pack) = writer.finish_embedding()?;
        let stats = TreeStats {
            files: cut.totals.0.max(0) as u64,
            dirs: cut.totals.1.max(0) as u64,
            bytes: cut.totals.2.max(0) as u64,
            ..Default::default()
        };
        let mut rec = record(NewGen {
            ws: &self.ws,
            parent: Some(parent),
            kind: "commit",
            origin: None,
            root,
            tree: stats,
            write,
            epoch: self.epoch,
        });
        rec.root_attr = Some(cut.root_attr);
        rec.sqlite = databases;
        // Invariant: along a workspace's history lease epochs never fall (the number is the
        // parent's + 1 by construction, `record`); a record that broke it would let an older
        // holder's history continue over a newer one's.
        if rec.epoch < parent.epoch {
            return Err(Error::Store {
                store: repo.store.url().to_string(),
                detail: format!(
                    "owfs bug: generation {} (epoch {}) would follow generation {} (epoch {})",
                    rec.number, rec.epoch, parent.number, parent.epoch
                ),
            }
            .into());
        }
        // Never publish past the lease's deadline; a publish already in flight when it passes
        // is refused by the new holder's fence.
        self.may_publish(rec.number)?;
        // The head hint moves every HEAD_HINT_EVERY generations and at the last commit of
        // the mount (docs/decisions/publication.md).
        let hint = rec.number.is_multiple_of(HEAD_HINT_EVERY)
            || self.life.phase() != super::super::lifecycle::Phase::Serving;
        publish_checked_mount(
            repo,
            &mut rec,
            &reused,
            pack,
            hint,
            CONDEMNED_LISTING_MAX_AGE,
        )?;
        Ok(rec)
    }
}

fn note_entry_reused(writer: &mut BlobWriter, e: &Entry) {
    if let Some(h) = e.subtree {
        writer.note_reused(h);
    }
    for h in e.content.direct_blobs() {
        writer.note_reused(h);
    }
}

/// Writes the trees of a cut's changed directories, deepest first; the root's hash.
fn build_tree(
    writer: &mut BlobWriter,
    dirs: FrozenDirs,
    contents: &HashMap<u64, (Content, Arc<Vec<Part>>)>,
    results: &mut Vec<(u64, Entry)>,
) -> Result<Hash> {
    let mut hashes: Vec<Option<Hash>> = vec![None; dirs.len()];
    for (index, items) in dirs.into_iter().enumerate().rev() {
        let hash = build_dir(writer, items, contents, results, &hashes)?;
        hashes[index] = Some(hash);
    }
    Ok(hashes[0].expect("the root was built"))
}

/// Writes one directory's tree; its changed subdirectories' trees are in `built`.
fn build_dir(
    writer: &mut BlobWriter,
    items: Items,
    contents: &HashMap<u64, (Content, Arc<Vec<Part>>)>,
    results: &mut Vec<(u64, Entry)>,
    built: &[Option<Hash>],
) -> Result<Hash> {
    let mut entries = Vec::with_capacity(items.len());
    for (name, item) in items {
        let mut e = match item {
            Item::Clean(e, _) => {
                note_entry_reused(writer, &e);
                let mut e = (*e).clone();
                e.name = name;
                entries.push(e);
                continue;
            }
            Item::File { ino, mut entry } => {
                let (content, _) = contents.get(&ino).expect("frozen file was chunked");
                entry.content = content.clone();
                // The size is the frozen size (a later write may have grown the node).
                entry.size = content.size();
                results.push((ino, entry.clone()));
                entry
            }
            Item::Dir {
                ino,
                mut entry,
                dir,
            } => {
                // Invariant: a subdirectory's index is greater than its parent's.
                entry.subtree = Some(built[dir].expect("subtrees are built before their parent"));
                results.push((ino, entry.clone()));
                entry
            }
            Item::Leaf { ino, entry } => {
                results.push((ino, entry.clone()));
                entry
            }
            Item::Unloaded { ino, entry } => {
                note_entry_reused(writer, &entry);
                results.push((ino, entry.clone()));
                entry
            }
        };
        e.name = name;
        entries.push(e);
    }
    let tree = Tree { entries };
    let bytes = tree.encode_checked("a directory of the workspace")?;
    let hash = Hash::of(&bytes);
    writer.add(hash, BlobKind::Tree, bytes)?;
    Ok(hash)
}
