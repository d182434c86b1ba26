//! The databases of a cut: for every SQLite database whose file, `-wal` or `-journal` the
//! cut changed, its state at the last commit SQLite would recover from the cut's bytes
//! (vfs::db), read from the frozen bytes, never from the live files; for every other
//! database of the parent generation that is still there, the parent's state; a database
//! that is gone is dropped. A database is recognised by its header, whatever its name, so a
//! database renamed into place counts (docs/SEMANTICS.md).
//!
//! A WAL frame the parent generation recorded as committed (same salts and checkpoint
//! sequence, at or before its last commit) that is no longer valid is corruption: the
//! generation records it in the database's state, and the daemon says it on stderr and in
//! `owfs status` once the generation is published. The commit goes on: the bytes are what
//! they are, and recording them is how anyone learns of it
//! (docs/decisions/sqlite-state-in-generations.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;

use chunkstore::generation::{DbState, GenRecord, WalState, DB_STATE_VERSION};
use chunkstore::read::{FileMap, Reader};
use chunkstore::tree::Entry;
use vfs::db::{self, Change, Changes, Files, Mode, Source, Tracked};
use vfs::wal::Stop;

use std::sync::Arc;

use chunkstore::tree::Part;
use chunkstore::Hash;

use super::super::content::{FileData, FrozenView};
use super::super::Shared;
use super::cut::{ChangedDir, Cut, FileSlot};

/// A database followed by the daemon: its logical pages' CRCs, computed once, then updated
/// from the pages each cut changed.
pub(in crate::daemon) struct Kept {
    /// The database file's inode in this daemon: another file at the same path starts over.
    db_ino: u64,
    tracked: Tracked,
}

/// By path in the workspace.
pub(in crate::daemon) type KeptDbs = HashMap<String, Kept>;

const COMPANIONS: [&str; 2] = ["-wal", "-journal"];

/// Bytes of a file frozen by the cut.
struct Frozen<'a>(FrozenView<'a>);

impl vfs::wal::ReadAt for Frozen<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        chunkstore::rechunk::ReadAt::read_exact_at(&self.0, buf, offset)
    }
}

/// Bytes of a file as the last generation holds it, read from the store with a window that
/// doubles (to 4 MiB) while reads follow each other: a database's pages are chunks of their
/// own, and one request per page made re-reading a 256 MiB database take 65,536 requests.
struct Stored<'a> {
    reader: &'a Reader,
    map: FileMap,
    path: String,
    window: std::cell::RefCell<(u64, Vec<u8>)>,
    /// The working copy of the file, when the mount holds it: its bytes are used where they
    /// hash to the generation's parts (they may have changed since the cut; then the store's
    /// are read). A database's pages are parts of their own, so this is page by page.
    local: Option<Arc<FileData>>,
}

const STORED_WINDOW_MAX: u64 = 4 << 20;

impl Stored<'_> {
    /// `buf` at `offset` from the working copy, if every part it covers there is the
    /// generation's (checked by hash); `false` otherwise.
    fn read_local(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let Some(local) = &self.local else {
            return Ok(false);
        };
        let end = offset + buf.len() as u64;
        for p in self.map.covering(offset, end) {
            let len = p.part.len();
            let data = local.read(self.reader.repo(), p.start, len as u32)?;
            let same = data.len() as u64 == len
                && match p.part {
                    Part::Chunk(c) => Hash::of(&data) == c.hash,
                    Part::Inline(i) => i.bytes() == data.as_slice(),
                };
            if !same {
                return Ok(false);
            }
            let (a, b) = (p.start.max(offset), p.end().min(end));
            buf[(a - offset) as usize..(b - offset) as usize]
                .copy_from_slice(&data[(a - p.start) as usize..(b - p.start) as usize]);
        }
        Ok(true)
    }
}

