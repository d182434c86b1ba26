//! Each regular file's bytes: in memory while small, else a file of the cache directory,
//! lazily fetched from the generation the mount started from; the dirty ranges since the last
//! cut; freezing a file for a cut and reading it as frozen while writers go on.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chunkstore::read::{self, FileMap};
use chunkstore::tree::{Content, Part};
use chunkstore::Repo;
use parking_lot::Condvar;

use super::ranges::RangeSet;

/// Bytes of chunks fetched together when a range of a file is first read (bounds the memory
/// a read holds).
const FETCH_BATCH: u64 = 8 << 20;

/// What of the file is still in the generation the mount started from.
struct Remote {
    /// The file's content and size in that generation.
    content: Content,
    size: u64,
    /// Its chunk map, once something was fetched.
    map: Option<Arc<FileMap>>,
    /// Bytes at or past this offset were cut off by a truncate: never fetched.
    end: u64,
}

/// What a cut froze of a file: its size, and the bytes writers have overwritten since, saved
/// just before they were overwritten, so the committer reads the file as it was at the cut.
pub struct Frozen {
    pub size: u64,
    saved: RangeSet,
    bytes: BTreeMap<u64, Vec<u8>>,
}

/// A file smaller than this is kept in memory until it grows, is fsynced or is fallocated:
/// creating (and later deleting) an inode of the local file system costs more than the
/// FUSE request that writes a small file, and on some file systems much more (ext4 without a
/// journal scans recently deleted inodes on every create).
const INLINE_MAX: u64 = 64 << 10;
/// At most this many bytes of small files are in memory at once; past it, files go to disk.
const INLINE_BUDGET: u64 = 64 << 20;

/// At most this many cache files are open at once (a workspace can hold far more files than
/// a process may open), and at most half the process's limit on open files: past it, the
/// cache of open files (`LocalRes::open`) closes one, reopened on next use.
const MAX_OPEN: usize = 1024;

/// Where a file's local bytes are: nowhere yet (all zeros), in memory, or in its cache file.
/// Bytes past the end of what is held read as zeros, up to the logical length.
enum Local {
    None,
    Mem(Vec<u8>),
    Disk,
}

/// Local resources all files of a table share.
pub struct LocalRes {
    /// Bytes of small files held in memory (`Local::Mem`), by capacity.
    inline: AtomicU64,
    /// Open cache files by file id, at most `MAX_OPEN` (or half the process's limit on open
    /// files); the one evicted is reopened on next use.
    open: quick_cache::sync::Cache<u64, Arc<File>>,
}

impl LocalRes {
    pub(super) fn new() -> LocalRes {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        LocalRes {
            inline: AtomicU64::new(0),
            open: quick_cache::sync::Cache::new(MAX_OPEN.min((limit / 2) as usize).max(16)),
        }
    }

    fn cached(&self, id: u64) -> Option<Arc<File>> {
        self.open.get(&id)
    }

    /// Keeps `f` open for later uses. A file in use elsewhere keeps its descriptor until that
    /// use ends, even once evicted here.
    fn keep(&self, id: u64, f: File) -> Arc<File> {
        let f = Arc::new(f);
        self.open.insert(id, f.clone());
        f
    }

    fn forget(&self, id: u64) {
        self.open.remove(&id);
    }
}

pub struct FileState {
    local: Local,
    /// Logical length (the cache file's or the buffer's length is at most this).
    pub len: u64,
    remote: Option<Remote>,
    /// Bytes below `remote.end` already local.
    present: RangeSet,
    /// Written since the last cut.
    pub dirty: RangeSet,
    /// The content the last generation holds for this file, and its chunk list.
    pub base: Content,
    base_chunks: Option<Arc<Vec<Part>>>,
    pub frozen: Option<Frozen>,
    /// Writes copying their bytes into the cache file outside the lock (see `write`): those
    /// begun since the last cut, and those begun before it (the cut's view waits for them).
    inflight: u32,
    inflight_before_cut: u32,
    /// Number of the current cut period: a write records it when it begins.
    period: u64,
    /// The file lost its last name and its last kernel reference while a cut held it frozen
    /// or a hold-back pinned it: its local bytes go once neither does, not before.
    discard_pending: bool,
    /// Hold-backs that keep this file's bytes (`Pinned`).
    pins: u32,
    /// Its local bytes are gone (`discard`): nothing may read them as the file's content.
    discarded: bool,
}

