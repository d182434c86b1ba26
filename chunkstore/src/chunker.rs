//! Content-defined chunking (FastCDC 2020). Boundaries depend only on nearby bytes, so an edit
//! changes the chunks around it and the boundaries resynchronise after it.

use std::io::Read;

use fastcdc::v2020::FastCDC;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    /// 16/64/256 KiB: small enough that a page written into a large database re-uploads
    /// about 64 KiB, large enough that 1 GiB is ~16,000 chunks.
    fn default() -> Self {
        ChunkParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        }
    }
}

/// Read buffer: several maximal chunks, so reads are large.
const BUF_CHUNKS: usize = 16;

/// A chunker with its read buffer, reused from file to file (allocating and zeroing a
/// multi-MiB buffer per file dominated the cost of committing many small files).
pub struct Chunker {
    p: ChunkParams,
    buf: Vec<u8>,
}

impl Chunker {
    pub fn params(&self) -> ChunkParams {
        self.p
    }

    pub fn new(p: ChunkParams) -> Chunker {
        Chunker { p, buf: Vec::new() }
    }

    /// Splits everything `r` yields into chunks, calling `f` on each in order. Returns the
    /// total length read.
    pub fn chunk<R: Read, E: From<std::io::Error>>(
        &mut self,
        mut r: R,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let p = self.p;
        let max = p.max as usize;
        if self.buf.len() != max * BUF_CHUNKS {
            self.buf = vec![0u8; max * BUF_CHUNKS];
        }
        let buf = &mut self.buf;
        let mut len = 0usize;
        let mut total = 0u64;
        let mut eof = false;
        loop {
            while !eof && len < buf.len() {
                match r.read(&mut buf[len..]) {
                    Ok(0) => eof = true,
                    Ok(n) => len += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let pos = cut_chunks(&buf[..len], eof, p, |c, _| f(c).map(|()| false))?;
            total += pos as u64;
            if eof && pos >= len {
                return Ok(total);
            }
            buf.copy_within(pos..len, 0);
            len -= pos;
        }
    }
}

/// Cuts `buf` into chunks from its start, calling `f(chunk, end)` on each; `f` returns
/// whether to stop there. Unless `eof`, stops while less than a maximal chunk is left (those
/// bytes are not decided yet). Returns how many bytes were consumed. Shared by whole-file
/// chunking and by re-chunking around changes, so both cut exactly alike.
pub fn cut_chunks<E>(
    buf: &[u8],
    eof: bool,
    p: ChunkParams,
    mut f: impl FnMut(&[u8], usize) -> Result<bool, E>,
) -> Result<usize, E> {
    let (len, max) = (buf.len(), p.max as usize);
    let cdc = FastCDC::new(buf, p.min as usize, p.avg as usize, max);
    let mut pos = 0usize;
    while pos < len && (eof || len - pos >= max) {
        let (_, end) = cdc.cut(pos, len - pos);
        assert!(end > pos && end <= len, "chunker made no progress");
        let stop = f(&buf[pos..end], end)?;
        pos = end;
        if stop {
            break;
        }
    }
    Ok(pos)
}

/// One-off form of [`Chunker::chunk`].
pub fn chunk_reader<R: Read, E: From<std::io::Error>>(
    r: R,
    p: ChunkParams,
    f: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    Chunker::new(p).chunk(r, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        chunk_reader::<_, std::io::Error>(data, ChunkParams::default(), |c| {
            out.push(c.to_vec());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn chunks_cover_input_and_respect_bounds() {
        let data = crate::testdata::noise(5 << 20, 7);
        let cs = chunks(&data);
        assert_eq!(cs.concat(), data);
        let p = ChunkParams::default();
        for c in &cs[..cs.len() - 1] {
            assert!(c.len() >= p.min as usize && c.len() <= p.max as usize);
        }
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn an_edit_changes_only_nearby_chunks() {
        let data = crate::testdata::noise(8 << 20, 9);
        let mut edited = data.clone();
        edited[4 << 20..(4 << 20) + 4096].fill(0xAB);
        let a = chunks(&data);
        let b = chunks(&edited);
        let set: std::collections::HashSet<_> = a.iter().collect();
        let changed = b.iter().filter(|c| !set.contains(c)).count();
        assert!(changed <= 3, "a 4 KiB edit changed {changed} chunks");
    }
}
