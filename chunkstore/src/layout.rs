//! How a file is cut into parts, chosen from its first bytes (docs/decisions/sqlite-pages.md):
//!
//! - a SQLite database (`SQLite format 3\0`, page size at offset 16) is cut at its page
//!   boundaries, one page a chunk, so a changed page changes exactly the chunk that holds it;
//! - a SQLite write-ahead log (magic 0x377f0682 or 0x377f0683) keeps its 32-byte header and
//!   each frame's 24-byte header inline and each frame's page as a chunk: the same chunk as
//!   that page in the database, so a checkpoint, which copies WAL pages into the database,
//!   uploads no page again;
//! - anything else is content-defined (`rechunk`), except that a file only appended to keeps
//!   its old chunks and chunks the new bytes after them, so a commit of a growing log costs
//!   what was appended (plus at most a short tail chunk), not its last chunk again.
//!
//! Boundaries of the first two follow from the file's geometry, so a part is reused exactly
//! when its place and length are unchanged and no write touched it.

use std::ops::Range;

use crate::chunker::ChunkParams;
use crate::hash::Hash;
use crate::rechunk::{merge, rechunk, touches, ReadAt};
use crate::tree::{part_starts, Inline, Part};

const DB_MAGIC: &[u8; 16] = b"SQLite format 3\0";
const WAL_MAGIC_LE: u32 = 0x377f_0682;
const WAL_MAGIC_BE: u32 = 0x377f_0683;
const WAL_VERSION: u32 = 3_007_000;
const WAL_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 24;
/// An appended file re-chunks its old last chunk with the new bytes only when that chunk is
/// shorter than this; longer ones are kept as they are.
const APPEND_TAIL_MIN: u64 = 4096;
/// A write that starts at most this far before the old end of a growing file is checked for
/// being an append that rewrote the old bytes unchanged (`unchanged_before`).
const APPEND_VERIFY_MAX: u64 = 64 << 10;
/// Bytes read at once when laying out pages.
const READ_RUN: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Content-defined chunks.
    Content,
    /// A SQLite database: one page a chunk.
    Database { page_size: u32 },
    /// A SQLite WAL: headers inline, one page a chunk.
    Wal { page_size: u32 },
}

/// A SQLite page size field: a power of two from 512 to 65536 (65536 is written as 1).
fn page_size(raw: u32) -> Option<u32> {
    let ps = if raw == 1 { 65536 } else { raw };
    (ps.is_power_of_two() && (512..=65536).contains(&ps)).then_some(ps)
}

/// The layout of a file from its first 32 bytes (fewer when the file is shorter).
pub fn detect(head: &[u8]) -> Layout {
    let be32 = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    if head.len() >= 18 && head[..16] == DB_MAGIC[..] {
        if let Some(page_size) = page_size(u16::from_be_bytes([head[16], head[17]]) as u32) {
            return Layout::Database { page_size };
        }
    }
    if head.len() >= WAL_HEADER as usize
        && matches!(be32(0), WAL_MAGIC_LE | WAL_MAGIC_BE)
        && be32(4) == WAL_VERSION
    {
        if let Some(page_size) = page_size(be32(8)) {
            return Layout::Wal { page_size };
        }
    }
    Layout::Content
}

/// Reads the first bytes of `file` and tells its layout.
pub fn detect_file<R: ReadAt + ?Sized>(file: &R, size: u64) -> std::io::Result<Layout> {
    let mut head = vec![0u8; size.min(WAL_HEADER) as usize];
    file.read_exact_at(&mut head, 0)?;
    Ok(detect(&head))
}

/// Whether an old part list was cut by geometry (pages or frames) rather than by content:
/// it holds inline parts, or all its parts but the last are one page size long.
fn looks_paged(old: &[Part]) -> bool {
    if old.iter().any(|p| matches!(p, Part::Inline(_))) {
        return true;
    }
    let Some((_, body)) = old.split_last() else {
        return false;
    };
    let Some(first) = body.first() else {
        return false;
    };
    let len = first.len();
    len <= 65536 && page_size(len as u32).is_some() && body.iter().all(|p| p.len() == len)
}

/// The places of a geometric layout's parts: (start, length, inline).
fn places(layout: Layout, size: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    match layout {
        Layout::Content => unreachable!("content-defined chunks have no fixed places"),
        Layout::Database { page_size } => {
            let ps = page_size as u64;
            let mut at = 0;
            while at < size {
                out.push((at, ps.min(size - at), false));
                at += ps;
            }
        }
        Layout::Wal { page_size } => {
            let ps = page_size as u64;
            out.push((0, WAL_HEADER.min(size), true));
            let mut at = WAL_HEADER;
            while at < size {
                let h = FRAME_HEADER.min(size - at);
                out.push((at, h, true));
                at += h;
                if at < size {
                    let p = ps.min(size - at);
                    out.push((at, p, false));
                    at += p;
                }
            }
        }
    }
    out
}

