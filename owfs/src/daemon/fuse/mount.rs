//! Mounting a FUSE file system the way fuser 0.18 did, without its session (whose handshake
//! would decode INIT): as root, mount(2) with a descriptor of /dev/fuse; where that is not
//! allowed, the setuid `fusermount3` (or `fusermount`) mounts and passes the descriptor back
//! over a socket. Every mount allows other users (`allow_other`): permissions are the
//! kernel's (`default_permissions`).

use std::ffi::CString;
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fuser::MountOption;
use rustix::mount::MountFlags;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags, SocketType,
};

/// A mount made by `mount`; unmounted when dropped, unless it is gone or another mount now
/// covers the mount point.
pub(super) struct Mount {
    mountpoint: PathBuf,
    /// The mount's device ("MAJ:MIN"), to recognise it in /proc/self/mountinfo.
    device: Option<String>,
}

/// Mounts a FUSE file system with `options` on `mountpoint`; returns the connection's
/// descriptor, on which the kernel is about to send INIT.
pub(super) fn mount(mountpoint: &Path, options: &[MountOption]) -> io::Result<(OwnedFd, Mount)> {
    let mountpoint = mountpoint.canonicalize()?;
    let dev = match mount_sys(&mountpoint, options)? {
        Some(dev) => dev,
        None => fusermount(&mountpoint, options)?,
    };
    let device = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| crate::fuse_util::mount_device(&info, &mountpoint));
    Ok((dev, Mount { mountpoint, device }))
}

impl Drop for Mount {
    fn drop(&mut self) {
        let Some(device) = &self.device else { return };
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if crate::fuse_util::mount_device(&info, &self.mountpoint).as_ref() != Some(device) {
            return;
        }
        match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => {}
            // Not root: the setuid helper may unmount what it mounted.
            Err(rustix::io::Errno::PERM) => {
                let _ = Command::new(fusermount_bin())
                    .args(["-u", "-q", "-z", "--"])
                    .arg(&self.mountpoint)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            Err(e) => eprintln!("owfs: cannot unmount {}: {e}", self.mountpoint.display()),
        }
    }
}

/// mount(2) itself; None where it is not allowed (not root).
fn mount_sys(mountpoint: &Path, options: &[MountOption]) -> io::Result<Option<OwnedFd>> {
    let root_mode = std::fs::metadata(mountpoint)?.permissions().mode();
    let dev: OwnedFd = match std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(f) => f.into(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                e.kind(),
                "/dev/fuse not found (is the fuse module loaded? try modprobe fuse)",
            ))
        }
        Err(e) => return Err(e),
    };
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        root_mode,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    // Dev and Suid are the absence of MS_NODEV and MS_NOSUID, which are the default.
    let mut flags = MountFlags::empty();
    if !options.contains(&MountOption::Dev) {
        flags |= MountFlags::NODEV;
    }
    if !options.contains(&MountOption::Suid) {
        flags |= MountFlags::NOSUID;
    }
    // The mount's source: its fsname, else its subtype.
    let source = options
        .iter()
        .find_map(|o| match o {
            MountOption::FSName(n) => Some(n.as_str()),
            _ => None,
        })
        .or_else(|| {
            options.iter().find_map(|o| match o {
                MountOption::Subtype(t) => Some(t.as_str()),
                _ => None,
            })
        })
        .unwrap_or("/dev/fuse");
    for o in options {
        match o {
            MountOption::DefaultPermissions => data.push_str(",default_permissions"),
            MountOption::CUSTOM(c) => {
                data.push(',');
                data.push_str(c);
            }
            MountOption::NoDev => flags |= MountFlags::NODEV,
            MountOption::NoSuid => flags |= MountFlags::NOSUID,
            MountOption::RO => flags |= MountFlags::RDONLY,
            MountOption::NoExec => flags |= MountFlags::NOEXEC,
            MountOption::NoAtime => flags |= MountFlags::NOATIME,
            MountOption::Sync => flags |= MountFlags::SYNCHRONOUS,
            MountOption::DirSync => flags |= MountFlags::DIRSYNC,
            _ => {}
        }
    }
    data.push_str(",allow_other");
    let data = CString::new(data).map_err(io::Error::other)?;
    match rustix::mount::mount(source, mountpoint, "fuse", flags, data.as_c_str()) {
        Ok(()) => Ok(Some(dev)),
        Err(rustix::io::Errno::PERM) => Ok(None),
        Err(e) => Err(io::Error::other(format!(
            "mount() of {} failed: {e}",
            mountpoint.display()
        ))),
    }
}

