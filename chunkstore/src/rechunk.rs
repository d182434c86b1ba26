//! Re-chunking only what changed. A file written through the mount changes in place (writes
//! never shift bytes; only the end moves), and content-defined boundaries depend only on the
//! bytes just before them. So after writes to a few ranges, the new chunk list is the old one
//! except around those ranges: chunking restarts one chunk before each changed range and stops
//! at the first old boundary past it whose following `max` bytes are unchanged. The result is
//! exactly what chunking the whole new file would give, while reading only bytes near the
//! changes: a 4 KiB page written into a 10 GiB database costs a few chunks, not 10 GiB.

use std::ops::Range;
use std::os::unix::fs::FileExt;

/// Where re-chunking reads the new content from: a file, or the committer's frozen view of a
/// file that writers keep changing.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;

    /// Where a run of bytes known to be zero that starts at `offset` ends (a hole of a sparse
    /// file); `offset` itself when none is known. Re-chunking skips such runs without reading.
    fn zeros_until(&self, offset: u64) -> u64 {
        offset
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(buf.len())?))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

use crate::chunker::{cut_chunks, ChunkParams};
use crate::hash::Hash;
use crate::tree::{part_starts, Part};

/// Read window when re-chunking a region: several maximal chunks.
const WINDOW_CHUNKS: usize = 4;

/// The length of a chunk that starts in a run of at least `max` zero bytes: the cut depends
/// only on the bytes from the chunk's start, so every such chunk has this length.
fn zero_chunk_len(p: ChunkParams) -> usize {
    let zeros = vec![0u8; p.max as usize * 2];
    let mut len = 0;
    cut_chunks::<std::convert::Infallible>(&zeros, false, p, |data, _| {
        len = data.len();
        Ok(true)
    })
    .expect("infallible");
    len
}

/// Sorted, merged ranges of bytes that may differ from the old content, in file offsets.
fn normalize(mut dirty: Vec<Range<u64>>, old_size: u64, new_size: u64) -> Vec<Range<u64>> {
    if old_size != new_size {
        // The last chunk of the shorter version ends at a different place.
        let from = old_size.min(new_size).saturating_sub(1);
        dirty.push(from..new_size.max(old_size));
    }
    merge(dirty)
}

