//! Reading a generation without restoring it: path lookup, listing, streaming a file.

use std::io::Write;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::repo::Repo;
use crate::tree::{Entry, Kind, Tree};

/// Splits a workspace path (`/a/b`, `a/b`, `/`) into components; `.`, `..` and empty parts
/// are refused rather than interpreted.
pub fn components(path: &str) -> Result<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(Error::BadName {
            name: path.to_string(),
            reason: "paths inside a workspace are plain names from its root; no . or ..".into(),
        });
    }
    Ok(parts)
}

/// The tree of the directory at `path`, or the entry there if it is not a directory.
pub enum Found {
    Dir(Tree),
    Entry(Entry),
}

pub fn lookup(repo: &Arc<Repo>, root: Hash, path: &str, at: &str) -> Result<Found> {
    let mut tree = repo.read_tree(&root, "/")?;
    let parts = components(path)?;
    let mut walked = String::new();
    for (i, part) in parts.iter().enumerate() {
        walked.push('/');
        walked.push_str(part);
        let entry = tree
            .find(part.as_bytes())
            .cloned()
            .ok_or_else(|| Error::UnknownPath {
                at: at.to_string(),
                path: walked.clone(),
            })?;
        match (entry.kind, entry.subtree) {
            (Kind::Dir, Some(h)) => tree = repo.read_tree(&h, &walked)?,
            _ if i + 1 == parts.len() => return Ok(Found::Entry(entry)),
            _ => {
                return Err(Error::UnknownPath {
                    at: at.to_string(),
                    path: format!("{walked} (not a directory)"),
                })
            }
        }
    }
    Ok(Found::Dir(tree))
}

/// Streams a file's content to `out`, verifying every chunk.
pub fn write_file(repo: &Arc<Repo>, entry: &Entry, path: &str, out: &mut dyn Write) -> Result<u64> {
    let chunks = repo.chunk_list(&entry.content, path)?;
    let mut n = 0u64;
    for c in chunks {
        let data = repo
            .read_blob(&c.hash, &format!("content of {path:?}"))
            .map_err(|e| e.at_path(path))?;
        out.write_all(&data).map_err(|e| Error::io("<output>", e))?;
        n += data.len() as u64;
    }
    Ok(n)
}
