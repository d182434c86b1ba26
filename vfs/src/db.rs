//! A database as SQLite would open it from a set of files (the database, its `-wal`, its
//! `-journal`): the pages of the database file, overlaid with the WAL's frames up to its last
//! valid commit, or with a hot rollback journal's saved pages (SQLite rolls the journal back
//! on open), cut to the page count. What a generation records about each database
//! (docs/SEMANTICS.md) is read from it: page size, page count, journal mode, the WAL's
//! boundary, whether a hot journal is present, and a checksum of the logical content.
//!
//! The checksum is the XOR over pages of a CRC-64/NVME of (page number, big-endian u32;
//! page bytes): a changed page changes its own term only, so [`Tracked::update`] keeps it
//! from the pages a cut changed, holding one CRC per page (8 bytes a page: 2 MiB for a
//! 1 GiB database of 4 KiB pages). [`open`] computes everything from scratch; a drill
//! recomputes with it from restored files.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;

use crate::wal::{self, ReadAt, Scan};

/// One file's bytes and length.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub bytes: &'a dyn ReadAt,
    pub len: u64,
}

/// A database's files at one instant; a companion that does not exist is `None`.
#[derive(Clone, Copy)]
pub struct Files<'a> {
    pub db: Source<'a>,
    pub wal: Option<Source<'a>>,
    pub journal: Option<Source<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Wal,
    Rollback,
}

/// What a database is at its last commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub page_size: u32,
    /// `PRAGMA page_count` at that commit.
    pub page_count: u32,
    /// From the database header's read/write versions (2: WAL).
    pub mode: Mode,
    /// The WAL as SQLite recovers it, when the `-wal` has a valid header.
    pub wal: Option<Scan>,
    /// A rollback journal SQLite would play back on open: the state is the rolled-back one.
    pub hot_journal: bool,
    /// XOR over pages of CRC-64/NVME(page number, page).
    pub checksum: u64,
}

/// The checksum term of one page.
pub fn page_crc(pgno: u32, page: &[u8]) -> u64 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    d.update(&pgno.to_be_bytes());
    d.update(page);
    d.finalize()
}

const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];

/// Pages whose image comes from a companion file: page → offset of its image there.
type Overlay = HashMap<u32, u64>;

/// A hot journal as SQLite plays it back on open (sqlite.org/fileformat2.html, "The
/// Rollback Journal"; the pager's playback): headers at sector boundaries, each followed by
/// its records (page number, page, checksum); a record that fails its checksum ends the
/// playback; pages past the size saved in the first header are skipped, and the database is
/// cut to that size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rollback {
    initial_pages: u32,
    pages: Overlay,
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Whether SQLite would call this journal hot with no process holding a lock (as after a
/// crash, and as in every cut): it exists, is not empty, starts with a non-zero byte (a
/// persisted journal's header is zeroed at commit), and the database is not empty.
fn journal_is_hot(j: &Source, db_len: u64) -> io::Result<bool> {
    if j.len == 0 || db_len == 0 {
        return Ok(false);
    }
    let mut first = [0u8; 1];
    j.bytes.read_exact_at(&mut first, 0)?;
    Ok(first[0] != 0)
}

fn playback(j: &Source) -> io::Result<Option<Rollback>> {
    let mut hdr = [0u8; 28];
    if j.len < 28 {
        return Ok(None);
    }
    j.bytes.read_exact_at(&mut hdr, 0)?;
    if hdr[..8] != JOURNAL_MAGIC {
        return Ok(None);
    }
    let sector = be32(&hdr, 20) as u64;
    let page_size = be32(&hdr, 24);
    if !(512..=65536).contains(&page_size)
        || !page_size.is_power_of_two()
        || !(32..=65536).contains(&sector)
        || !sector.is_power_of_two()
        || sector > j.len
    {
        return Ok(None);
    }
    let initial_pages = be32(&hdr, 16);
    let lock_page = (0x4000_0000 / page_size) + 1;
    let rec_len = page_size as u64 + 8;
    let mut pages = Overlay::new();
    let mut data = vec![0u8; page_size as usize];
    let mut off = 0u64;
    let mut first = true;
    'segments: loop {
        if !first {
            off = off.div_ceil(sector) * sector;
            if off + sector > j.len {
                break;
            }
            j.bytes.read_exact_at(&mut hdr, off)?;
            if hdr[..8] != JOURNAL_MAGIC {
                break;
            }
        }
        first = false;
        let mut n_rec = be32(&hdr, 8) as u64;
        let nonce = be32(&hdr, 12);
        off += sector;
        if n_rec == 0xffff_ffff {
            n_rec = j.len.saturating_sub(off) / rec_len;
        }
        for _ in 0..n_rec {
            if off + rec_len > j.len {
                break 'segments;
            }
            let mut no = [0u8; 4];
            j.bytes.read_exact_at(&mut no, off)?;
            j.bytes.read_exact_at(&mut data, off + 4)?;
            let mut sum = [0u8; 4];
            j.bytes
                .read_exact_at(&mut sum, off + 4 + page_size as u64)?;
            let pgno = u32::from_be_bytes(no);
            let at = off + 4;
            off += rec_len;
            if pgno == 0 || pgno == lock_page {
                break 'segments;
            }
            if pgno > initial_pages {
                continue;
            }
            let mut c = nonce;
            let mut i = page_size as i64 - 200;
            while i > 0 {
                c = c.wrapping_add(data[i as usize] as u32);
                i -= 200;
            }
            if c != u32::from_be_bytes(sum) {
                break 'segments;
            }
            pages.insert(pgno, at);
        }
    }
    Ok(Some(Rollback {
        initial_pages,
        pages,
    }))
}

