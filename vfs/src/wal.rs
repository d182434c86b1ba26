//! SQLite's write-ahead log, read as SQLite's recovery reads it (sqlite.org/fileformat2.html,
//! "The Write-Ahead Log"): a 32-byte header, then frames of a 24-byte header and one page.
//! A frame is valid when its salts equal the header's and its checksum continues the chain
//! from the header through every earlier frame; the log ends at the first invalid frame, and
//! only a valid frame with a non-zero "database size" field is a commit. What SQLite recovers
//! on open is everything up to the last valid commit frame: [`scan`] finds it, so that a cut's
//! WAL can be recorded at its commit boundary (never counting a frame, an fsync or a write as
//! a commit).
//!
//! All header fields are big-endian. The checksum runs over 32-bit words, little-endian when
//! the magic ends in 0x82 and big-endian when it ends in 0x83: for each pair of words
//! `s0 += x0 + s1; s1 += x1 + s0` (wrapping), over the header's first 24 bytes, then for each
//! frame over its first 8 header bytes and its page.

use std::io;

pub const HEADER_LEN: u64 = 32;
pub const FRAME_HEADER_LEN: u64 = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const VERSION: u32 = 3_007_000;

/// Reads exactly `buf.len()` bytes at `offset` (a file, a frozen view of one, or memory).
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = self
            .get(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self[..].read_exact_at(buf, offset)
    }
}

/// The WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Checksum words are big-endian (magic 0x377f0683).
    pub big_endian: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: (u32, u32),
}

/// A WAL as SQLite would recover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub header: Header,
    /// Valid frames, from the first up to the first invalid one (commit or not).
    pub valid_frames: u64,
    /// The last valid commit frame, numbered from 1; 0: no transaction in this log.
    pub last_commit: u64,
    /// The database's size in pages at that commit.
    pub db_pages: u32,
    /// The cumulative checksum after that commit frame (the header's when there is none).
    pub commit_checksum: (u32, u32),
    /// Why the log ends after `valid_frames`.
    pub stop: Stop,
}

/// What ends a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The end of the file (a frame cut short by it included).
    End,
    /// A frame of the next log: salt-1 is this header's plus one, as SQLite writes it when it
    /// restarts the log from the beginning (its new header not yet in these bytes).
    NextLog,
    /// A frame that fails its checksum, carries foreign salts or names page 0.
    Invalid,
}

/// Why a file is no WAL SQLite would read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalError {
    #[error("shorter than a WAL header")]
    Short,
    #[error("not a WAL: magic {0:#010x}")]
    Magic(u32),
    #[error("WAL version {0}, expected 3007000")]
    Version(u32),
    #[error("WAL page size {0} is not a power of two from 512 to 65536")]
    PageSize(u32),
    #[error("the WAL header fails its checksum")]
    HeaderChecksum,
}

fn be(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Continues the checksum `s` over `data` (a multiple of 8 bytes).
pub fn checksum(big_endian: bool, data: &[u8], s: (u32, u32)) -> (u32, u32) {
    let (mut s0, mut s1) = s;
    for pair in data.chunks_exact(8) {
        let word = |w: &[u8]| {
            let w = [w[0], w[1], w[2], w[3]];
            if big_endian {
                u32::from_be_bytes(w)
            } else {
                u32::from_le_bytes(w)
            }
        };
        s0 = s0.wrapping_add(word(&pair[..4]).wrapping_add(s1));
        s1 = s1.wrapping_add(word(&pair[4..]).wrapping_add(s0));
    }
    (s0, s1)
}

/// Parses and checks the header (the first 32 bytes of `wal`).
pub fn header(h: &[u8; 32]) -> Result<Header, WalError> {
    let magic = be(h, 0);
    let big_endian = match magic {
        MAGIC_LE => false,
        MAGIC_BE => true,
        m => return Err(WalError::Magic(m)),
    };
    let version = be(h, 4);
    if version != VERSION {
        return Err(WalError::Version(version));
    }
    let page_size = be(h, 8);
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(WalError::PageSize(page_size));
    }
    let sum = (be(h, 24), be(h, 28));
    if checksum(big_endian, &h[..24], (0, 0)) != sum {
        return Err(WalError::HeaderChecksum);
    }
    Ok(Header {
        big_endian,
        page_size,
        checkpoint_seq: be(h, 12),
        salt1: be(h, 16),
        salt2: be(h, 20),
        checksum: sum,
    })
}

/// Reads the WAL of `len` bytes through `r` frame by frame, as SQLite's recovery does, and
/// says where its last transaction ends. `Ok(None)`: an empty file (no log yet). A frame cut
/// short by the end of the file ends the log like an invalid one.
pub fn scan<R: ReadAt + ?Sized>(r: &R, len: u64) -> io::Result<Result<Option<Scan>, WalError>> {
    if len == 0 {
        return Ok(Ok(None));
    }
    if len < HEADER_LEN {
        return Ok(Err(WalError::Short));
    }
    let mut h = [0u8; 32];
    r.read_exact_at(&mut h, 0)?;
    let header = match header(&h) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let start = Scan {
        header,
        valid_frames: 0,
        last_commit: 0,
        db_pages: 0,
        commit_checksum: header.checksum,
        stop: Stop::End,
    };
    resume(r, len, start, |_, _| {}).map(|s| Ok(Some(s)))
}

/// Byte offset of frame `n` (numbered from 1) in a log of `page_size` pages.
pub fn frame_offset(page_size: u32, n: u64) -> u64 {
    HEADER_LEN + (n - 1) * (FRAME_HEADER_LEN + page_size as u64)
}

