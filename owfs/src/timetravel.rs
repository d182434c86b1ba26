//! Time travel: a read-only FUSE view of one generation, served straight from the store.
//! Nothing is restored first: trees are read as directories are visited, file content chunk by
//! chunk as it is read, every chunk verified against its hash. A generation never changes, so
//! the kernel may cache entries, attributes and pages for as long as it likes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chunkstore::generation::GenRecord;
use chunkstore::tree::{chunk_starts, ChunkRef, Entry, Kind};
use chunkstore::{Hash, Repo};

use crate::daemon::fuse::{AddDirent, AddDirentPlus, Opened, Operations, Statfs, Xattr};
use crate::fuse_util::{file_type, time};
use fuser::{Errno, FileAttr, FileType, FopenFlags, INodeNo};

/// Immutable content: let the kernel keep what it learns.
const TTL: Duration = Duration::from_secs(3600);
/// Decoded chunks kept in memory, by total size.
const CHUNK_CACHE_BYTES: usize = 64 << 20;
const ROOT: u64 = 1;

struct Node {
    entry: Entry,
    /// Children by name → inode, once the directory was listed.
    children: Option<Vec<(Vec<u8>, u64)>>,
    /// Chunk list and start offsets, once the file was opened.
    chunks: Option<Arc<ChunkMap>>,
}

/// A file's chunks and the offset where each starts.
type ChunkMap = (Vec<ChunkRef>, Vec<u64>);

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Hard-link group → inode, so every name of a file has one inode.
    links: HashMap<u64, u64>,
    chunk_cache: HashMap<Hash, Arc<Vec<u8>>>,
    cache_order: std::collections::VecDeque<Hash>,
    cache_bytes: usize,
}

pub struct TimeTravel {
    repo: Arc<Repo>,
    rec: GenRecord,
    state: Mutex<State>,
}

fn root_entry(rec: &GenRecord, root: Hash) -> Entry {
    Entry {
        name: Vec::new(),
        kind: Kind::Dir,
        mode: 0o555,
        uid: 0,
        gid: 0,
        mtime_ns: rec.created_ms as i64 * 1_000_000,
        size: 0,
        link: 0,
        ino: 0,
        ctime_ns: 0,
        rdev: 0,
        xattrs: Vec::new(),
        target: Vec::new(),
        subtree: Some(root),
        content: Default::default(),
    }
}

fn attr(ino: u64, e: &Entry) -> FileAttr {
    let t = time(e.mtime_ns);
    FileAttr {
        ino: INodeNo(ino),
        size: e.size,
        blocks: e.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(e.kind),
        perm: (e.mode & 0o7777) as u16,
        // The group's size is not recorded; 2 tells tools the file has other names.
        nlink: if e.link != 0 { 2 } else { 1 },
        uid: e.uid,
        gid: e.gid,
        rdev: e.rdev as u32,
        blksize: 65536,
        flags: 0,
    }
}