/// A WAL read to its last commit, with the latest frame of each page up to it.
#[derive(Debug, Clone)]
struct WalTrack {
    scan: Scan,
    pages: Overlay,
}

fn wal_pages(scan: &Scan, seen: &[(u64, u32)], into: &mut Overlay) {
    for &(n, pgno) in seen {
        if n <= scan.last_commit {
            into.insert(
                pgno,
                wal::frame_offset(scan.header.page_size, n) + wal::FRAME_HEADER_LEN,
            );
        }
    }
}

fn scan_wal(w: &Source) -> io::Result<Option<WalTrack>> {
    let Ok(Some(scan)) = wal::scan(w.bytes, w.len)? else {
        return Ok(None);
    };
    let mut seen = Vec::new();
    let start = Scan {
        last_commit: 0,
        db_pages: 0,
        commit_checksum: scan.header.checksum,
        ..scan
    };
    let scan = wal::resume(w.bytes, w.len, start, |n, p| seen.push((n, p)))?;
    let mut pages = Overlay::new();
    wal_pages(&scan, &seen, &mut pages);
    Ok(Some(WalTrack { scan, pages }))
}

/// A database's logical content, kept between cuts: one CRC per page.
#[derive(Debug, Clone)]
pub struct Tracked {
    state: State,
    db_len: u64,
    crcs: Vec<u64>,
    wal: Option<WalTrack>,
    journal: Option<Rollback>,
}

/// What changed in a file since the files a [`Tracked`] was computed from.
#[derive(Debug, Clone)]
pub enum Change {
    /// Not changed (the same bytes, or still absent).
    None,
    /// These byte ranges were written (a truncation shows in the length).
    Ranges(Vec<Range<u64>>),
}

/// The changes of a database's three files since its [`Tracked`].
#[derive(Debug, Clone)]
pub struct Changes {
    pub db: Change,
    pub wal: Change,
    pub journal: Change,
}

/// The page size the database header says (offset 16, big-endian; 1 means 65536).
fn header_page_size(h: &[u8]) -> Option<u32> {
    let v = u16::from_be_bytes([h[16], h[17]]) as u32;
    let ps = if v == 1 { 65536 } else { v };
    ((512..=65536).contains(&ps) && ps.is_power_of_two()).then_some(ps)
}

struct View<'a> {
    files: Files<'a>,
    page_size: u32,
    wal: Option<&'a WalTrack>,
    journal: Option<&'a Rollback>,
}