/// Continues a scan after the commit frame `from.last_commit` (whose cumulative checksum is
/// `from.commit_checksum`; 0 and the header's checksum: from the start), calling `frame(n,
/// page)` for each valid frame after it. The frames up to that commit are taken as valid
/// without reading them: the caller knows they have not changed.
pub fn resume<R: ReadAt + ?Sized>(
    r: &R,
    len: u64,
    from: Scan,
    mut frame_seen: impl FnMut(u64, u32),
) -> io::Result<Scan> {
    let header = from.header;
    let frame_len = FRAME_HEADER_LEN + header.page_size as u64;
    let mut frame = vec![0u8; frame_len as usize];
    let mut sum = from.commit_checksum;
    let mut out = from;
    out.valid_frames = out.last_commit;
    out.stop = Stop::End;
    let mut off = frame_offset(header.page_size, out.valid_frames + 1);
    while off + frame_len <= len {
        r.read_exact_at(&mut frame, off)?;
        let (page_no, db_size) = (be(&frame, 0), be(&frame, 4));
        if page_no == 0 || be(&frame, 8) != header.salt1 || be(&frame, 12) != header.salt2 {
            out.stop = if be(&frame, 8) == header.salt1.wrapping_add(1) {
                Stop::NextLog
            } else {
                Stop::Invalid
            };
            break;
        }
        let s = checksum(header.big_endian, &frame[..8], sum);
        let s = checksum(header.big_endian, &frame[FRAME_HEADER_LEN as usize..], s);
        if s != (be(&frame, 16), be(&frame, 20)) {
            out.stop = Stop::Invalid;
            break;
        }
        sum = s;
        out.valid_frames += 1;
        frame_seen(out.valid_frames, page_no);
        if db_size != 0 {
            out.last_commit = out.valid_frames;
            out.db_pages = db_size;
            out.commit_checksum = s;
        }
        off += frame_len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAL-mode database with `txns` one-row transactions never checkpointed; returns its
    /// WAL's bytes and the database's page count.
    fn wal_of(dir: &std::path::Path, txns: usize) -> (Vec<u8>, u32) {
        let db = dir.join("t.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x);")
            .unwrap();
        for i in 0..txns {
            c.execute(
                "INSERT INTO t VALUES (?1)",
                [format!("row {i} {}", "x".repeat(i * 37))],
            )
            .unwrap();
        }
        let pages: u32 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        let wal = std::fs::read(dir.join("t.db-wal")).unwrap();
        drop(c);
        (wal, pages)
    }

    #[test]
    fn a_real_wal_ends_at_its_last_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, pages) = wal_of(dir.path(), 40);
        let s = scan(&wal[..], wal.len() as u64).unwrap().unwrap().unwrap();
        let frame_len = FRAME_HEADER_LEN + s.header.page_size as u64;
        assert_eq!(s.valid_frames, (wal.len() as u64 - HEADER_LEN) / frame_len);
        assert_eq!(
            s.last_commit, s.valid_frames,
            "SQLite ends each transaction with a commit"
        );
        assert_eq!(s.db_pages, pages);
    }

    #[test]
    fn a_damaged_or_cut_frame_ends_the_log_at_the_commit_before() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = wal_of(dir.path(), 40);
        let whole = scan(&wal[..], wal.len() as u64).unwrap().unwrap().unwrap();
        let frame_len = (FRAME_HEADER_LEN + whole.header.page_size as u64) as usize;
        // A flipped byte in the last frame's page: that frame and everything after it are
        // not in the log; the commit before it is.
        let mut bad = wal.clone();
        let last = 32 + (whole.valid_frames as usize - 1) * frame_len;
        bad[last + 24 + 100] ^= 1;
        let s = scan(&bad[..], bad.len() as u64).unwrap().unwrap().unwrap();
        assert_eq!(s.valid_frames, whole.valid_frames - 1);
        assert!(s.last_commit < whole.last_commit);
        // A log cut inside its last frame (a cut of a prefix of the writes).
        let cut = &wal[..wal.len() - 10];
        let s = scan(cut, cut.len() as u64).unwrap().unwrap().unwrap();
        assert_eq!(s.valid_frames, whole.valid_frames - 1);
        // Salts from another log generation end the log too.
        let mut other = wal.clone();
        other[32 + 8] ^= 0xff;
        let s = scan(&other[..], other.len() as u64)
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((s.valid_frames, s.last_commit, s.db_pages), (0, 0, 0));
    }

    #[test]
    fn what_is_no_wal_is_said() {
        assert_eq!(scan(&[][..], 0).unwrap(), Ok(None));
        assert_eq!(scan(&[0u8; 10][..], 10).unwrap(), Err(WalError::Short));
        assert_eq!(scan(&[0u8; 32][..], 32).unwrap(), Err(WalError::Magic(0)));
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = wal_of(dir.path(), 1);
        wal[20] ^= 1; // salt-2, covered by the header's checksum
        assert_eq!(
            scan(&wal[..], wal.len() as u64).unwrap(),
            Err(WalError::HeaderChecksum)
        );
    }

    /// The checksum as the file format describes it, on a known input: two words.
    #[test]
    fn the_checksum_follows_the_format() {
        let data = [1, 0, 0, 0, 2, 0, 0, 0];
        // s0 = 0 + 1 + 0 = 1; s1 = 0 + 2 + 1 = 3 (little-endian words).
        assert_eq!(checksum(false, &data, (0, 0)), (1, 3));
        // Big-endian: words 0x01000000 and 0x02000000.
        assert_eq!(checksum(true, &data, (0, 0)), (0x0100_0000, 0x0300_0000));
    }
}