impl TimeTravel {
    pub fn new(repo: Arc<Repo>, rec: GenRecord) -> chunkstore::Result<TimeTravel> {
        let root = rec.root_hash()?;
        // Fail at mount time, not on first access, if the root is unreadable.
        repo.read_tree(&root, "/")?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                entry: root_entry(&rec, root),
                children: None,
                chunks: None,
            },
        );
        Ok(TimeTravel {
            repo,
            rec,
            state: Mutex::new(State {
                nodes,
                next_ino: ROOT + 1,
                links: HashMap::new(),
                chunk_cache: HashMap::new(),
                cache_order: Default::default(),
                cache_bytes: 0,
            }),
        })
    }

    fn fail(&self, what: &str, e: chunkstore::Error) -> Errno {
        eprintln!("owfs: {}: {what}: {e}", self.rec.spec());
        Errno::EIO
    }

    /// Lists a directory node once, giving each child an inode. Later calls cost one lock.
    fn ensure_listed(&self, ino: u64) -> Result<(), Errno> {
        let subtree = {
            let st = self.state.lock().expect("state");
            let node = st.nodes.get(&ino).ok_or(Errno::ENOENT)?;
            if node.children.is_some() {
                return Ok(());
            }
            node.entry.subtree.ok_or(Errno::ENOTDIR)?
        };
        let tree = self
            .repo
            .read_tree(&subtree, &format!("inode {ino}"))
            .map_err(|e| self.fail("reading a directory", e))?;
        let mut st = self.state.lock().expect("state");
        if st.nodes.get(&ino).is_some_and(|n| n.children.is_some()) {
            return Ok(()); // another request listed it meanwhile
        }
        // Tree entries are sorted by name, so the list is too: lookups binary-search it.
        let mut list = Vec::with_capacity(tree.entries.len());
        for mut e in tree.entries {
            let name = std::mem::take(&mut e.name);
            let existing = (e.link != 0)
                .then(|| st.links.get(&e.link).copied())
                .flatten();
            let child = match existing {
                Some(i) => i,
                None => {
                    let i = st.next_ino;
                    st.next_ino += 1;
                    if e.link != 0 {
                        st.links.insert(e.link, i);
                    }
                    st.nodes.insert(
                        i,
                        Node {
                            entry: e,
                            children: None,
                            chunks: None,
                        },
                    );
                    i
                }
            };
            list.push((name, child));
        }
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.children = Some(list);
        }
        Ok(())
    }

    /// Runs `f` on a node under the lock (nothing is cloned on the request path).
    fn with_node<T>(&self, ino: u64, f: impl FnOnce(&Node) -> T) -> Result<T, Errno> {
        let st = self.state.lock().expect("state");
        st.nodes.get(&ino).map(f).ok_or(Errno::ENOENT)
    }

    /// The chunk list of a file and its chunk offsets, read once per inode.
    fn chunks_of(&self, ino: u64) -> Result<Arc<ChunkMap>, Errno> {
        let content = self.with_node(ino, |n| {
            n.chunks.clone().ok_or_else(|| n.entry.content.clone())
        })?;
        let content = match content {
            Ok(list) => return Ok(list),
            Err(content) => content,
        };
        let chunks = self
            .repo
            .chunk_list(&content, &format!("inode {ino}"))
            .map_err(|e| self.fail("reading a chunk list", e))?;
        let (starts, _) = chunk_starts(&chunks);
        let list = Arc::new((chunks, starts));
        let mut st = self.state.lock().expect("state");
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.chunks = Some(list.clone());
        }
        Ok(list)
    }

    fn chunk(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, Errno> {
        if let Some(d) = self.state.lock().expect("state").chunk_cache.get(&c.hash) {
            return Ok(d.clone());
        }
        let data = Arc::new(
            self.repo
                .read_blob(&c.hash, "file content")
                .map_err(|e| self.fail("reading file content", e))?,
        );
        let mut st = self.state.lock().expect("state");
        st.cache_bytes += data.len();
        st.chunk_cache.insert(c.hash, data.clone());
        st.cache_order.push_back(c.hash);
        while st.cache_bytes > CHUNK_CACHE_BYTES {
            let Some(old) = st.cache_order.pop_front() else {
                break;
            };
            if let Some(d) = st.chunk_cache.remove(&old) {
                st.cache_bytes -= d.len();
            }
        }
        Ok(data)
    }
}