/// The option as `fusermount -o` takes it.
fn option_string(o: &MountOption) -> String {
    match o {
        MountOption::FSName(n) => format!("fsname={n}"),
        MountOption::Subtype(t) => format!("subtype={t}"),
        MountOption::CUSTOM(c) => c.clone(),
        MountOption::AutoUnmount => "auto_unmount".into(),
        MountOption::DefaultPermissions => "default_permissions".into(),
        MountOption::Dev => "dev".into(),
        MountOption::NoDev => "nodev".into(),
        MountOption::Suid => "suid".into(),
        MountOption::NoSuid => "nosuid".into(),
        MountOption::RO => "ro".into(),
        MountOption::RW => "rw".into(),
        MountOption::Exec => "exec".into(),
        MountOption::NoExec => "noexec".into(),
        MountOption::Atime => "atime".into(),
        MountOption::NoAtime => "noatime".into(),
        MountOption::DirSync => "dirsync".into(),
        MountOption::Sync => "sync".into(),
        MountOption::Async => "async".into(),
    }
}

/// `$FUSERMOUNT_PATH`, else the first of the usual helpers that runs.
fn fusermount_bin() -> String {
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        return p.to_string_lossy().into_owned();
    }
    [
        "fusermount3",
        "fusermount",
        "/sbin/fusermount3",
        "/sbin/fusermount",
        "/bin/fusermount3",
        "/bin/fusermount",
    ]
    .into_iter()
    .find(|b| Command::new(b).arg("-h").output().is_ok())
    .unwrap_or("fusermount3")
    .to_string()
}

/// Mounts through the setuid helper, which sends the descriptor back over a socket
/// (`_FUSE_COMMFD`).
fn fusermount(mountpoint: &Path, options: &[MountOption]) -> io::Result<OwnedFd> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let mut opts: Vec<String> = options.iter().map(option_string).collect();
    opts.push("allow_other".into());
    let mut cmd = Command::new(fusermount_bin());
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .arg("-o")
        .arg(opts.join(","))
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string());
    let theirs_fd = theirs.as_raw_fd();
    // SAFETY: between fork and exec, only fcntl (async-signal-safe) on a descriptor the
    // child inherited: the helper needs its end of the socket across exec.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    let received = receive_fd(&ours);
    drop(ours);
    let out = child.wait_with_output()?;
    received.map_err(|_| {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let kind = if msg.contains("only allowed if 'user_allow_other' is set") {
            io::ErrorKind::PermissionDenied
        } else {
            io::ErrorKind::Other
        };
        io::Error::new(kind, format!("fusermount: {msg}"))
    })
}

/// The descriptor the helper sends (SCM_RIGHTS), close-on-exec.
fn receive_fd(sock: &OwnedFd) -> io::Result<OwnedFd> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got = loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    if got.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "fusermount sent nothing",
        ));
    }
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = m {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "fusermount sent no descriptor",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusermount_options_are_spelled_as_the_helper_reads_them() {
        let opts = [
            MountOption::FSName("owfs:ws".into()),
            MountOption::Subtype("owfs".into()),
            MountOption::DefaultPermissions,
            MountOption::RW,
            MountOption::NoSuid,
            MountOption::Dev,
            MountOption::NoAtime,
        ];
        let s: Vec<_> = opts.iter().map(option_string).collect();
        assert_eq!(
            s.join(","),
            "fsname=owfs:ws,subtype=owfs,default_permissions,rw,nosuid,dev,noatime"
        );
    }
}