/// A write whose state change is recorded and whose bytes are on their way to the cache file.
#[must_use]
pub struct WriteInFlight {
    file: Arc<File>,
    period: u64,
    /// The length before this write, and after it: undone on failure if nothing changed since.
    old_len: u64,
    new_len: u64,
}

pub struct FileData {
    pub path: PathBuf,
    pub st: super::lockorder::Ordered<FileState>,
    /// Signalled when a write in flight ends.
    landed: Condvar,
    /// Key of this file's descriptor in `local`.
    id: u64,
    local: Arc<LocalRes>,
}

fn eio(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

impl FileData {
    pub(super) fn new(
        path: PathBuf,
        base: Content,
        size: u64,
        id: u64,
        local: Arc<LocalRes>,
    ) -> FileData {
        let remote = (size > 0).then(|| Remote {
            content: base.clone(),
            size,
            map: None,
            end: size,
        });
        FileData {
            path,
            id,
            local,
            landed: Condvar::new(),
            st: super::lockorder::Ordered::new(
                super::lockorder::Rank::File,
                FileState {
                    local: Local::None,
                    len: size,
                    remote,
                    present: RangeSet::default(),
                    dirty: RangeSet::default(),
                    base,
                    base_chunks: None,
                    frozen: None,
                    inflight: 0,
                    inflight_before_cut: 0,
                    period: 0,
                    discard_pending: false,
                    pins: 0,
                    discarded: false,
                },
            ),
        }
    }

    /// The file is gone from the workspace: its local bytes go. A cut that froze it before it
    /// went still reads them (the generation holds the file as it was at the cut), so a
    /// frozen file keeps them until `thaw` (docs/decisions/frozen-bytes-outlive-names.md).
    pub(super) fn discard(&self) {
        let mut st = self.st.lock();
        st.discard_pending = true;
        self.discard_if_due(&mut st);
    }

    fn discard_if_due(&self, st: &mut FileState) {
        if st.discard_pending && st.frozen.is_none() && st.pins == 0 {
            st.discard_pending = false;
            self.drop_local(st);
        }
    }

    fn drop_local(&self, st: &mut FileState) {
        st.discarded = true;
        // Nothing may fetch it again (the prefetcher may still hold this file).
        st.remote = None;
        st.present = RangeSet::default();
        self.set_inline(st, None);
        if let Local::Disk = std::mem::replace(&mut st.local, Local::None) {
            self.local.forget(self.id);
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Replaces the in-memory bytes (`None`: no longer in memory), keeping the budget count.
    fn set_inline(&self, st: &mut FileState, new: Option<Vec<u8>>) {
        let old = match &st.local {
            Local::Mem(v) => v.capacity() as u64,
            _ => 0,
        };
        let add = new.as_ref().map_or(0, |v| v.capacity() as u64);
        if add >= old {
            self.local.inline.fetch_add(add - old, Ordering::Relaxed);
        } else {
            self.local.inline.fetch_sub(old - add, Ordering::Relaxed);
        }
        match new {
            Some(v) => st.local = Local::Mem(v),
            None if matches!(st.local, Local::Mem(_)) => st.local = Local::None,
            None => {}
        }
    }

    /// The cache file, created (from the in-memory bytes, if any) on first need, reopened if
    /// it was closed to stay under `MAX_OPEN`.
    fn file(&self, st: &mut FileState) -> io::Result<Arc<File>> {
        if let Local::Disk = st.local {
            if let Some(f) = self.local.cached(self.id) {
                return Ok(f);
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)?;
            return Ok(self.local.keep(self.id, f));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)?;
        if let Local::Mem(v) = &st.local {
            f.write_all_at(v, 0)?;
        }
        f.set_len(st.len)?;
        self.set_inline(st, None);
        st.local = Local::Disk;
        Ok(self.local.keep(self.id, f))
    }

    /// Whether the file, once bytes up to `end` are written, is small enough for memory.
    fn small(st: &FileState, end: u64) -> bool {
        end.max(st.len) <= INLINE_MAX
    }

    /// Stores `data` at `off` locally: in memory while the file stays small, else on disk.
    fn put(&self, st: &mut FileState, data: &[u8], off: u64) -> io::Result<()> {
        let end = off + data.len() as u64;
        let small = Self::small(st, end);
        match &mut st.local {
            Local::Disk => {}
            Local::Mem(v) if small => {
                if v.len() < end as usize {
                    let before = v.capacity();
                    v.resize(end as usize, 0);
                    let grown = (v.capacity() - before) as u64;
                    self.local.inline.fetch_add(grown, Ordering::Relaxed);
                }
                v[off as usize..end as usize].copy_from_slice(data);
                return Ok(());
            }
            Local::None if small && self.local.inline.load(Ordering::Relaxed) < INLINE_BUDGET => {
                let mut v = vec![0u8; end as usize];
                v[off as usize..].copy_from_slice(data);
                self.set_inline(st, Some(v));
                return Ok(());
            }
            _ => {}
        }
        self.file(st)?.write_all_at(data, off)
    }

    /// Reads local bytes at `off`; what was never stored reads as zeros.
    fn get(&self, st: &mut FileState, buf: &mut [u8], off: u64) -> io::Result<()> {
        match &st.local {
            Local::Disk => read_padded(&*self.file(st)?, buf, off),
            Local::Mem(v) => {
                let have = v.len().saturating_sub(off as usize).min(buf.len());
                if have > 0 {
                    buf[..have].copy_from_slice(&v[off as usize..off as usize + have]);
                }
                buf[have..].fill(0);
                Ok(())
            }
            Local::None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Sets the local length: bytes past it go, bytes up to it read as zeros.
    fn set_local_len(&self, st: &mut FileState, new_len: u64) -> io::Result<()> {
        match &mut st.local {
            Local::Mem(v) if new_len <= INLINE_MAX => {
                v.truncate(new_len as usize);
                Ok(())
            }
            Local::None if new_len <= INLINE_MAX => Ok(()),
            _ => self.file(st)?.set_len(new_len),
        }
    }

    /// Fetches from the store whatever of `[start, end)` is not local yet.
    pub fn ensure_present(
        &self,
        st: &mut FileState,
        repo: &Repo,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let Some(remote) = st.remote.as_mut() else {
            return Ok(());
        };
        let end = end.min(remote.end);
        if start >= end || st.present.covers(start, end) {
            return Ok(());
        }
        let path = self.path.display().to_string();
        let map = match &remote.map {
            Some(m) => m.clone(),
            None => {
                let m = Arc::new(
                    FileMap::load(repo, &remote.content, remote.size, &path).map_err(eio)?,
                );
                remote.map = Some(m.clone());
                m
            }
        };
        let remote_end = remote.end;
        for gap in st.present.gaps(start, end) {
            // The chunks of the gap are fetched together: a database's pages are chunks of
            // their own, side by side in their pack, and come in one request per run.
            let pieces: Vec<read::Piece> = map
                .covering(gap.start, gap.end)
                .filter(|p| !st.present.gaps(p.start, p.end().min(remote_end)).is_empty())
                .collect();
            let mut rest = &pieces[..];
            while !rest.is_empty() {
                let mut n = 0;
                let mut bytes = 0;
                while n < rest.len() && (n == 0 || bytes + rest[n].part.len() <= FETCH_BATCH) {
                    bytes += rest[n].part.len();
                    n += 1;
                }
                let (batch, more) = rest.split_at(n);
                rest = more;
                let fetched = read::fetch_pieces(repo, batch, &path).map_err(eio)?;
                for (piece, data) in batch.iter().zip(fetched) {
                    let (cs, ce_clip) = (piece.start, piece.end().min(remote_end));
                    // A hole's chunk is not fetched: bytes not yet local already read as zeros.
                    if let Some(data) = data {
                        for m in st.present.gaps(cs, ce_clip) {
                            let a = (m.start - cs) as usize;
                            let b = (m.end - cs) as usize;
                            self.put(st, &data[a..b], m.start)?;
                        }
                    }
                    st.present.insert(cs, ce_clip);
                }
            }
        }
        let remote_end = st.remote.as_ref().map(|r| r.end).unwrap_or(0);
        if st.present.covers(0, remote_end) {
            st.remote = None;
            st.present = RangeSet::default();
        }
        Ok(())
    }

    /// The next range of this file still to fetch, for the background prefetch.
    pub fn next_missing(&self, max: u64) -> Option<Range<u64>> {
        let st = self.st.lock();
        let end = st.remote.as_ref()?.end;
        let g = st.present.gaps(0, end).into_iter().next()?;
        Some(g.start..g.end.min(g.start + max))
    }

    /// Before bytes of a frozen file change, keeps their values at the cut.
    fn preserve(
        &self,
        st: &mut super::lockorder::OrderedGuard<'_, FileState>,
        repo: &Repo,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let Some(fz) = st.frozen.as_ref() else {
            return Ok(());
        };
        let end = end.min(fz.size);
        if start >= end {
            return Ok(());
        }
        let gaps = fz.saved.gaps(start, end);
        if !gaps.is_empty() {
            // The bytes at the cut include those of writes begun before it.
            self.wait_landed(st, true);
        }
        for g in gaps {
            self.ensure_present(st, repo, g.start, g.end)?;
            let mut buf = vec![0u8; (g.end - g.start) as usize];
            self.get(st, &mut buf, g.start)?;
            let fz = st.frozen.as_mut().expect("frozen");
            fz.saved.insert(g.start, g.end);
            // Invariant: saved extents never overlap (only gaps of `saved` are saved), so
            // `read_frozen` may lay them over the file in any order.
            let earlier = fz.bytes.insert(g.start, buf);
            assert!(
                earlier.is_none(),
                "owfs bug: bytes at {} of {} saved twice for one cut",
                g.start,
                self.path.display()
            );
        }
        Ok(())
    }

    /// Waits until the writes in flight have landed: those begun before the last cut
    /// (`before_cut`), or all of them.
    fn wait_landed(
        &self,
        st: &mut super::lockorder::OrderedGuard<'_, FileState>,
        before_cut: bool,
    ) {
        while st.inflight_before_cut > 0 || (!before_cut && st.inflight > 0) {
            self.landed.wait(st.inner());
        }
    }

    /// A write, in two steps so that a cut never waits for bytes being copied: `write_begin`
    /// (under the cut gate) records the new length and dirty range and saves what a frozen
    /// file's bytes were; `write_end` (outside it) copies the bytes into the cache file. A
    /// small file's write is done entirely by `write_begin` (`None`). Until the bytes land,
    /// the committer's view of the cut (`read_frozen`) waits for writes begun before the cut;
    /// writes begun after it overwrite only bytes it has saved.
    pub fn write_begin(
        &self,
        repo: &Repo,
        off: u64,
        data: &[u8],
    ) -> io::Result<Option<WriteInFlight>> {
        let mut st = self.st.lock();
        let end = off + data.len() as u64;
        self.preserve(&mut st, repo, off, end)?;
        let old_len = st.len;
        let inflight = if matches!(st.local, Local::Disk) || !Self::small(&st, end) {
            let file = self.file(&mut st)?;
            st.inflight += 1;
            Some(WriteInFlight {
                file,
                period: st.period,
                old_len,
                new_len: old_len.max(end),
            })
        } else {
            self.put(&mut st, data, off)?;
            None
        };
        st.present.insert(off, end);
        st.dirty.insert(off.min(old_len), end);
        st.len = st.len.max(end);
        Ok(inflight)
    }

    pub fn write_end(&self, w: WriteInFlight, off: u64, data: &[u8]) -> io::Result<()> {
        let r = w.file.write_all_at(data, off);
        if r.is_ok() && data.len() >= EARLY_WRITEBACK {
            // A large write (the kernel's writeback sends up to 1 MiB per request) starts its
            // way to disk now: an fsync that follows a long stream then waits for the tail, not
            // the whole stream (256 MiB written then fsynced: 290 ms -> 185 ms).
            // SAFETY: plain syscall on an owned descriptor.
            unsafe {
                libc::sync_file_range(
                    w.file.as_raw_fd(),
                    off as i64,
                    data.len() as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
        }
        let mut st = self.st.lock();
        if w.period == st.period {
            st.inflight -= 1;
        } else {
            st.inflight_before_cut -= 1;
        }
        if r.is_err() && st.len == w.new_len && w.new_len > w.old_len {
            // Nothing extended the file since: it keeps its old length (a failed write must not
            // leave zeros behind). The dirty range stays: it costs a re-read, nothing more.
            st.len = w.old_len;
        }
        drop(st);
        self.landed.notify_all();
        r
    }

    pub fn read(&self, repo: &Repo, off: u64, size: u32) -> io::Result<Vec<u8>> {
        let mut st = self.st.lock();
        let end = (off + size as u64).min(st.len);
        if off >= end {
            return Ok(Vec::new());
        }
        self.ensure_present(&mut st, repo, off, end)?;
        let mut buf = vec![0u8; (end - off) as usize];
        self.get(&mut st, &mut buf, off)?;
        Ok(buf)
    }

    pub fn truncate(&self, repo: &Repo, new_len: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        self.wait_landed(&mut st, false);
        let old = st.len;
        if new_len == old {
            return Ok(());
        }
        self.preserve(&mut st, repo, new_len, old)?;
        self.set_local_len(&mut st, new_len)?;
        if new_len < old {
            st.present.remove(new_len, u64::MAX);
            st.dirty.remove(new_len, u64::MAX);
            if let Some(r) = st.remote.as_mut() {
                r.end = r.end.min(new_len);
            }
        } else {
            st.dirty.insert(old, new_len);
        }
        st.len = new_len;
        Ok(())
    }

    /// fallocate(2): allocation (maybe extending), hole punching and zeroing.
    pub fn fallocate(&self, repo: &Repo, off: u64, len: u64, mode: i32) -> io::Result<u64> {
        let mut st = self.st.lock();
        self.wait_landed(&mut st, false);
        let end = off + len;
        let zeroes = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        if zeroes {
            self.preserve(&mut st, repo, off, end)?;
        }
        let f = self.file(&mut st)?;
        // SAFETY: plain syscall on an owned descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let old = st.len;
        if zeroes {
            let e = if keep { end.min(old) } else { end };
            st.present.insert(off, e);
            st.dirty.insert(off, e);
        }
        if !keep && end > old {
            st.dirty.insert(old, end);
            st.len = end;
        }
        Ok(st.len)
    }

    /// The current length (callers hold the table lock: table, then file state).
    pub fn len(&self) -> u64 {
        self.st.lock().len
    }

    /// fsync: the bytes go to the cache file (made now if the file was in memory) and to disk.
    pub fn sync_data(&self) -> io::Result<()> {
        let mut st = self.st.lock();
        if matches!(st.local, Local::None) && st.len == 0 {
            return Ok(());
        }
        self.file(&mut st)?.sync_data()
    }

    /// Freezes the file for a cut: returns the ranges written since the last cut.
    pub fn freeze(&self) -> (u64, Vec<Range<u64>>) {
        let mut st = self.st.lock();
        // Invariant: one cut at a time holds a file frozen. A second freeze would drop the
        // bytes the first one saved, and its commit would read what writers wrote since.
        assert!(
            st.frozen.is_none(),
            "owfs bug: {} frozen by a cut while an earlier cut still holds it",
            self.path.display()
        );
        let dirty = std::mem::take(&mut st.dirty).to_vec();
        let size = st.len;
        st.inflight_before_cut += std::mem::take(&mut st.inflight);
        st.period += 1;
        st.frozen = Some(Frozen {
            size,
            saved: RangeSet::default(),
            bytes: BTreeMap::new(),
        });
        (size, dirty)
    }

    /// The part list of `content` if it is this file's committed content: kept in memory
    /// from the last commit, or read once and kept (`base_chunks`).
    pub fn committed_parts(&self, repo: &Repo, content: &Content) -> Option<Arc<Vec<Part>>> {
        if self.st.lock().base != *content {
            return None;
        }
        self.base_chunks(repo).ok()
    }

    /// The chunk list of the last committed content.
    pub fn base_chunks(&self, repo: &Repo) -> io::Result<Arc<Vec<Part>>> {
        let (base, cached) = {
            let st = self.st.lock();
            (st.base.clone(), st.base_chunks.clone())
        };
        if let Some(c) = cached {
            return Ok(c);
        }
        let list =
            Arc::new(read::chunk_list(repo, &base, &self.path.display().to_string()).map_err(eio)?);
        self.st.lock().base_chunks = Some(list.clone());
        Ok(list)
    }

    /// Reads bytes as they were at the cut. The cache file is read without the lock, so that
    /// writers are not held up by the committer: a write after the cut saves the bytes it
    /// overwrites before it starts, so whatever such a write changes during this read is
    /// replaced from the saved bytes afterwards.
    pub fn read_frozen(&self, repo: &Repo, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        // Invariant: a cut reads only bytes some program wrote (or a truncate or fallocate
        // made zero). Bytes dropped under a frozen file would read as zeros nobody wrote; the
        // commit fails instead of publishing them.
        if st.discarded {
            return Err(eio(format!(
                "owfs bug: the local bytes of {} were dropped while a cut held it frozen",
                self.path.display()
            )));
        }
        self.wait_landed(&mut st, true);
        let end = off + buf.len() as u64;
        // Invariant: a cut reads only inside the size it froze; past it are bytes written
        // after the cut, which no generation of this cut may hold.
        let frozen_size = st.frozen.as_ref().map(|f| f.size);
        if frozen_size.is_none_or(|size| end > size) {
            return Err(eio(format!(
                "owfs bug: the cut read bytes {off}..{end} of {}, frozen at {frozen_size:?} bytes",
                self.path.display()
            )));
        }
        self.ensure_present(&mut st, repo, off, end)?;
        if let Local::Disk = st.local {
            let f = self.file(&mut st)?;
            drop(st);
            read_padded(&f, buf, off)?;
            st = self.st.lock();
        } else {
            self.get(&mut st, buf, off)?;
        }
        let fz = st.frozen.as_ref().expect("file is frozen");
        // Saved extents are disjoint and sorted: walk back from `end` until one ends before
        // `off`, copying each one's part inside [off, end).
        for (&s, bytes) in fz.bytes.range(..end).rev() {
            let e = s + bytes.len() as u64;
            if e <= off {
                break;
            }
            let (a, b) = (s.max(off), e.min(end));
            if a < b {
                buf[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&bytes[(a - s) as usize..(b - s) as usize]);
            }
        }
        Ok(())
    }

    /// Where a run of bytes that read as zero at the cut, starting at `offset`, ends: a hole
    /// of the cache file (SEEK_DATA) that no byte saved for the cut and no byte still in the
    /// store covers. `offset` when none is known.
    pub fn frozen_zeros_until(&self, offset: u64) -> u64 {
        let mut st = self.st.lock();
        self.wait_landed(&mut st, true);
        let Some(fz) = st.frozen.as_ref() else {
            return offset;
        };
        let mut end = fz.size;
        // Saved bytes are the cut's, whatever they are: the run stops before them.
        if let Some((&s, bytes)) = fz.bytes.range(..=offset).next_back() {
            if s + bytes.len() as u64 > offset {
                return offset;
            }
        }
        if let Some((&s, _)) = fz.bytes.range(offset..).next() {
            end = end.min(s);
        }
        // Bytes not fetched yet hold the store's content, not zeros.
        if let Some(r) = &st.remote {
            if offset < r.end {
                match st.present.gaps(offset, r.end).first() {
                    Some(g) if g.start <= offset => return offset,
                    Some(g) => end = end.min(g.start),
                    None => {}
                }
            }
        }
        let data = match &st.local {
            Local::None => end,
            Local::Mem(v) => {
                let held = v.get(offset as usize..).unwrap_or(&[]);
                offset + held.iter().position(|b| *b != 0).unwrap_or(held.len()) as u64
            }
            Local::Disk => {
                let Ok(f) = self.file(&mut st) else {
                    return offset;
                };
                match rustix::fs::seek(&*f, rustix::fs::SeekFrom::Data(offset)) {
                    Ok(d) => d,
                    // No data at or past `offset`: a hole to the end of the file.
                    Err(rustix::io::Errno::NXIO) => end,
                    Err(_) => offset,
                }
            }
        };
        end.min(data).max(offset)
    }

    /// After the cut's generation is durable (`Some(new base)`), or failed (`None`: the
    /// frozen ranges are dirty again).
    pub fn thaw(&self, result: Option<(Content, Arc<Vec<Part>>)>, frozen_dirty: &[Range<u64>]) {
        let mut st = self.st.lock();
        st.frozen = None;
        match result {
            Some((content, chunks)) => {
                st.base = content;
                st.base_chunks = Some(chunks);
            }
            None => {
                let len = st.len;
                for r in frozen_dirty {
                    st.dirty.insert(r.start.min(len), r.end.min(len));
                }
            }
        }
        // Gone from the workspace meanwhile: its bytes go now that the cut is done.
        self.discard_if_due(&mut st);
    }
}

impl Drop for FileData {
    fn drop(&mut self) {
        let st = self.st.get_mut();
        if let Local::Mem(v) = &st.local {
            self.local
                .inline
                .fetch_sub(v.capacity() as u64, Ordering::Relaxed);
        }
    }
}

/// A file's local bytes kept although the file may have lost its last name.
pub struct Pinned(Arc<FileData>);

impl Pinned {
    pub fn new(data: Arc<FileData>) -> Pinned {
        data.st.lock().pins += 1;
        Pinned(data)
    }

    pub fn data(&self) -> &Arc<FileData> {
        &self.0
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut st = self.0.st.lock();
        st.pins -= 1;
        self.0.discard_if_due(&mut st);
    }
}

use std::os::fd::AsRawFd;

/// Writes this large start their way to disk at once (see `write_end`).
const EARLY_WRITEBACK: usize = 256 << 10;

/// pread that treats bytes past the end of the local file as zeros.
fn read_padded(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// A frozen file as the committer reads it.
pub struct FrozenView<'a> {
    pub data: &'a FileData,
    pub repo: &'a Repo,
}

impl chunkstore::rechunk::ReadAt for FrozenView<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.data.read_frozen(self.repo, buf, offset)
    }

    fn zeros_until(&self, offset: u64) -> u64 {
        self.data.frozen_zeros_until(offset)
    }
}
