//! `mount -t owfs` and `/etc/fstab`: the owfs binary run as `mount.owfs` (a symlink in /sbin)
//! takes mount(8)'s helper arguments and turns them into an `owfs mount` command line.
//!
//! mount(8) calls `/sbin/mount.owfs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`. The
//! options that `owfs mount` takes as flags travel in `-o` here, because fstab has no other
//! place for them: `store=URL`, `cache_dir=DIR`, `wait[=DURATION]`, `takeover`. Because a mount
//! started at boot (a systemd mount unit) has no login environment, the helper first reads
//! `KEY=VALUE` lines (OWFS_STORE, AWS_*) from `/etc/owfs/env`, or from `-o env_file=PATH`;
//! variables already set win. See docs/decisions/mount-helper.md.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The names mount(8) may run us under.
pub const NAMES: [&str; 2] = ["mount.owfs", "mount.fuse.owfs"];

/// Read when no `env_file=` is given, if it exists.
pub const DEFAULT_ENV_FILE: &str = "/etc/owfs/env";

/// mount(8)'s exit statuses, which its helpers return.
pub const EXIT_USAGE: i32 = 1;
pub const EXIT_FAILURE: i32 = 32;

/// An `owfs mount` command line made from mount(8)'s helper arguments.
#[derive(Debug, PartialEq)]
pub struct Invocation {
    /// argv for the normal command-line parser, starting with "owfs".
    pub argv: Vec<OsString>,
    /// `-f` (fake): check everything, mount nothing.
    pub fake: bool,
    /// The environment file to read (None: none given and the default is absent).
    pub env_file: Option<PathBuf>,
    /// Whether env_file was named by `-o env_file=` (then it must exist).
    pub env_file_explicit: bool,
}

/// Is this process running as the mount helper (per the name it was started under)?
pub fn invoked_as_helper(argv0: &std::ffi::OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| NAMES.contains(&n))
}

/// Turns mount(8)'s helper arguments (`args` without argv\[0\]) into an `owfs mount` command.
/// `check` tells whether one daemon option is valid (used for `-s`, sloppy: unknown options
/// are dropped with a warning instead of refused).
pub fn translate(
    args: &[String],
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<Invocation, String> {
    let mut positional = Vec::new();
    let mut opts: Vec<String> = Vec::new();
    let (mut sloppy, mut fake) = (false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // `-o OPTS` or `-oOPTS`.
        if let Some(v) = a.strip_prefix("-o") {
            let v = match v {
                "" => it.next().ok_or("-o needs a value")?.as_str(),
                v => v,
            };
            opts.extend(v.split(',').filter(|s| !s.is_empty()).map(String::from));
            continue;
        }
        match a.as_str() {
            "-t" => {
                let t = it.next().ok_or("-t needs a value")?;
                if t != "owfs" && t != "fuse.owfs" {
                    return Err(format!(
                        "filesystem type {t}: this helper mounts type owfs only"
                    ));
                }
            }
            "-N" => return Err(
                "-N (another mount namespace) is not supported: run mount inside that namespace"
                    .into(),
            ),
            s if s.starts_with('-') && s.len() > 1 => {
                for c in s[1..].chars() {
                    match c {
                        's' => sloppy = true,
                        'f' => fake = true,
                        // No mtab to write (the kernel's mount table is the truth) and nothing
                        // more to say.
                        'n' | 'v' => {}
                        _ => return Err(format!("unknown flag -{c}")),
                    }
                }
            }
            _ => positional.push(a.clone()),
        }
    }
    let [spec, dir] = <[String; 2]>::try_from(positional).map_err(|p| {
        format!(
            "expected WORKSPACE and MOUNTPOINT, got {} argument(s): mount -t owfs WS DIR [-o OPTIONS]",
            p.len()
        )
    })?;

    let mut argv: Vec<OsString> = vec!["owfs".into()];
    let mut tail: Vec<OsString> = Vec::new();
    let mut daemon: Vec<String> = Vec::new();
    let mut env_file = None;
    for o in opts {
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o.as_str(), None),
        };
        match (k, v) {
            ("store", Some(url)) => argv.extend(["--store".into(), url.into()]),
            ("cache_dir", Some(d)) => tail.extend(["--cache-dir".into(), d.into()]),
            ("env_file", Some(f)) => env_file = Some(PathBuf::from(f)),
            ("wait", None) => tail.push("--wait".into()),
            ("wait", Some(d)) => tail.push(format!("--wait={d}").into()),
            ("takeover", None) => tail.push("--takeover".into()),
            ("store" | "cache_dir" | "env_file", None) => {
                return Err(format!("option {k} needs a value ({k}=...)"))
            }
            _ if owfs::mount::is_mount8_only(&o) => {}
            _ => match check(&o) {
                Ok(()) => daemon.push(o),
                Err(e) if sloppy => eprintln!("owfs: ignoring mount option {o} (-s): {e}"),
                Err(e) => return Err(e),
            },
        }
    }
    argv.extend(["mount".into(), spec.into(), dir.into()]);
    if !daemon.is_empty() {
        argv.extend(["-o".into(), daemon.join(",").into()]);
    }
    argv.extend(tail);
    let env_file_explicit = env_file.is_some();
    let env_file =
        env_file.or_else(|| Some(PathBuf::from(DEFAULT_ENV_FILE)).filter(|p| p.exists()));
    Ok(Invocation {
        argv,
        fake,
        env_file,
        env_file_explicit,
    })
}

