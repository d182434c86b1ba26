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

/// The device ("MAJ:MIN") of the mount last made on `mountpoint` (canonical), from the text of
/// /proc/self/mountinfo. Its mount-point field escapes space, tab, newline and backslash.
pub fn mount_device(mountinfo: &str, mountpoint: &std::path::Path) -> Option<String> {
    let want = mountpoint.to_str()?;
    let escaped = want
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let dev = f.nth(2)?;
            (f.nth(1)? == escaped).then(|| dev.to_string())
        })
        .next_back()
}

/// Sets the kernel's readahead for the FUSE mount just made on `mountpoint` (canonical):
/// `/sys/class/bdi/MAJ:MIN/read_ahead_kb`. The FUSE INIT reply can only lower the 128 KiB
/// default; see docs/decisions/readahead.md. Reads nothing through the mount (it is not
/// served yet).
pub fn set_read_ahead(mountpoint: &std::path::Path, kb: u64) -> std::io::Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let dev = mount_device(&info, mountpoint).ok_or_else(|| {
        std::io::Error::other(format!(
            "{} is not in /proc/self/mountinfo",
            mountpoint.display()
        ))
    })?;
    std::fs::write(
        format!("/sys/class/bdi/{dev}/read_ahead_kb"),
        format!("{kb}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_of_the_last_mount_on_a_path() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:41 / /work/m rw,nosuid,nodev shared:20 - fuse.owfs owfs rw,user_id=0
41 22 0:42 / /work/a\\040b rw shared:21 - fuse.owfs owfs rw
42 40 0:43 / /work/m rw shared:22 - fuse.owfs owfs rw
";
        let dev = |p: &str| mount_device(info, std::path::Path::new(p));
        assert_eq!(dev("/work/m").as_deref(), Some("0:43"));
        assert_eq!(dev("/work/a b").as_deref(), Some("0:42"));
        assert_eq!(dev("/"), Some("8:1".into()));
        assert_eq!(dev("/work"), None);
    }
}
