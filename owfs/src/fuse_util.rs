//! What both FUSE file systems (the time-travel view and the read-write mount) need to say
//! about nodes in the kernel's terms.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chunkstore::tree::Kind;
use fuser::FileType;

pub fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

/// Nanoseconds since the epoch (negative: before it) as a `SystemTime`.
pub fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}