/// Parses an environment file: `KEY=VALUE` lines, `#` comments, blank lines, an optional
/// `export ` prefix and optional single or double quotes around the value.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: expected KEY=VALUE", n + 1));
        };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {}: {k:?} is not a variable name", n + 1));
        }
        let v = v.trim();
        let v = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| v.strip_prefix(*a).and_then(|x| x.strip_suffix(*b)))
            .unwrap_or(v);
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn argv(inv: &Invocation) -> String {
        inv.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn fstab_options_become_flags_and_daemon_options() {
        let inv = translate(
            &words("ws1 /workspace -o rw,_netdev,nofail,x-systemd.automount,store=s3://b/p,cache_dir=/var/c,commit_interval_ms=500,wait=90s,nosuid"),
            ok,
        )
        .unwrap();
        assert_eq!(
            argv(&inv),
            "owfs --store s3://b/p mount ws1 /workspace -o rw,commit_interval_ms=500,nosuid --cache-dir /var/c --wait=90s"
        );
        assert!(!inv.fake);
    }

    #[test]
    fn flags_of_mount8() {
        let inv = translate(&words("-sfnv ws1@3 /mnt -t owfs -o ro"), ok).unwrap();
        assert!(inv.fake);
        assert_eq!(argv(&inv), "owfs mount ws1@3 /mnt -o ro");
        assert!(translate(&words("ws1 /mnt -t ext4"), ok).is_err());
        assert!(translate(&words("ws1"), ok).is_err());
        assert!(translate(&words("ws1 /mnt -N 4"), ok).is_err());
        assert!(translate(&words("ws1 /mnt -o store"), ok).is_err());
    }

    #[test]
    fn sloppy_drops_unknown_options_else_refuses() {
        let check = |o: &str| {
            if o == "bogus" {
                Err("unknown mount option".to_string())
            } else {
                Ok(())
            }
        };
        assert!(translate(&words("ws /m -o bogus,ro"), check).is_err());
        let inv = translate(&words("ws /m -s -o bogus,ro"), check).unwrap();
        assert_eq!(argv(&inv), "owfs mount ws /m -o ro");
    }

    #[test]
    fn env_files() {
        let v = parse_env_file(
            "# comment\n\nOWFS_STORE=s3://b/p\nexport AWS_REGION='eu-west-1'\n AWS_SECRET_ACCESS_KEY = \"a=b\" \n",
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                ("OWFS_STORE".into(), "s3://b/p".into()),
                ("AWS_REGION".into(), "eu-west-1".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "a=b".into()),
            ]
        );
        assert!(parse_env_file("just words").is_err());
        assert!(parse_env_file("A B=1").is_err());
    }
}