/// The part list of `file` (now `new_size` bytes, of `layout`) given its `old` parts and the
/// byte ranges written since. Calls `fresh` on each chunk produced anew (the store
/// deduplicates). Returns the parts and the bytes read.
pub fn relayout<E: From<std::io::Error>, R: ReadAt + ?Sized>(
    layout: Layout,
    file: &R,
    new_size: u64,
    old: &[Part],
    dirty: Vec<Range<u64>>,
    p: ChunkParams,
    mut fresh: impl FnMut(&[u8], Hash) -> Result<(), E>,
) -> Result<(Vec<Part>, u64), E> {
    if layout == Layout::Content {
        return content(file, new_size, old, dirty, p, fresh);
    }
    let dirty = merge(dirty);
    let (starts, _) = part_starts(old);
    let places = places(layout, new_size);
    let mut out: Vec<Option<Part>> = Vec::with_capacity(places.len());
    let mut todo: Vec<usize> = Vec::new();
    for (i, &(start, len, inline)) in places.iter().enumerate() {
        let kept = starts
            .binary_search(&start)
            .ok()
            .map(|j| old[j])
            .filter(|o| {
                o.len() == len
                    && matches!(o, Part::Inline(_)) == inline
                    && !touches(&dirty, start, start + len)
            });
        if kept.is_none() {
            todo.push(i);
        }
        out.push(kept);
    }
    // Read what changed in runs of adjacent places.
    let mut read = 0u64;
    let mut buf = Vec::new();
    let mut k = 0;
    while k < todo.len() {
        let first = places[todo[k]].0;
        let mut end = k + 1;
        while end < todo.len()
            && todo[end] == todo[end - 1] + 1
            && places[todo[end]].0 + places[todo[end]].1 - first <= READ_RUN
        {
            end += 1;
        }
        let (last_start, last_len, _) = places[todo[end - 1]];
        buf.resize((last_start + last_len - first) as usize, 0);
        file.read_exact_at(&mut buf, first)?;
        read += buf.len() as u64;
        for &i in &todo[k..end] {
            let (start, len, inline) = places[i];
            let data = &buf[(start - first) as usize..(start - first + len) as usize];
            out[i] = Some(if inline {
                Part::Inline(Inline::new(data).expect("headers fit inline"))
            } else {
                let hash = Hash::of(data);
                fresh(data, hash)?;
                Part::chunk(hash, len as u32)
            });
        }
        k = end;
    }
    Ok((
        out.into_iter()
            .map(|p| p.expect("every place has a part"))
            .collect(),
        read,
    ))
}

/// Content-defined parts; an append keeps the old chunks (see the module's comment).
fn content<E: From<std::io::Error>, R: ReadAt + ?Sized>(
    file: &R,
    new_size: u64,
    old: &[Part],
    dirty: Vec<Range<u64>>,
    p: ChunkParams,
    mut fresh: impl FnMut(&[u8], Hash) -> Result<(), E>,
) -> Result<(Vec<Part>, u64), E> {
    // A file that stopped being a database or a log goes back to content-defined chunks.
    let old = if looks_paged(old) { &[][..] } else { old };
    let (starts, old_size) = part_starts(old);
    let mut read = 0u64;
    let appended = !old.is_empty()
        && new_size > old_size
        && unchanged_before(file, old, &starts, old_size, &dirty, &mut read)?;
    if !appended {
        return rechunk(file, new_size, old, dirty, p, fresh);
    }
    let last = old.len() - 1;
    let keep = if old[last].len() < APPEND_TAIL_MIN {
        last
    } else {
        old.len()
    };
    let from = starts.get(keep).copied().unwrap_or(old_size);
    let tail = Shifted { file, by: from };
    let (fresh_parts, tail_read) = rechunk(&tail, new_size - from, &[], Vec::new(), p, &mut fresh)?;
    let mut out = old[..keep].to_vec();
    out.extend(fresh_parts);
    Ok((out, read + tail_read))
}

