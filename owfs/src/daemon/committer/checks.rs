//! Per-file checks between the cut and the upload: the one place where the committer looks at
//! a file's frozen bytes before they become part of a generation. A check sees each frozen
//! file (its cache path, its size at the cut, and its bytes as the cut froze them) and may
//! fail the commit, which then publishes nothing and leaves every file changed for the next
//! cut. The databases' state is read per cut, not per file (`sqlite.rs`: it needs a
//! database with its companions and produces record data, and never fails a commit for what
//! it finds); this list is empty outside the tests and a commit pays one uncontended read
//! lock per frozen file for it.

use chunkstore::rechunk::ReadAt;

/// One frozen file as a check sees it. (No check reads it outside the tests yet.)
#[cfg_attr(not(test), allow(dead_code))]
pub struct Frozen<'a> {
    /// Where its bytes live in the cache directory (for messages).
    pub path: &'a std::path::Path,
    /// Its size at the cut.
    pub size: u64,
    /// Its bytes at the cut.
    pub bytes: &'a dyn ReadAt,
}

/// A check of frozen files. `Err` fails the commit with that message.
pub trait FileCheck: Send + Sync {
    fn check(&self, file: &Frozen<'_>) -> Result<(), String>;
}

/// The checks a commit runs, in order.
#[derive(Default)]
pub struct Checks(Vec<Box<dyn FileCheck>>);

impl Checks {
    /// Runs every check on `file`; the first failure fails the commit.
    pub fn run(&self, file: &Frozen<'_>) -> Result<(), String> {
        self.0.iter().try_for_each(|c| c.check(file))
    }

    #[cfg(test)]
    pub fn push(&mut self, c: Box<dyn FileCheck>) {
        self.0.push(c);
    }
}