impl View<'_> {
    /// Logical page `pgno`: from the hot journal, else the WAL, else the database file
    /// (zeros past its end).
    fn page(&self, pgno: u32, buf: &mut [u8]) -> io::Result<()> {
        if let (Some(j), Some(src)) = (self.journal, self.files.journal) {
            if let Some(&off) = j.pages.get(&pgno) {
                return src.bytes.read_exact_at(buf, off);
            }
        }
        if let (Some(w), Some(src)) = (self.wal, self.files.wal) {
            if let Some(&off) = w.pages.get(&pgno) {
                return src.bytes.read_exact_at(buf, off);
            }
        }
        let off = (pgno as u64 - 1) * self.page_size as u64;
        let db = self.files.db;
        let have = db.len.saturating_sub(off).min(buf.len() as u64) as usize;
        if have > 0 {
            db.bytes.read_exact_at(&mut buf[..have], off)?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    /// The logical size in pages before the header's own count is consulted.
    fn raw_pages(&self) -> u32 {
        if let Some(j) = self.journal {
            return j.initial_pages;
        }
        if let Some(w) = self.wal.filter(|w| w.scan.last_commit > 0) {
            return w.scan.db_pages;
        }
        self.files.db.len.div_ceil(self.page_size as u64) as u32
    }
}

/// Journal mode and page count from logical page 1 (`None`: no SQLite header). The mode is
/// WAL when the header says so or a valid WAL is present (SQLite opens it either way).
/// The count is the header's (offset 28) when it is valid (non-zero, and the change counter
/// at 24 equals the version-valid-for number at 92), else the logical size: as SQLite's
/// b-tree layer reads it.
fn shape(page1: &[u8], raw_pages: u32, wal: bool) -> Option<(Mode, u32)> {
    if page1.len() < 100 || page1[..16] != crate::SQLITE_HEADER[..] {
        return None;
    }
    let mode = if page1[18] == 2 || page1[19] == 2 || wal {
        Mode::Wal
    } else {
        Mode::Rollback
    };
    let in_header = be32(page1, 28);
    let count = if in_header != 0 && page1[24..28] == page1[92..96] {
        in_header
    } else {
        raw_pages
    };
    Some((mode, count))
}

/// The page size to read with, from the database header; `None`: the database file has no
/// SQLite header (an empty database file is an empty database: SQLite deletes a WAL beside
/// it on open).
fn page_size_of(files: &Files) -> io::Result<Option<u32>> {
    if files.db.len < 100 {
        return Ok(None);
    }
    let mut h = [0u8; 100];
    files.db.bytes.read_exact_at(&mut h, 0)?;
    if h[..16] != crate::SQLITE_HEADER[..] {
        return Ok(None);
    }
    Ok(header_page_size(&h))
}

/// Reads the database these files make, from scratch. `None`: not a SQLite database (no
/// header on its logical first page).
pub fn open(files: Files) -> io::Result<Option<Tracked>> {
    let wal = match files.wal {
        Some(w) => scan_wal(&w)?,
        None => None,
    };
    let journal = match files.journal {
        Some(j) if journal_is_hot(&j, files.db.len)? => Some(playback(&j)?),
        _ => None,
    };
    let Some(page_size) = page_size_of(&files)? else {
        return Ok(None);
    };
    let hot = journal.is_some();
    let journal = journal.flatten();
    let mut t = Tracked {
        state: State {
            page_size,
            page_count: 0,
            mode: Mode::Rollback,
            wal: None,
            hot_journal: hot,
            checksum: 0,
        },
        db_len: files.db.len,
        crcs: Vec::new(),
        wal,
        journal,
    };
    let all: Vec<u32> = Vec::new();
    if !t.refresh(files, all, true)? {
        return Ok(None);
    }
    Ok(Some(t))
}

impl Tracked {
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Brings the tracked database to `files`, whose changes since the last call (or
    /// [`open`]) are `changes`, reading only the pages that changed. `false`: these files
    /// are no database any more (the caller drops it). A database whose page size changed
    /// (VACUUM after `PRAGMA page_size`) is read again whole.
    pub fn update(&mut self, files: Files, changes: &Changes) -> io::Result<bool> {
        let old_wal = self.wal.take();
        let old_journal = self.journal.take();
        let mut changed: Vec<u32> = Vec::new();
        let mut overlay_changed: HashSet<u32> = HashSet::new();
        // The WAL: appended frames are read from the last commit on; anything else (a new
        // log, a rewrite or a cut inside the frames already read) is read whole.
        self.wal = match (&changes.wal, files.wal, old_wal) {
            (_, None, old) => {
                overlay_changed.extend(old.iter().flat_map(|w| w.pages.keys()));
                None
            }
            (Change::None, Some(_), Some(old)) => Some(old),
            (change, Some(src), old) => {
                let appended = match (&old, change) {
                    (Some(old), Change::Ranges(r)) => {
                        let done =
                            wal::frame_offset(old.scan.header.page_size, old.scan.last_commit + 1);
                        let same_header = match wal::scan(src.bytes, src.len.min(32))? {
                            Ok(Some(s)) => s.header == old.scan.header,
                            _ => false,
                        };
                        same_header && src.len >= done && r.iter().all(|r| r.start >= done)
                    }
                    _ => false,
                };
                if appended {
                    let old = old.expect("appended to a tracked WAL");
                    let mut seen = Vec::new();
                    let scan = wal::resume(src.bytes, src.len, old.scan.clone(), |n, p| {
                        seen.push((n, p))
                    })?;
                    let mut pages = old.pages;
                    let mut fresh = Overlay::new();
                    wal_pages(&scan, &seen, &mut fresh);
                    overlay_changed.extend(fresh.keys());
                    pages.extend(fresh);
                    Some(WalTrack { scan, pages })
                } else {
                    overlay_changed.extend(old.iter().flat_map(|w| w.pages.keys()));
                    let new = scan_wal(&src)?;
                    overlay_changed.extend(new.iter().flat_map(|w| w.pages.keys()));
                    new
                }
            }
        };
        // The journal: read whole whenever it changed (it holds one transaction).
        let hot_now = match files.journal {
            Some(j) => journal_is_hot(&j, files.db.len)?,
            None => false,
        };
        self.journal = match (&changes.journal, files.journal) {
            (Change::None, Some(_)) if self.state.hot_journal == hot_now => old_journal,
            (_, Some(j)) if hot_now => {
                let new = playback(&j)?;
                overlay_changed.extend(old_journal.iter().flat_map(|r| r.pages.keys()));
                overlay_changed.extend(new.iter().flat_map(|r| r.pages.keys()));
                new
            }
            _ => {
                overlay_changed.extend(old_journal.iter().flat_map(|r| r.pages.keys()));
                None
            }
        };
        self.state.hot_journal = hot_now;
        let Some(page_size) = page_size_of(&files)? else {
            return Ok(false);
        };
        let whole = page_size != self.state.page_size;
        self.state.page_size = page_size;
        let ps = page_size as u64;
        if let Change::Ranges(r) = &changes.db {
            for r in r {
                let (a, b) = (r.start / ps + 1, r.end.div_ceil(ps));
                changed.extend((a..=b).filter_map(|p| u32::try_from(p).ok()));
            }
        }
        // Bytes past a shrunken end read as zeros now.
        if files.db.len < self.db_len {
            let (a, b) = (files.db.len / ps + 1, self.db_len.div_ceil(ps));
            changed.extend((a..=b).filter_map(|p| u32::try_from(p).ok()));
        }
        self.db_len = files.db.len;
        // A database page under an unchanged overlay is not what SQLite reads.
        let covered = |p: &u32| {
            !overlay_changed.contains(p)
                && (self
                    .journal
                    .as_ref()
                    .is_some_and(|j| j.pages.contains_key(p))
                    || self.wal.as_ref().is_some_and(|w| w.pages.contains_key(p)))
        };
        changed.retain(|p| !covered(p));
        changed.extend(overlay_changed);
        self.refresh(files, changed, whole)
    }

    /// Recomputes the pages in `changed` (every page if `whole`), the page count, the mode
    /// and the checksum.
    fn refresh(&mut self, files: Files, mut changed: Vec<u32>, whole: bool) -> io::Result<bool> {
        let view = View {
            files,
            page_size: self.state.page_size,
            wal: self.wal.as_ref(),
            journal: self.journal.as_ref(),
        };
        let mut buf = vec![0u8; self.state.page_size as usize];
        view.page(1, &mut buf)?;
        let Some((mode, count)) = shape(&buf, view.raw_pages(), view.wal.is_some()) else {
            return Ok(false);
        };
        if whole {
            self.crcs.clear();
            self.state.checksum = 0;
        }
        // Pages past the new count leave the sum; pages new to it enter it.
        while self.crcs.len() > count as usize {
            self.state.checksum ^= self.crcs.pop().expect("non-empty");
        }
        let old = self.crcs.len() as u32;
        changed.retain(|&p| p >= 1 && p <= old);
        changed.sort_unstable();
        changed.dedup();
        for p in changed {
            view.page(p, &mut buf)?;
            let c = page_crc(p, &buf);
            let slot = &mut self.crcs[p as usize - 1];
            self.state.checksum ^= *slot ^ c;
            *slot = c;
        }
        for p in old + 1..=count {
            view.page(p, &mut buf)?;
            let c = page_crc(p, &buf);
            self.state.checksum ^= c;
            self.crcs.push(c);
        }
        self.state.page_count = count;
        self.state.mode = mode;
        self.state.wal = self.wal.as_ref().map(|w| w.scan.clone());
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
