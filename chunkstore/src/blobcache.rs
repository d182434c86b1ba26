//! A node-local cache of verified blobs on disk, named by hash (filled by a pre-pull:
//! `prepull.rs`; `Repo::read_blob` consults it before the store). Content addressing makes
//! every cached blob valid for any later generation that still refers to it; each read is
//! verified again, so a damaged cache file is a miss, never data.
//!
//! It knows nothing of the store: the repository holds it, not the other way round.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hash::Hash;

pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    pub fn open(dir: &Path) -> Result<BlobCache> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(BlobCache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, h: &Hash) -> bool {
        self.path(h).exists()
    }

    /// The blob's bytes if cached and intact; a damaged file is removed and reads as a miss.
    pub fn get(&self, h: &Hash) -> Option<Vec<u8>> {
        let p = self.path(h);
        let raw = std::fs::read(&p).ok()?;
        if Hash::of(&raw) == *h {
            Some(raw)
        } else {
            let _ = std::fs::remove_file(&p);
            None
        }
    }

    /// Stores verified bytes (write to a temporary name, then rename: never a torn file).
    pub fn put(&self, h: &Hash, raw: &[u8]) -> Result<()> {
        let p = self.path(h);
        let parent = p.parent().expect("hash path has a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(raw).map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
    }
}