/// The read-only mount's answers; the FUSE transport (`daemon::fuse`) decodes the requests,
/// and its defaults answer the rest (the kernel refuses changes to a read-only mount itself).
impl Operations for TimeTravel {
    const TTL: Duration = TTL;

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
        self.ensure_listed(parent)?;
        let st = self.state.lock().expect("state");
        let list = st
            .nodes
            .get(&parent)
            .and_then(|n| n.children.as_ref())
            .ok_or(Errno::ENOENT)?;
        let k = list
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .map_err(|_| Errno::ENOENT)?;
        let child = list[k].1;
        st.nodes
            .get(&child)
            .map(|n| attr(child, &n.entry))
            .ok_or(Errno::ENOENT)
    }

    fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        self.with_node(ino, |n| attr(ino, &n.entry))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        self.with_node(ino, |n| {
            (n.entry.kind == Kind::Symlink).then(|| n.entry.target.clone())
        })?
        .ok_or(Errno::EINVAL)
    }

    fn open(&self, ino: u64) -> Result<Opened, Errno> {
        self.chunks_of(ino)?;
        Ok(Opened {
            fh: 0,
            flags: FopenFlags::FOPEN_KEEP_CACHE,
        })
    }

    fn read(&self, ino: u64, _fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let (list, file_size) = match self.with_node(ino, |n| (n.chunks.clone(), n.entry.size))? {
            (Some(list), size) => (list, size),
            (None, _) => return Err(Errno::EBADF),
        };
        let (chunks, starts) = (&list.0, &list.1);
        let end = (offset + size as u64).min(file_size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut i = starts.partition_point(|s| *s <= offset).saturating_sub(1);
        let mut pos = offset;
        while pos < end && i < chunks.len() {
            let data = self.chunk(&chunks[i])?;
            let from = (pos - starts[i]) as usize;
            let to = ((end - starts[i]) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
            pos = starts[i] + to as u64;
            i += 1;
        }
        Ok(out)
    }

    fn readdir(&self, ino: u64, _fh: u64, offset: u64, add: &mut AddDirent) -> Result<(), Errno> {
        self.ensure_listed(ino)?;
        let st = self.state.lock().expect("state");
        let list = st
            .nodes
            .get(&ino)
            .and_then(|n| n.children.as_deref())
            .unwrap_or_default();
        for (i, (name, child)) in list.iter().enumerate().skip(offset as usize) {
            let kind = st
                .nodes
                .get(child)
                .map(|n| file_type(n.entry.kind))
                .unwrap_or(FileType::RegularFile);
            if add(*child, (i + 1) as u64, kind, name) {
                break;
            }
        }
        Ok(())
    }

    fn readdirplus(
        &self,
        ino: u64,
        _fh: u64,
        offset: u64,
        add: &mut AddDirentPlus,
    ) -> Result<(), Errno> {
        self.ensure_listed(ino)?;
        let st = self.state.lock().expect("state");
        let list = st
            .nodes
            .get(&ino)
            .and_then(|n| n.children.as_deref())
            .unwrap_or_default();
        for (i, (name, child)) in list.iter().enumerate().skip(offset as usize) {
            let Some(n) = st.nodes.get(child) else {
                continue;
            };
            if add((i + 1) as u64, name, &attr(*child, &n.entry)) {
                break;
            }
        }
        Ok(())
    }

    fn statfs(&self, _ino: u64) -> Result<Statfs, Errno> {
        Ok(Statfs {
            blocks: self.rec.bytes.div_ceil(4096),
            bfree: 0,
            bavail: 0,
            files: self.rec.files + self.rec.dirs,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }

    fn getxattr(&self, ino: u64, name: &[u8], size: u32) -> Result<Xattr, Errno> {
        let value = self.with_node(ino, |n| {
            n.entry
                .xattrs
                .iter()
                .find(|(k, _)| k.as_slice() == name)
                .map(|(_, v)| v.clone())
        })?;
        xattr_answer(size, &value.ok_or(Errno::NO_XATTR)?)
    }

    fn listxattr(&self, ino: u64, size: u32) -> Result<Xattr, Errno> {
        let names = self.with_node(ino, |n| {
            let mut names = Vec::new();
            for (k, _) in &n.entry.xattrs {
                names.extend_from_slice(k);
                names.push(0);
            }
            names
        })?;
        xattr_answer(size, &names)
    }
}

/// The xattr reply protocol: size 0 asks for the length; a short buffer is ERANGE.
fn xattr_answer(size: u32, bytes: &[u8]) -> Result<Xattr, Errno> {
    if size == 0 {
        Ok(Xattr::Size(bytes.len() as u32))
    } else if bytes.len() > size as usize {
        Err(Errno::ERANGE)
    } else {
        Ok(Xattr::Data(bytes.to_vec()))
    }
}