/// Whether every byte before `old_size` is as the old parts hold it, though writes since
/// may have started before it: the kernel writes back whole pages, so an append to a file
/// whose end is not page-aligned rewrites the start of its last page with the same bytes.
/// The old parts from the first written byte on (at most `APPEND_VERIFY_MAX` of them) are
/// read and hashed again; any other case is not an append.
fn unchanged_before<R: ReadAt + ?Sized>(
    file: &R,
    old: &[Part],
    starts: &[u64],
    old_size: u64,
    dirty: &[Range<u64>],
    read: &mut u64,
) -> std::io::Result<bool> {
    let Some(first) = dirty
        .iter()
        .filter(|r| r.start < r.end)
        .map(|r| r.start)
        .min()
    else {
        return Ok(true);
    };
    if first >= old_size {
        return Ok(true);
    }
    if old_size - first > APPEND_VERIFY_MAX {
        return Ok(false);
    }
    let from = starts.partition_point(|s| *s <= first) - 1;
    let mut buf = Vec::new();
    for (part, &start) in old[from..].iter().zip(&starts[from..]) {
        buf.resize(part.len() as usize, 0);
        file.read_exact_at(&mut buf, start)?;
        *read += buf.len() as u64;
        let same = match part {
            Part::Chunk(c) => Hash::of(&buf) == c.hash,
            Part::Inline(i) => i.bytes() == buf.as_slice(),
        };
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A file seen from an offset on.
struct Shifted<'a, R: ?Sized> {
    file: &'a R,
    by: u64,
}

impl<R: ReadAt + ?Sized> ReadAt for Shifted<'_, R> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset + self.by)
    }

    fn zeros_until(&self, offset: u64) -> u64 {
        self.file.zeros_until(offset + self.by) - self.by
    }
}

