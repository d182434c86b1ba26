//! Time travel: a read-only FUSE view of one generation, served straight from the store.
//! Nothing is restored first: trees are read as directories are visited, file content chunk by
//! chunk as it is read, every chunk verified against its hash. A generation never changes, so
//! the kernel may cache entries, attributes and pages for as long as it likes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chunkstore::generation::GenRecord;
use chunkstore::read::{FileMap, Reader};
use chunkstore::tree::{link_count, Entry, Kind};
use chunkstore::{Hash, Repo};

use crate::daemon::fuse::{AddDirent, AddDirentPlus, Opened, Operations, Statfs, Xattr};
use crate::fuse_util::{file_type, time};
use fuser::{Errno, FileAttr, FileType, FopenFlags, INodeNo};

/// Immutable content: let the kernel keep what it learns.
const TTL: Duration = Duration::from_secs(3600);
/// Decoded chunks kept in memory, by total size.
const CHUNK_CACHE_BYTES: u64 = 64 << 20;
const ROOT: u64 = 1;

struct Node {
    entry: Entry,
    /// A directory's path in the generation ("" for the root, else "a/b").
    dir_path: Option<String>,
    /// Children by name → inode, once the directory was listed.
    children: Option<Vec<(Vec<u8>, u64)>>,
    /// The file's chunk map, once the file was opened.
    chunks: Option<Arc<FileMap>>,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Hard-link group → inode, so every name of a file has one inode.
    links: HashMap<u64, u64>,
}

pub struct TimeTravel {
    /// Reads trees and files of the generation, with a cache of fetched chunks.
    reader: Reader,
    rec: GenRecord,
    state: Mutex<State>,
    /// The WAL-mode databases the generation records, by directory path: their names.
    wal_databases: HashMap<String, Vec<Vec<u8>>>,
}

/// The companions a WAL-mode database needs beside it to open from a read-only directory.
/// SQLite (3.22 on) opens such a database read-only when both exist: with an empty, read-only
/// `-shm` it builds its WAL index in its own memory, and an empty `-wal` is a log with no
/// transaction (docs/decisions/read-only-databases.md).
const WAL_COMPANIONS: [&[u8]; 2] = [b"-shm", b"-wal"];

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
        // The count the mount recorded in the group's key (as the read-write mount reads it);
        // a key from `owfs snapshot` records none: 2 tells tools the file has other names.
        nlink: match (e.link, link_count(e.link)) {
            (0, _) => 1,
            (_, 0) => 2,
            (_, n) => n,
        },
        uid: e.uid,
        gid: e.gid,
        rdev: e.rdev as u32,
        blksize: 65536,
        flags: 0,
    }
}

impl TimeTravel {
    pub fn new(repo: Arc<Repo>, rec: GenRecord) -> chunkstore::Result<TimeTravel> {
        let root = repo.root_of(&rec)?;
        // Fail at mount time, not on first access, if the root is unreadable.
        repo.read_tree(&root, "/")?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                entry: root_entry(&rec, root),
                dir_path: Some(String::new()),
                children: None,
                chunks: None,
            },
        );
        let mut wal_databases: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for (path, db) in &rec.sqlite {
            if db.journal_mode == "wal" {
                let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
                wal_databases
                    .entry(dir.to_string())
                    .or_default()
                    .push(name.as_bytes().to_vec());
            }
        }
        Ok(TimeTravel {
            reader: Reader::new(repo, CHUNK_CACHE_BYTES),
            rec,
            wal_databases,
            state: Mutex::new(State {
                nodes,
                next_ino: ROOT + 1,
                links: HashMap::new(),
            }),
        })
    }

    fn fail(&self, what: &str, e: chunkstore::Error) -> Errno {
        eprintln!("owfs: {}: {what}: {e}", self.rec.spec());
        Errno::EIO
    }

    /// Lists a directory node once, giving each child an inode. Later calls cost one lock.
    fn ensure_listed(&self, ino: u64) -> Result<(), Errno> {
        let (subtree, dir_path) = {
            let st = self.state.lock().expect("state");
            let node = st.nodes.get(&ino).ok_or(Errno::ENOENT)?;
            if node.children.is_some() {
                return Ok(());
            }
            (
                node.entry.subtree.ok_or(Errno::ENOTDIR)?,
                node.dir_path.clone().unwrap_or_default(),
            )
        };
        let tree = self
            .reader
            .repo()
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
            let child_dir = (e.kind == Kind::Dir).then(|| match dir_path.as_str() {
                "" => String::from_utf8_lossy(&name).into_owned(),
                d => format!("{d}/{}", String::from_utf8_lossy(&name)),
            });
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
                            dir_path: child_dir,
                            children: None,
                            chunks: None,
                        },
                    );
                    i
                }
            };
            list.push((name, child));
        }
        // Empty read-only companions for the WAL-mode databases here that lack them.
        for db in self.wal_databases.get(&dir_path).into_iter().flatten() {
            let Ok(k) = list.binary_search_by(|(n, _)| n.as_slice().cmp(db)) else {
                continue;
            };
            let Some(base) = st.nodes.get(&list[k].1).map(|n| n.entry.clone()) else {
                continue;
            };
            for suffix in WAL_COMPANIONS {
                let name = [db.as_slice(), suffix].concat();
                let Err(at) = list.binary_search_by(|(n, _)| n.as_slice().cmp(&name)) else {
                    continue;
                };
                let i = st.next_ino;
                st.next_ino += 1;
                let entry = Entry {
                    name: Vec::new(),
                    mode: 0o444,
                    size: 0,
                    link: 0,
                    ino: 0,
                    xattrs: Vec::new(),
                    content: Default::default(),
                    ..base.clone()
                };
                st.nodes.insert(
                    i,
                    Node {
                        entry,
                        dir_path: None,
                        children: None,
                        chunks: None,
                    },
                );
                list.insert(at, (name, i));
            }
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

    /// The chunk map of a file, read once per inode.
    fn chunks_of(&self, ino: u64) -> Result<Arc<FileMap>, Errno> {
        let entry = self.with_node(ino, |n| {
            n.chunks
                .clone()
                .ok_or_else(|| (n.entry.content.clone(), n.entry.size))
        })?;
        let (content, size) = match entry {
            Ok(map) => return Ok(map),
            Err(entry) => entry,
        };
        let map = Arc::new(
            self.reader
                .open(&content, size, &format!("inode {ino}"))
                .map_err(|e| self.fail("reading a chunk list", e))?,
        );
        let mut st = self.state.lock().expect("state");
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.chunks = Some(map.clone());
        }
        Ok(map)
    }

    /// Up to `size` bytes of an opened file at `offset` (fewer at its end), every chunk
    /// verified; a damaged or missing chunk is EIO.
    fn read_file(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let map = self
            .with_node(ino, |n| n.chunks.clone())?
            .ok_or(Errno::EBADF)?;
        let mut out = vec![0u8; map.size().saturating_sub(offset).min(size as u64) as usize];
        self.reader
            .read_at(&map, offset, &mut out, &format!("inode {ino}"))
            .map_err(|e| self.fail("reading file content", e))?;
        Ok(out)
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
        self.read_file(ino, offset, size)
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
        Xattr::answer(&value.ok_or(Errno::NO_XATTR)?, size)
    }

    fn listxattr(&self, ino: u64, size: u32) -> Result<Xattr, Errno> {
        self.with_node(ino, |n| {
            Xattr::names(n.entry.xattrs.iter().map(|(k, _)| k), size)
        })?
    }
}