impl vfs::wal::ReadAt for Stored<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if end <= self.map.size() && self.read_local(buf, offset)? {
            return Ok(());
        }
        let mut w = self.window.borrow_mut();
        let (start, data) = &*w;
        if offset < *start || end > start + data.len() as u64 {
            let sequential = offset == start + data.len() as u64 && !data.is_empty();
            let size = if sequential {
                (data.len() as u64 * 2).clamp(buf.len() as u64, STORED_WINDOW_MAX)
            } else {
                buf.len() as u64
            };
            let pieces: Vec<_> = self
                .map
                .covering(offset, (offset + size.max(buf.len() as u64)).max(end))
                .collect();
            let fetched = chunkstore::read::fetch_pieces(self.reader.repo(), &pieces, &self.path)
                .map_err(io::Error::other)?;
            let first = pieces.first().map_or(offset, |p| p.start);
            let mut bytes = Vec::new();
            for (p, d) in pieces.iter().zip(fetched) {
                match d {
                    Some(d) => bytes.extend_from_slice(&d),
                    None => bytes.resize(bytes.len() + p.part.len() as usize, 0),
                }
            }
            *w = (first, bytes);
        }
        let (start, data) = &*w;
        let from = offset
            .checked_sub(*start)
            .ok_or(io::ErrorKind::UnexpectedEof)? as usize;
        let src = data
            .get(from..from + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// One of a database's files opened for reading.
struct Opened<'a> {
    bytes: Box<dyn vfs::wal::ReadAt + 'a>,
    len: u64,
    change: Change,
    ino: u64,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// The record's form of a state.
fn record_state(s: &db::State, corruption: Option<String>) -> DbState {
    DbState {
        v: DB_STATE_VERSION,
        page_size: s.page_size,
        page_count: s.page_count,
        journal_mode: match s.mode {
            Mode::Wal => "wal",
            Mode::Rollback => "rollback",
        }
        .to_string(),
        wal: s.wal.as_ref().map(|w| WalState {
            salt1: w.header.salt1,
            salt2: w.header.salt2,
            checkpoint_seq: w.header.checkpoint_seq,
            last_commit: w.last_commit,
            commit_checksum: [w.commit_checksum.0, w.commit_checksum.1],
            torn_frames: w.valid_frames - w.last_commit,
        }),
        hot_journal: s.hot_journal,
        checksum: format!("{:016x}", s.checksum),
        corruption,
    }
}

/// Frames the parent recorded as committed that this WAL no longer holds valid, in words.
fn lost_frames(path: &str, now: &db::State, parent: &GenRecord) -> Option<String> {
    let (new, old) = (now.wal.as_ref()?, parent.sqlite.get(path)?.wal.as_ref()?);
    let h = &new.header;
    if (h.salt1, h.salt2, h.checkpoint_seq) != (old.salt1, old.salt2, old.checkpoint_seq)
        || new.last_commit >= old.last_commit
        || new.stop == Stop::NextLog
    {
        return None;
    }
    let how = match new.stop {
        Stop::End => "the log is cut short there",
        _ => "its checksum or salts no longer match",
    };
    Some(format!(
        "{path}-wal: frames 1 to {} were committed in generation {} (salts {:08x} {:08x}, \
         checkpoint {}), but frame {} is no longer valid ({how}): SQLite now recovers only up \
         to frame {}",
        old.last_commit,
        parent.number,
        old.salt1,
        old.salt2,
        old.checkpoint_seq,
        new.valid_frames + 1,
        new.last_commit
    ))
}

impl Shared {
    /// The databases of `cut` (see the module's comment), by path.
    pub(super) fn capture_databases(
        &self,
        cut: &Cut,
        parent: &GenRecord,
    ) -> crate::error::Result<BTreeMap<String, DbState>> {
        let dirs = cut.changed_dirs();
        let by_path: HashMap<&str, &ChangedDir> =
            dirs.iter().map(|d| (d.path.as_str(), d)).collect();
        let mut out = BTreeMap::new();
        // Databases of the parent in directories the cut did not change.
        for (path, st) in &parent.sqlite {
            let (dir, _) = split(path);
            if !by_path.contains_key(dir) && below_unchanged(dir, &by_path) {
                out.insert(
                    path.clone(),
                    DbState {
                        corruption: None,
                        ..st.clone()
                    },
                );
            }
        }
        // No chunk cache: stored files are read through `Stored`'s own window.
        let reader = Reader::new(self.repo.clone(), 0);
        let mut kept = self.databases.lock();
        for d in &dirs {
            let mut names: BTreeSet<&[u8]> = BTreeSet::new();
            for (name, slot) in &d.files {
                let base = COMPANIONS
                    .iter()
                    .find_map(|c| name.strip_suffix(c.as_bytes()))
                    .unwrap_or(name);
                if matches!(slot, FileSlot::Frozen(..)) && d.files.contains_key(base) {
                    names.insert(base);
                }
            }
            for (path, st) in &parent.sqlite {
                let (dir, name) = split(path);
                if dir != d.path || !d.files.contains_key(name.as_bytes()) {
                    continue;
                }
                let has = |suffix: &str| d.files.contains_key(format!("{name}{suffix}").as_bytes());
                let companion_gone =
                    (st.wal.is_some() && !has("-wal")) || (st.hot_journal && !has("-journal"));
                if names.contains(name.as_bytes()) || companion_gone {
                    names.insert(name.as_bytes());
                } else {
                    out.insert(
                        path.clone(),
                        DbState {
                            corruption: None,
                            ..st.clone()
                        },
                    );
                }
            }
            for name in names {
                let path = join(&d.path, &String::from_utf8_lossy(name));
                match self.capture_one(d, name, &path, &reader, &mut kept) {
                    Ok(Some(state)) => {
                        let lost = lost_frames(&path, &state, parent);
                        out.insert(path, record_state(&state, lost));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        kept.remove(&path);
                        return Err(chunkstore::Error::io(
                            format!("{}/{path}", self.mountpoint.display()),
                            e,
                        )
                        .into());
                    }
                }
            }
        }
        kept.retain(|p, _| out.contains_key(p));
        Ok(out)
    }

    /// The state of the database `name` of the changed directory `d`; `None`: no database.
    fn capture_one(
        &self,
        d: &ChangedDir,
        name: &[u8],
        path: &str,
        reader: &Reader,
        kept: &mut KeptDbs,
    ) -> io::Result<Option<db::State>> {
        let open = |suffix: &str| -> io::Result<Option<Opened>> {
            let mut n = name.to_vec();
            n.extend_from_slice(suffix.as_bytes());
            Ok(match d.files.get(&n[..]) {
                None => None,
                Some(FileSlot::Frozen(ino, ff)) => Some(Opened {
                    bytes: Box::new(Frozen(FrozenView {
                        data: &ff.data,
                        repo: &self.repo,
                    })),
                    len: ff.size,
                    change: Change::Ranges(ff.dirty.clone()),
                    ino: *ino,
                }),
                Some(FileSlot::Clean(e, ino)) => {
                    let local =
                        ino.and_then(|i| self.table.lock().get(i).and_then(|n| n.data().cloned()));
                    Some(stored(reader, e, &join(path, suffix), local)?)
                }
            })
        };
        let Some(dbf) = open("")? else {
            return Ok(None);
        };
        let (wal, journal) = (open("-wal")?, open("-journal")?);
        let files = Files {
            db: source(&dbf),
            wal: wal.as_ref().map(source),
            journal: journal.as_ref().map(source),
        };
        let change = |o: &Option<Opened>| match o {
            Some(o) => o.change.clone(),
            // Gone: the tracked state notices the missing file itself.
            None => Change::Ranges(Vec::new()),
        };
        if let Some(k) = kept.get_mut(path).filter(|k| k.db_ino == dbf.ino) {
            let changes = Changes {
                db: dbf.change.clone(),
                wal: change(&wal),
                journal: change(&journal),
            };
            if k.tracked.update(files, &changes)? {
                return Ok(Some(k.tracked.state().clone()));
            }
            kept.remove(path);
            return Ok(None);
        }
        kept.remove(path);
        match db::open(files)? {
            Some(tracked) => {
                let state = tracked.state().clone();
                kept.insert(
                    path.to_string(),
                    Kept {
                        db_ino: dbf.ino,
                        tracked,
                    },
                );
                Ok(Some(state))
            }
            None => Ok(None),
        }
    }

    /// Says the corruption a published generation recorded: stderr and `owfs status`.
    pub(super) fn report_corruption(&self, rec: &GenRecord) {
        for (path, st) in &rec.sqlite {
            let Some(what) = &st.corruption else { continue };
            eprintln!(
                "owfs: {}: SQLITE WAL DAMAGE in generation {}: {what}",
                self.ws, rec.number
            );
            let mut s = self.stats.lock();
            s.sqlite_damage += 1;
            s.last_sqlite_damage = Some(format!("generation {}: {path}: {what}", rec.number));
        }
    }
}

fn source<'a>(o: &'a Opened<'_>) -> Source<'a> {
    Source {
        bytes: &*o.bytes,
        len: o.len,
    }
}

/// A file of the last generation, read from the store.
fn stored<'a>(
    reader: &'a Reader,
    e: &Entry,
    path: &str,
    local: Option<Arc<FileData>>,
) -> io::Result<Opened<'a>> {
    // The part list the mount kept from its last commit of this file, if it is this one:
    // walking a 1 GiB database's list from the store at every commit fetched the packs of
    // its nodes again and again (scripts/sqlite-get-storm.sh).
    let kept = local
        .as_ref()
        .and_then(|l| l.committed_parts(reader.repo(), &e.content));
    let map = match kept {
        Some(parts) => chunkstore::read::FileMap::from_parts(parts, e.size, path),
        None => reader.open(&e.content, e.size, path),
    }
    .map_err(io::Error::other)?;
    Ok(Opened {
        bytes: Box::new(Stored {
            reader,
            map,
            path: path.to_string(),
            window: Default::default(),
            local,
        }),
        len: e.size,
        change: Change::None,
        ino: e.ino,
    })
}

/// Whether the directory `dir` (not changed by the cut) is below a subdirectory the cut saw
/// unchanged: then so is everything in it. Otherwise it is gone.
fn below_unchanged(dir: &str, changed: &HashMap<&str, &ChangedDir>) -> bool {
    let mut at = dir;
    loop {
        let (up, name) = split(at);
        if let Some(d) = changed.get(up) {
            return d.clean_dirs.contains(name.as_bytes());
        }
        if up.is_empty() {
            return false;
        }
        at = up;
    }
}
