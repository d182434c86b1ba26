//! A file's part list as the store holds it: inline in its directory entry when short, else a
//! tree of nodes whose boundaries are chosen by hash, so that changing one page of a 1 GiB
//! database rewrites one small node per level (about 700 bytes each, five levels for 1 GiB of
//! 4 KiB pages), never a list that grows with the file (docs/decisions/sqlite-pages.md).

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::pack::BlobKind;
use crate::repo::Repo;
use crate::tree::{ChunkRef, Content, Node, NodeRef, Part, Segment};
use crate::writer::BlobWriter;

/// Lists of at most this many parts stay inline in the directory entry.
pub const INLINE_PARTS: usize = 64;
/// A node ends after an item whose hash's last byte is below this (1 in 16 on average)...
const BOUNDARY_BELOW: u8 = 16;
/// ...once it holds at least this many items...
const NODE_MIN: usize = 4;
/// ...and always at this many.
const NODE_MAX: usize = 256;
/// Deeper trees than this are damage (far beyond any file: 4^16 parts at the least).
const MAX_HEIGHT: usize = 16;

/// Stores `parts` as a file's content: inline when short, else as nodes added to `writer`
/// (unchanged nodes have unchanged hashes, and the writer skips blobs the store holds).
pub fn encode(writer: &mut BlobWriter, parts: Vec<Part>) -> Result<Content> {
    if parts.is_empty() {
        return Ok(Content::Empty);
    }
    if parts.len() <= INLINE_PARTS {
        return Ok(Content::Parts(parts));
    }
    // Inline parts (a WAL's frame headers) never end a node: their bytes repeat too often.
    let mut level = split(parts, |p| p.blob(), Node::Leaf, writer)?;
    for _ in 0..MAX_HEIGHT {
        if level.len() == 1 {
            return Ok(Content::Node(level[0]));
        }
        level = split(level, |n| Some(n.hash), Node::Inner, writer)?;
    }
    unreachable!("{MAX_HEIGHT} levels of nodes hold any file")
}

/// Cuts `items` into nodes by hash, stores each, and returns their references.
fn split<T: Copy>(
    items: Vec<T>,
    key: impl Fn(&T) -> Option<Hash>,
    node: impl Fn(Vec<T>) -> Node,
    writer: &mut BlobWriter,
) -> Result<Vec<NodeRef>>
where
    Node: Measure<T>,
{
    let mut out = Vec::new();
    let mut cur: Vec<T> = Vec::new();
    let n = items.len();
    for (i, item) in items.into_iter().enumerate() {
        let boundary =
            key(&item).is_some_and(|h| h.0[31] < BOUNDARY_BELOW) && cur.len() + 1 >= NODE_MIN;
        cur.push(item);
        if boundary || cur.len() >= NODE_MAX || i + 1 == n {
            let (bytes, parts) = Node::measure(&cur);
            let data = node(std::mem::take(&mut cur)).encode();
            let hash = Hash::of(&data);
            writer.add(hash, BlobKind::Segment, data)?;
            out.push(NodeRef { hash, bytes, parts });
        }
    }
    Ok(out)
}

/// File bytes and parts below a run of items.
trait Measure<T> {
    fn measure(items: &[T]) -> (u64, u64);
}

impl Measure<Part> for Node {
    fn measure(items: &[Part]) -> (u64, u64) {
        (items.iter().map(Part::len).sum(), items.len() as u64)
    }
}

impl Measure<NodeRef> for Node {
    fn measure(items: &[NodeRef]) -> (u64, u64) {
        (
            items.iter().map(|n| n.bytes).sum(),
            items.iter().map(|n| n.parts).sum(),
        )
    }
}

/// Reads one node and checks it against the reference that named it.
pub fn read_node(repo: &Repo, r: &NodeRef, path: &str) -> Result<Node> {
    let what = format!("part list of {path:?}");
    let node = Node::decode(&repo.read_blob(&r.hash, &what)?, &what)?;
    let (bytes, parts) = match &node {
        Node::Leaf(ps) => Node::measure(ps),
        Node::Inner(ns) => Node::measure(ns),
    };
    if (bytes, parts) != (r.bytes, r.parts) {
        return Err(Error::corrupt(format!(
            "{what}: node {} holds {parts} parts of {bytes} bytes, its parent says {} of {}",
            r.hash.short(),
            r.parts,
            r.bytes
        )));
    }
    Ok(node)
}

