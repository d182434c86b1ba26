//! Local directories that hold workspace data (a `file://` store, a mount's cache) are the
//! owner's alone: 0700, whatever the umask, and tightened when found looser
//! (docs/decisions/local-files-private.md). The files in them are 0600 because the owfs
//! process runs with umask 077 (`owfs/src/main.rs`); a directory of 0700 keeps every other
//! user out of whatever it holds, including files an older owfs left 0644.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Creates `dir` (and missing parents) as 0700, or makes an existing one 0700 if other users
/// could enter or list it, saying so once on stderr. A directory this process may not
/// tighten (another user's) is refused: workspace data would be readable there.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let tightened = mode & !0o077;
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(tightened)) {
        Ok(()) => {
            eprintln!(
                "owfs: {} was readable by other users (mode {mode:o}); made it {tightened:o}: it holds workspace data",
                dir.display()
            );
            Ok(())
        }
        Err(e) => Err(Error::io(
            dir,
            std::io::Error::new(
                e.kind(),
                format!(
                    "mode {mode:o} lets other users read workspace data, and it cannot be made owner-only ({e}); choose a directory you own"
                ),
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_and_loose_directories_end_owner_only() {
        let t = tempfile::tempdir().unwrap();
        let fresh = t.path().join("a/b/c");
        private_dir(&fresh).unwrap();
        for d in [t.path().join("a"), t.path().join("a/b"), fresh] {
            assert_eq!(
                std::fs::metadata(&d).unwrap().mode() & 0o777,
                0o700,
                "{d:?}"
            );
        }
        let loose = t.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&loose).unwrap();
        assert_eq!(std::fs::metadata(&loose).unwrap().mode() & 0o777, 0o700);
    }
}