/// `dirty` without empty ranges, sorted and merged, so that their ends are sorted too (what
/// `touches` searches by).
pub(crate) fn merge(mut dirty: Vec<Range<u64>>) -> Vec<Range<u64>> {
    dirty.retain(|r| r.start < r.end);
    dirty.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(dirty.len());
    for r in dirty {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Whether any byte of the sorted, merged `dirty` ranges lies in `[a, b)`.
pub(crate) fn touches(dirty: &[Range<u64>], a: u64, b: u64) -> bool {
    let i = dirty.partition_point(|r| r.end <= a);
    i < dirty.len() && dirty[i].start < b
}

/// Re-chunks `file` (now `new_size` bytes) given its `old` chunk list and the byte ranges
/// written since. Calls `fresh` on each chunk that was produced anew (possibly identical to an
/// old one; the store deduplicates). Returns the new chunk list and the bytes read.
pub fn rechunk<E: From<std::io::Error>, R: ReadAt + ?Sized>(
    file: &R,
    new_size: u64,
    old: &[Part],
    dirty: Vec<Range<u64>>,
    p: ChunkParams,
    mut fresh: impl FnMut(&[u8], Hash) -> Result<(), E>,
) -> Result<(Vec<Part>, u64), E> {
    let (starts, old_size) = part_starts(old);
    let dirty = normalize(dirty, old_size, new_size);
    let max = p.max as u64;
    let mut out: Vec<Part> = Vec::with_capacity(old.len() + 4);
    let mut bytes_read = 0u64;
    let mut pos = 0u64; // new-file offset covered so far by `out`
    let mut buf: Vec<u8> = Vec::new();
    let mut d = 0usize; // next dirty range
    let mut zero_len: Option<usize> = None;
    let mut zero_sent = false;
    while pos < new_size {
        // Copy old chunks while the chunk and the bytes that decided its end are unchanged.
        if d >= dirty.len() || pos < dirty[d].start {
            let i = starts.partition_point(|s| *s < pos);
            if i < old.len() && starts[i] == pos {
                let end = pos + old[i].len();
                let stop = dirty.get(d).map(|r| r.start).unwrap_or(u64::MAX);
                // Keep the chunk before a change out too: its cut may read the next bytes.
                if end + max <= stop.min(new_size)
                    || (d >= dirty.len() && end <= new_size && end == old_size)
                {
                    out.push(old[i]);
                    pos = end;
                    continue;
                }
            }
        }
        // A hole: chunks that start at least `max` bytes before its end are all the same zero
        // chunk, produced without reading (a sparse file of 1 TiB costs its chunk list, not
        // reading 1 TiB).
        let zeros_end = file.zeros_until(pos).min(new_size);
        if zeros_end >= pos + max {
            let zlen = *zero_len.get_or_insert_with(|| zero_chunk_len(p)) as u64;
            let n = (zeros_end - max - pos) / zlen + 1;
            let hash = Hash::of_zeros(zlen as u32);
            if !zero_sent {
                fresh(&vec![0u8; zlen as usize], hash)?;
                zero_sent = true;
            }
            for _ in 0..n {
                out.push(Part::chunk(hash, zlen as u32));
            }
            pos += n * zlen;
            while d < dirty.len() && dirty[d].end <= pos {
                d += 1;
            }
            continue;
        }
        // Re-chunk from `pos` until re-synchronised with an old boundary past the changes.
        let window = (max as usize) * WINDOW_CHUNKS;
        let want = window.min((new_size - pos) as usize);
        buf.resize(want, 0);
        file.read_exact_at(&mut buf, pos)?;
        bytes_read += want as u64;
        let eof = pos + want as u64 == new_size;
        let at = cut_chunks(&buf, eof, p, |data, end| -> Result<bool, E> {
            let hash = Hash::of(data);
            fresh(data, hash)?;
            out.push(Part::chunk(hash, data.len() as u32));
            // Re-synchronised at an old boundary whose deciding bytes are unchanged?
            let b = pos + end as u64;
            while d < dirty.len() && dirty[d].end <= b {
                d += 1;
            }
            let old_boundary = b < old_size && starts.binary_search(&b).is_ok();
            Ok(old_boundary && !touches(&dirty, b, b + max) && b + max <= new_size)
        })?;
        assert!(at > 0, "a window of {want} bytes produced no chunk");
        pos += at as u64;
    }
    assert_eq!(
        out.iter().map(Part::len).sum::<u64>(),
        new_size,
        "re-chunked list must cover the file"
    );
    Ok((out, bytes_read))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::chunk_reader;
    use crate::testdata::noise;
    use proptest::prelude::*;

    fn full(data: &[u8]) -> Vec<Part> {
        let mut out = Vec::new();
        chunk_reader::<_, std::io::Error>(data, ChunkParams::default(), |c| {
            out.push(Part::chunk(Hash::of(c), c.len() as u32));
            Ok(())
        })
        .unwrap();
        out
    }

    fn check(old: &[u8], writes: &[(u64, Vec<u8>)], new_len: u64) -> u64 {
        let mut new = old.to_vec();
        new.resize(new_len as usize, 0);
        let mut dirty = Vec::new();
        for (off, data) in writes {
            let end = (*off as usize + data.len()).min(new.len());
            if (*off as usize) < end {
                new[*off as usize..end].copy_from_slice(&data[..end - *off as usize]);
                dirty.push(*off..end as u64);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &new).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let old_list = full(old);
        let whole = full(&new);
        let (got, read) = rechunk::<std::io::Error, _>(
            &f,
            new.len() as u64,
            &old_list,
            dirty.clone(),
            ChunkParams::default(),
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(
            got, whole,
            "re-chunked list differs from chunking the whole file"
        );
        // The same through a reader that knows where the zero runs are (a sparse file's
        // holes): skipping them must change nothing in the list.
        let mut fresh = 0usize;
        let (got, _) = rechunk::<std::io::Error, _>(
            &Mem(new.clone()),
            new.len() as u64,
            &old_list,
            dirty,
            ChunkParams::default(),
            |data, hash| {
                assert_eq!(Hash::of(data), hash);
                fresh += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, whole, "skipping zero runs changed the chunk list");
        read
    }

    /// A file in memory that reports its zero runs.
    struct Mem(Vec<u8>);

    impl ReadAt for Mem {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }

        fn zeros_until(&self, offset: u64) -> u64 {
            let rest = &self.0[(offset as usize).min(self.0.len())..];
            offset + rest.iter().position(|b| *b != 0).unwrap_or(rest.len()) as u64
        }
    }

    #[test]
    fn a_hole_is_chunked_without_reading_it() {
        let mut data = noise(1 << 20, 7);
        data.resize(200 << 20, 0);
        data.extend(noise(1 << 20, 8));
        let m = Mem(data.clone());
        let (got, read) = rechunk::<std::io::Error, _>(
            &m,
            data.len() as u64,
            &[],
            std::iter::once(0..data.len() as u64).collect(),
            ChunkParams::default(),
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(got, full(&data));
        assert!(
            read < 8 << 20,
            "read {read} bytes of a file that is 200 MiB of hole"
        );
    }

    #[test]
    fn a_page_written_into_a_large_file_reads_only_nearby_bytes() {
        let old = noise(64 << 20, 1);
        let read = check(&old, &[(40 << 20, vec![0xAB; 4096])], old.len() as u64);
        assert!(
            read <= 2 << 20,
            "read {read} bytes to re-chunk a 4 KiB write into 64 MiB"
        );
        // Writes close together: re-synchronising between them must check the bytes after.
        for gap in [1u64 << 10, 70 << 10, 200 << 10, 300 << 10, 600 << 10] {
            check(
                &old,
                &[(10 << 20, vec![1; 4096]), ((10 << 20) + gap, vec![2; 4096])],
                old.len() as u64,
            );
        }
        // A write starting exactly on a chunk boundary, and one ending on one.
        let b: u64 = full(&old).iter().take(100).map(Part::len).sum();
        check(&old, &[(b, vec![3; 5000])], old.len() as u64);
        check(&old, &[(b - 5000, vec![4; 5000])], old.len() as u64);
        // Appending and truncating.
        check(
            &old,
            &[((64 << 20) - 10, vec![7; 100_000])],
            (64 << 20) + 99_990,
        );
        check(&old, &[], 30 << 20);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn equals_chunking_the_whole_file(
            len in 0usize..(3 << 20),
            seed in any::<u64>(),
            writes in proptest::collection::vec((0u64..(3 << 20), 1usize..200_000, any::<u8>()), 0..6),
            new_len in proptest::option::of(0u64..(4 << 20)),
        ) {
            let old = noise(len, seed);
            let ws: Vec<(u64, Vec<u8>)> = writes.into_iter().map(|(o, l, b)| (o, vec![b; l])).collect();
            let new_len = new_len.unwrap_or(len as u64);
            check(&old, &ws, new_len);
        }
    }
}