/// Calls `visit` on every node under `root`, parents before children, skipping the subtree
/// of a node for which `visit` returns false (already seen); `leaf` gets each leaf's parts.
pub fn walk(
    repo: &Repo,
    root: &NodeRef,
    path: &str,
    mut visit: impl FnMut(&NodeRef) -> bool,
    mut leaf: impl FnMut(&[Part]),
) -> Result<()> {
    let mut stack = vec![(*root, 0usize)];
    while let Some((r, depth)) = stack.pop() {
        if depth > MAX_HEIGHT {
            return Err(Error::corrupt(format!(
                "part list of {path:?}: deeper than {MAX_HEIGHT} levels"
            )));
        }
        if !visit(&r) {
            continue;
        }
        match read_node(repo, &r, path)? {
            Node::Leaf(ps) => leaf(&ps),
            Node::Inner(ns) => stack.extend(ns.into_iter().rev().map(|n| (n, depth + 1))),
        }
    }
    Ok(())
}

/// The full part list of a file's content, every node fetched and verified. `path` names the
/// file in messages.
pub fn list(repo: &Repo, content: &Content, path: &str) -> Result<Vec<Part>> {
    let chunk = |c: &ChunkRef| Part::Chunk(*c);
    match content {
        Content::Empty => Ok(Vec::new()),
        Content::Chunks(c) => Ok(c.iter().map(chunk).collect()),
        Content::Parts(ps) => Ok(ps.clone()),
        Content::Segments(segs) => {
            let mut out = Vec::new();
            for s in segs {
                let what = format!("chunk list of {path:?}");
                let seg = Segment::decode(&repo.read_blob(&s.hash, &what)?, &what)?;
                if seg.chunks.len() != s.chunks as usize {
                    return Err(Error::corrupt(format!(
                        "{what}: segment {} has a wrong length",
                        s.hash.short()
                    )));
                }
                out.extend(seg.chunks.iter().map(chunk));
            }
            Ok(out)
        }
        Content::Node(root) => {
            let mut out = Vec::with_capacity(root.parts.min(1 << 24) as usize);
            walk(repo, root, path, |_| true, |ps| out.extend_from_slice(ps))?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Inline;

    fn page(i: u32) -> Part {
        Part::chunk(Hash::of(&i.to_le_bytes()), 4096)
    }

    /// Parts as a WAL lays them out: a header, then a frame header and a page per frame.
    fn wal(frames: u32) -> Vec<Part> {
        let mut out = vec![Part::Inline(Inline::new(&[7; 32]).unwrap())];
        for i in 0..frames {
            out.push(Part::Inline(
                Inline::new(&i.to_be_bytes().repeat(6)).unwrap(),
            ));
            out.push(page(i));
        }
        out
    }

    fn nodes_written(repo: &std::sync::Arc<Repo>, parts: Vec<Part>) -> (Content, Vec<Hash>) {
        let mut w = BlobWriter::new(repo.clone()).unwrap();
        let content = encode(&mut w, parts).unwrap();
        let queued: Vec<Hash> = w.queued_hashes();
        w.finish().unwrap();
        (content, queued)
    }

    #[test]
    fn lists_round_trip_and_a_change_rewrites_one_node_per_level() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, repo) = crate::testdata::file_repo(dir.path());
        for n in [0u32, 1, 64, 65, 5_000, 300_000] {
            let parts: Vec<Part> = (0..n).map(page).collect();
            let (content, _) = nodes_written(&repo, parts.clone());
            assert_eq!(list(&repo, &content, "f").unwrap(), parts, "{n} parts");
            assert_eq!(content.size(), n as u64 * 4096);
        }
        // 300,000 pages (1.1 GiB): one changed page rewrites a few small nodes.
        let mut parts: Vec<Part> = (0..300_000).map(page).collect();
        let (before, _) = nodes_written(&repo, parts.clone());
        parts[123_456] = page(1_000_000);
        let (after, fresh) = nodes_written(&repo, parts.clone());
        assert_ne!(before, after);
        assert!(fresh.len() <= 6, "{} nodes rewritten", fresh.len());
        assert_eq!(list(&repo, &after, "f").unwrap(), parts);
        // Appending frames to a WAL rewrites the last node of each level only.
        let (_, _) = nodes_written(&repo, wal(2_000));
        let (grown, fresh) = nodes_written(&repo, wal(2_010));
        assert!(fresh.len() <= 4, "{} nodes rewritten", fresh.len());
        assert_eq!(list(&repo, &grown, "w").unwrap(), wal(2_010));
    }

    #[test]
    fn a_node_that_disagrees_with_its_parent_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, repo) = crate::testdata::file_repo(dir.path());
        let (content, _) = nodes_written(&repo, (0..5_000).map(page).collect());
        let Content::Node(mut root) = content else {
            panic!("a long list is a node")
        };
        root.bytes += 1;
        let err = list(&repo, &Content::Node(root), "f").unwrap_err();
        assert!(err.is_damage(), "{err}");
    }
}
