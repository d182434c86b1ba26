//! owfs as a library: the read-write daemon (`daemon`), the read-only time-travel mount
//! (`timetravel`), mounting and unmounting (`mount`), restore drills (`drill`) and the exit
//! statuses every command shares (`exit`) for its errors, the store's and the lease's
//! (`error`). The `owfs` binary only parses arguments, calls into this library and prints;
//! docs/ARCHITECTURE.md is the map.

pub mod daemon;
pub mod drill;
pub mod error;
pub mod exit;
pub mod fuse_util;
pub mod mount;
pub mod timetravel;