#[cfg(test)]
// A list of written ranges that holds one range is what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::testdata::noise;

    fn db(pages: usize, ps: u32) -> Vec<u8> {
        let mut d = noise(pages * ps as usize, 1);
        d[..16].copy_from_slice(DB_MAGIC);
        let raw = if ps == 65536 { 1 } else { ps as u16 };
        d[16..18].copy_from_slice(&raw.to_be_bytes());
        d
    }

    fn wal(frames: usize, ps: u32) -> Vec<u8> {
        let mut d = noise(32 + frames * (24 + ps as usize), 2);
        d[..4].copy_from_slice(&WAL_MAGIC_LE.to_be_bytes());
        d[4..8].copy_from_slice(&WAL_VERSION.to_be_bytes());
        d[8..12].copy_from_slice(&ps.to_be_bytes());
        d
    }

    type Out = (Vec<Part>, u64, Vec<Hash>);

    fn lay(data: &[u8], old: &[Part], dirty: &[Range<u64>]) -> Out {
        let layout = detect(&data[..data.len().min(32)]);
        let mut fresh = Vec::new();
        let (parts, read) = relayout::<std::io::Error, _>(
            layout,
            data,
            data.len() as u64,
            old,
            dirty.to_vec(),
            ChunkParams::default(),
            |_, h| {
                fresh.push(h);
                Ok(())
            },
        )
        .unwrap();
        (parts, read, fresh)
    }

    /// The bytes a part list stands for, with chunks looked up in `data` by offset.
    fn check_covers(parts: &[Part], data: &[u8]) {
        let mut at = 0usize;
        for p in parts {
            let bytes = &data[at..at + p.len() as usize];
            match p {
                Part::Inline(i) => assert_eq!(i.bytes(), bytes),
                Part::Chunk(c) => assert_eq!(c.hash, Hash::of(bytes)),
            }
            at += p.len() as usize;
        }
        assert_eq!(at, data.len());
    }

    #[test]
    fn headers_tell_the_layout() {
        assert_eq!(
            detect(&db(1, 4096)[..32]),
            Layout::Database { page_size: 4096 }
        );
        assert_eq!(
            detect(&db(1, 65536)[..32]),
            Layout::Database { page_size: 65536 }
        );
        assert_eq!(detect(&wal(1, 1024)[..32]), Layout::Wal { page_size: 1024 });
        let mut bad = db(1, 4096);
        bad[16..18].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(detect(&bad[..32]), Layout::Content);
        assert_eq!(detect(b"SQLite format 3"), Layout::Content);
        assert_eq!(detect(&noise(32, 3)), Layout::Content);
    }

    #[test]
    fn a_database_is_cut_at_pages_and_a_write_changes_its_page_only() {
        let mut d = db(300, 4096);
        let (parts, _, fresh) = lay(&d, &[], &[]);
        assert_eq!(parts.len(), 300);
        assert!(parts.iter().all(|p| p.len() == 4096));
        assert_eq!(fresh.len(), 300);
        check_covers(&parts, &d);
        // One byte of page 77 and the whole of page 200.
        d[77 * 4096 + 100] ^= 1;
        d[200 * 4096..201 * 4096].copy_from_slice(&noise(4096, 9));
        let dirty = vec![77 * 4096 + 100..77 * 4096 + 101, 200 * 4096..201 * 4096];
        let (new, read, fresh) = lay(&d, &parts, &dirty);
        assert_eq!(fresh.len(), 2);
        assert_eq!(read, 2 * 4096);
        check_covers(&new, &d);
        let changed: Vec<usize> = (0..300).filter(|&i| new[i] != parts[i]).collect();
        assert_eq!(changed, [77, 200]);
        // Overlapping written ranges, the first containing the second.
        d[10 * 4096] ^= 1;
        let (over, _, fresh) = lay(&d, &new, &[9 * 4096..12 * 4096, 9 * 4096 + 1..9 * 4096 + 2]);
        assert_eq!(fresh.len(), 3);
        check_covers(&over, &d);
        let new = over;
        // Growth by two pages reads only them.
        d.extend(noise(8192, 10));
        let (grown, read, _) = lay(&d, &new, &[300 * 4096..302 * 4096]);
        assert_eq!((grown.len(), read), (302, 8192));
        check_covers(&grown, &d);
    }

    #[test]
    fn wal_pages_are_the_databases_chunks_and_headers_cost_no_chunk() {
        let d = db(10, 4096);
        let mut w = wal(0, 4096);
        // Frames carrying pages 3 and 7 of the database.
        for pg in [3usize, 7] {
            w.extend(noise(24, pg as u64));
            w.extend_from_slice(&d[pg * 4096..(pg + 1) * 4096]);
        }
        let (db_parts, _, _) = lay(&d, &[], &[]);
        let (wal_parts, _, fresh) = lay(&w, &[], &[]);
        check_covers(&wal_parts, &w);
        assert_eq!(fresh.len(), 2, "one chunk a page, headers inline");
        assert_eq!(wal_parts[2], db_parts[3]);
        assert_eq!(wal_parts[4], db_parts[7]);
        // An appended frame reads the new frame only; a torn frame is laid out as it is.
        let old_len = w.len() as u64;
        w.extend(noise(24 + 4096 + 30, 5));
        let (grown, read, fresh) = lay(&w, &wal_parts, &[old_len..w.len() as u64]);
        assert_eq!(read, 24 + 4096 + 30);
        assert_eq!(fresh.len(), 2);
        assert_eq!(grown[..5], wal_parts[..]);
        check_covers(&grown, &w);
    }

    #[test]
    fn an_append_costs_the_new_bytes_and_a_former_database_goes_back_to_content() {
        let mut log = noise(1 << 20, 4);
        let (parts, _, _) = lay(&log, &[], &[]);
        let old_len = log.len() as u64;
        log.extend(noise(300, 5));
        let (grown, read, fresh) = lay(&log, &parts, &[old_len..log.len() as u64]);
        assert_eq!(read, 300);
        assert_eq!(fresh.len(), 1);
        assert_eq!(grown[..parts.len()], parts[..]);
        check_covers(&grown, &log);
        // Written back from the start of its last page, as the kernel does: the same.
        let old_len = log.len() as u64;
        log.extend(noise(300, 8));
        let from = old_len / 4096 * 4096;
        let (paged, read, fresh) = lay(&log, &grown, &[from..log.len() as u64]);
        assert_eq!(fresh.len(), 1);
        assert_eq!(paged[..grown.len() - 1], grown[..grown.len() - 1]);
        assert!(read <= (256 << 10) + 600, "{read}");
        check_covers(&paged, &log);
        // A change of the bytes before the old end is no append.
        let mut changed = log.clone();
        changed.extend(noise(300, 9));
        changed[from as usize] ^= 1;
        let (whole, _, _) = lay(&changed, &paged, &[from..changed.len() as u64]);
        check_covers(&whole, &changed);
        let grown = paged;
        // The short tail: the next append re-chunks it with the new bytes.
        let old_len = log.len() as u64;
        log.extend(noise(500, 6));
        let (again, read, _) = lay(&log, &grown, &[old_len..log.len() as u64]);
        assert_eq!(read, 600 + 500);
        assert_eq!(again.len(), grown.len());
        check_covers(&again, &log);
        // A database overwritten by other bytes: content-defined chunks, as a fresh file has.
        let d = db(64, 4096);
        let (paged, _, _) = lay(&d, &[], &[]);
        let other = noise(d.len(), 7);
        let (now, _, _) = lay(&other, &paged, &[0..other.len() as u64]);
        assert_eq!(now, lay(&other, &[], &[]).0);
        assert!(now.len() < 20);
    }
}
