//! Manifest nodes: one tree per directory, content-addressed, so an unchanged subtree is the
//! same object in every generation and every fork that holds it.

use serde::{Deserialize, Serialize};

use crate::codec::{self, ObjKind};
use crate::error::{Error, Result};
use crate::hash::Hash;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
}

/// One chunk of a file: its hash and raw length. Offsets are the running sum of lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: Hash,
    pub len: u32,
}

/// A run of a large file's chunk list stored as its own object, so that changing a few pages
/// of a huge file rewrites a few segments, not the whole list. Segment boundaries are chosen
/// by chunk hash (content-defined), so they resynchronise after an insertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub hash: Hash,
    pub bytes: u64,
    pub chunks: u32,
}

/// Start offset of each part of a part list, and the total length.
pub fn part_starts(parts: &[Part]) -> (Vec<u64>, u64) {
    let mut starts = Vec::with_capacity(parts.len());
    let mut off = 0u64;
    for p in parts {
        starts.push(off);
        off += p.len();
    }
    (starts, off)
}

/// The most bytes a part may hold inline (`Part::Inline`).
pub const INLINE_MAX: usize = 32;

/// A few bytes of a file kept in its part list itself: no blob, no index entry, no request.
/// A WAL's 32-byte header and each frame's 24-byte header are stored this way, so that the
/// page between two frame headers is a chunk of its own, the same chunk as that page in the
/// database (docs/decisions/sqlite-pages.md).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Inline {
    len: u8,
    bytes: [u8; INLINE_MAX],
}

impl Inline {
    /// `None` when `data` is longer than `INLINE_MAX`.
    pub fn new(data: &[u8]) -> Option<Inline> {
        (data.len() <= INLINE_MAX).then(|| {
            let mut bytes = [0u8; INLINE_MAX];
            bytes[..data.len()].copy_from_slice(data);
            Inline {
                len: data.len() as u8,
                bytes,
            }
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inline({} bytes)", self.len)
    }
}

impl Serialize for Inline {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(self.bytes())
    }
}

impl<'de> Deserialize<'de> for Inline {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Inline, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Inline;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "at most {INLINE_MAX} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Inline, E> {
                Inline::new(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// One piece of a file, in order: a chunk stored as a blob, or a few bytes inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    Chunk(ChunkRef),
    Inline(Inline),
}

impl Part {
    pub fn chunk(hash: Hash, len: u32) -> Part {
        Part::Chunk(ChunkRef { hash, len })
    }

    /// The number of file bytes it holds.
    pub fn len(&self) -> u64 {
        match self {
            Part::Chunk(c) => c.len as u64,
            Part::Inline(i) => i.len as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The blob it names, if it is not inline.
    pub fn blob(&self) -> Option<Hash> {
        match self {
            Part::Chunk(c) => Some(c.hash),
            Part::Inline(_) => None,
        }
    }
}

/// A node of a large file's part list, as its parent names it: the node's hash, and the file
/// bytes and parts below it (checked when the node is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    pub hash: Hash,
    pub bytes: u64,
    pub parts: u64,
}

/// A stored node of a part list: a run of parts, or of nodes one level down. Boundaries are
/// chosen by hash (content-defined), so a change of one page rewrites one node per level,
/// whatever the size of the file (docs/decisions/sqlite-pages.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    Leaf(Vec<Part>),
    Inner(Vec<NodeRef>),
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(ObjKind::Node, self)
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<Node> {
        codec::decode(ObjKind::Node, bytes, what)
    }
}

/// A file's content as its directory entry holds it. `Chunks` and `Segments` are what owfs
/// wrote before part lists (format version 1); they are read, never written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Content {
    #[default]
    Empty,
    Chunks(Vec<ChunkRef>),
    Segments(Vec<SegmentRef>),
    /// A short part list, inline in the entry.
    Parts(Vec<Part>),
    /// A long one, as the root of a tree of nodes.
    Node(NodeRef),
}

impl Content {
    /// The file bytes it holds (as its own metadata says; readers check it against the parts).
    pub fn size(&self) -> u64 {
        match self {
            Content::Empty => 0,
            Content::Chunks(cs) => cs.iter().map(|c| c.len as u64).sum(),
            Content::Segments(ss) => ss.iter().map(|s| s.bytes).sum(),
            Content::Parts(ps) => ps.iter().map(Part::len).sum(),
            Content::Node(n) => n.bytes,
        }
    }

    /// The blobs this entry names directly (chunks of an inline list, segments, the root
    /// node); what a commit that keeps the content relies on.
    pub fn direct_blobs(&self) -> Vec<Hash> {
        match self {
            Content::Empty => Vec::new(),
            Content::Chunks(cs) => cs.iter().map(|c| c.hash).collect(),
            Content::Segments(ss) => ss.iter().map(|s| s.hash).collect(),
            Content::Parts(ps) => ps.iter().filter_map(Part::blob).collect(),
            Content::Node(n) => vec![n.hash],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Raw bytes of the name: any byte but `/` and NUL, as Linux allows.
    pub name: Vec<u8>,
    pub kind: Kind,
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// Hard-link group inside one generation (0: not hard-linked).
    pub link: u64,
    /// Change-detection hints from the source (inode, ctime): never restored.
    pub ino: u64,
    pub ctime_ns: i64,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Directory: its tree.
    pub subtree: Option<Hash>,
    pub content: Content,
}

impl Entry {
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// A hard-link group key (`Entry::link`) written by the mount also carries the group's size
/// in its high bits: a reader then knows a file's link count without loading every directory
/// that names it. Keys from `owfs snapshot` (plain inode numbers) carry none.
const LINK_COUNT_SHIFT: u32 = 40;

/// The hard-link group key of a file with inode `ino` and `nlink` names.
pub fn link_key(ino: u64, nlink: u32) -> u64 {
    (ino & ((1 << LINK_COUNT_SHIFT) - 1)) | ((nlink as u64) << LINK_COUNT_SHIFT)
}

/// The number of names a hard-link group key records; 0 when it records none.
pub fn link_count(key: u64) -> u32 {
    (key >> LINK_COUNT_SHIFT) as u32
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Tree {
    /// Sorted by name, names unique.
    pub entries: Vec<Entry>,
}

/// A chunk list stored as a segment object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Segment {
    pub chunks: Vec<ChunkRef>,
}

/// Checks a name read from a manifest before anything is created from it: never `.`/`..`,
/// never a `/` or NUL, never empty. This is what keeps a restore inside its target.
pub fn check_name(name: &[u8], dir: &str) -> Result<()> {
    let bad = |why: &str| Error::Unsafe {
        what: format!(
            "directory {dir:?} has an entry {:?}: {why}; refusing to write outside the target",
            String::from_utf8_lossy(name)
        ),
    };
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name == b"." || name == b".." {
        return Err(bad("names . or .."));
    }
    if name.contains(&b'/') {
        return Err(bad("contains '/' (a path, maybe absolute)"));
    }
    if name.contains(&0) {
        return Err(bad("contains NUL"));
    }
    Ok(())
}

impl Tree {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(ObjKind::Tree, self)
    }

    /// `encode`, refusing a tree no reader would accept (over `pack::MAX_META_BLOB`): a
    /// directory too large to store is an error of the commit that names it, never a
    /// generation that cannot be read back.
    pub fn encode_checked(&self, dir: &str) -> Result<Vec<u8>> {
        let bytes = self.encode();
        if bytes.len() > crate::pack::MAX_META_BLOB {
            return Err(Error::io(
                dir,
                std::io::Error::other(format!(
                    "this directory's {} entries take {} bytes as one tree, more than the {} \
                     a tree may hold: spread them over several directories",
                    self.entries.len(),
                    bytes.len(),
                    crate::pack::MAX_META_BLOB
                )),
            ));
        }
        Ok(bytes)
    }

    /// Decodes and validates a tree: safe names, sorted and unique, consistent kinds.
    pub fn decode(bytes: &[u8], dir: &str) -> Result<Tree> {
        let tree: Tree = codec::decode(ObjKind::Tree, bytes, &format!("tree of {dir:?}"))?;
        for (i, e) in tree.entries.iter().enumerate() {
            check_name(&e.name, dir)?;
            if i > 0 && tree.entries[i - 1].name >= e.name {
                return Err(Error::Unsafe {
                    what: format!(
                        "directory {dir:?}: entries unsorted or duplicated at {:?}",
                        e.name_lossy()
                    ),
                });
            }
            if (e.kind == Kind::Dir) != e.subtree.is_some() {
                return Err(Error::corrupt(format!(
                    "directory {dir:?}: entry {:?} is inconsistent",
                    e.name_lossy()
                )));
            }
        }
        Ok(tree)
    }

    pub fn find(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

impl Segment {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(ObjKind::Segment, self)
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<Segment> {
        codec::decode(ObjKind::Segment, bytes, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &[u8]) -> Entry {
        Entry {
            name: name.to_vec(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: 0,
            link: 0,
            ino: 0,
            ctime_ns: 0,
            rdev: 0,
            xattrs: vec![],
            target: vec![],
            subtree: None,
            content: Content::Empty,
        }
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [&b".."[..], b".", b"/etc", b"a/b", b"a\0b", b""] {
            let t = Tree {
                entries: vec![entry(bad)],
            };
            let err = Tree::decode(&t.encode(), "x").unwrap_err();
            assert!(matches!(err, Error::Unsafe { .. }), "{bad:?}: {err}");
        }
        let t = Tree {
            entries: vec![entry(b"a"), entry(b"a")],
        };
        assert!(matches!(
            Tree::decode(&t.encode(), "x"),
            Err(Error::Unsafe { .. })
        ));
        let t = Tree {
            entries: vec![entry(b"a"), entry(b"\xff\xfe odd")],
        };
        assert_eq!(Tree::decode(&t.encode(), "x").unwrap(), t);
    }
}
