//! Test harness: stores to run against (file:// and the S3 server named by
//! `OWFS_TEST_S3_ENDPOINT`, or one started here), the `owfs` binary, and tree comparison.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};

use chunkstore::{Repo, Store};

/// A store for one test: a fresh `file://` directory or a fresh S3 bucket.
pub struct Case {
    pub name: &'static str,
    pub url: String,
    pub scratch: tempfile::TempDir,
    _moto: Option<Arc<Moto>>,
}

pub struct Moto {
    pub endpoint: String,
    /// Its request log (one line per HTTP request), if known: `OWFS_TEST_MOTO_LOG` for the
    /// test script's server, a file of ours for one started here.
    pub log: Option<PathBuf>,
    child: Option<Child>,
    port: Option<u16>,
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The server is the watchdog's child: stop it too.
        if let Some(port) = self.port {
            let _ = Command::new("pkill")
                .args(["-f", &format!("moto.* -p {port} ")])
                .status();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether an HTTP server answers at `endpoint` (any status: an authenticating server
/// answers 403 to an anonymous request).
fn http_answers(endpoint: &str) -> bool {
    Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", endpoint])
        .output()
        .map(|o| o.status.success() && o.stdout != b"000")
        .unwrap_or(false)
}

static MOTO: OnceLock<Arc<Moto>> = OnceLock::new();

/// The S3 server: the one the test script started, else one of our own (slow to start).
pub fn moto() -> Arc<Moto> {
    MOTO.get_or_init(|| match std::env::var("OWFS_TEST_S3_ENDPOINT") {
        Ok(endpoint) => Arc::new(Moto {
            endpoint,
            log: std::env::var_os("OWFS_TEST_MOTO_LOG").map(PathBuf::from),
            child: None,
            port: None,
        }),
        Err(_) => Arc::new(Moto::spawn(&[])),
    })
    .clone()
}

impl Moto {
    /// Starts a moto server of our own with extra environment (e.g. to enforce credentials).
    pub fn spawn(env: &[(&str, &str)]) -> Moto {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("owfs-test-moto-{port}.log"));
        // A watchdog shell stops the server when this test process ends: statics are never
        // dropped, so nothing else would.
        let script = format!(
            "(moto_server -p {port} -H 127.0.0.1 || python3 -m moto.server -p {port} -H 127.0.0.1) >{log} 2>&1 & m=$!; \\
             while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill $m; sleep 1; pkill -f 'moto.* -p {port} ' ; true",
            parent = std::process::id(),
            log = log.display()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]') is needed for the S3 tests");
        let endpoint = format!("http://127.0.0.1:{port}");
        for _ in 0..300 {
            if http_answers(&endpoint) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Moto {
            endpoint,
            log: Some(log),
            child: Some(child),
            port: Some(port),
        }
    }
}

pub fn set_s3_env(endpoint: &str) {
    // Tests of one process share one endpoint, so setting these once is consistent.
    std::env::set_var("AWS_ENDPOINT_URL", endpoint);
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::remove_var("OWFS_FAULTS");
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Case {
    pub fn file() -> Case {
        let scratch = tempfile::Builder::new()
            .prefix("owfs-test")
            .tempdir_in(scratch_root())
            .unwrap();
        let url = format!("file://{}/store", scratch.path().display());
        Case {
            name: "file",
            url,
            scratch,
            _moto: None,
        }
    }

    pub fn s3() -> Case {
        let m = moto();
        set_s3_env(&m.endpoint);
        let bucket = unique("owfs").to_lowercase();
        let ok = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", m.endpoint)])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "creating bucket {bucket} at {}", m.endpoint);
        let scratch = tempfile::Builder::new()
            .prefix("owfs-test")
            .tempdir_in(scratch_root())
            .unwrap();
        Case {
            name: "s3",
            url: format!("s3://{bucket}/pfx"),
            scratch,
            _moto: Some(m),
        }
    }

    /// Both kinds of store: every integration test runs on each.
    pub fn all() -> Vec<Case> {
        vec![Case::file(), Case::s3()]
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    pub fn owfs(&self, args: &[&str]) -> Output {
        self.owfs_env(args, &[])
    }

    pub fn owfs_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.owfs_cmd(args, env).output().expect("running owfs")
    }

    /// The command line of `owfs ARGS` against this case's store, not yet run.
    pub fn owfs_cmd(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(owfs_bin());
        if !args.contains(&"--store") {
            c.arg("--store").arg(&self.url);
        }
        c.args(args);
        if let Some(m) = &self._moto {
            c.env("AWS_ENDPOINT_URL", &m.endpoint)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_REGION", "us-east-1");
        }
        c.env_remove("OWFS_FAULTS");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// Runs owfs and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.owfs(args);
        assert!(
            out.status.success(),
            "[{}] owfs {args:?} failed ({:?}):\n{}{}",
            self.name,
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("owfs --json prints JSON")
    }

    /// `owfs log WS` as (number, epoch, kind), oldest first.
    pub fn history(&self, ws: &str) -> Vec<(u64, u64, String)> {
        let v = self.json(&["log", ws]);
        let mut out: Vec<(u64, u64, String)> = v
            .as_array()
            .expect("log --json is a list")
            .iter()
            .map(|g| {
                (
                    g["number"].as_u64().unwrap(),
                    g["epoch"].as_u64().unwrap(),
                    g["kind"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// `owfs cat WS@N PATH`: the file's bytes in generation N, or the error owfs printed.
    pub fn cat(&self, ws: &str, n: u64, path: &str) -> Result<Vec<u8>, String> {
        let out = self.owfs(&["cat", &format!("{ws}@{n}"), path]);
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `owfs restore SPEC DIR` into a new directory of this case (SPEC: `ws` or `ws@N`).
    pub fn restore(&self, spec: &str, name: &str) -> PathBuf {
        let out = self.dir(name);
        self.ok(&["restore", spec, out.to_str().unwrap()]);
        out
    }

    pub fn store(&self) -> Store {
        if let Some(m) = &self._moto {
            set_s3_env(&m.endpoint);
        }
        Store::open(&self.url).unwrap()
    }

    /// Where the S3 server's request log ends now (for `s3_requests`); None on file:// or
    /// when the log is unknown.
    pub fn s3_log_end(&self) -> Option<u64> {
        let log = self._moto.as_ref()?.log.as_ref()?;
        std::fs::metadata(log).ok().map(|m| m.len())
    }

    /// The S3 server's requests for this case's bucket logged after `from` (a `s3_log_end`),
    /// as "METHOD /bucket/key?query".
    pub fn s3_requests(&self, from: u64) -> Option<Vec<String>> {
        use std::io::{Read, Seek};
        let log = self._moto.as_ref()?.log.as_ref()?;
        let bucket = self.url.strip_prefix("s3://")?.split('/').next()?;
        let mut f = std::fs::File::open(log).ok()?;
        f.seek(std::io::SeekFrom::Start(from)).ok()?;
        let mut raw = Vec::new();
        f.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw);
        let lines = text
            .lines()
            .filter_map(|l| {
                // 127.0.0.1 - - [date] "PUT /bucket/key HTTP/1.1" 200 -
                let req = l.split('"').nth(1)?;
                let mut it = req.split(' ');
                let (method, path) = (it.next()?, it.next()?);
                let rest = path.strip_prefix('/')?.strip_prefix(bucket)?;
                (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
                    .then(|| format!("{method} {path}"))
            })
            .collect();
        Some(lines)
    }

    pub fn repo(&self, rt: &tokio::runtime::Runtime) -> Arc<Repo> {
        Repo::open(self.store(), rt.handle().clone(), true).unwrap()
    }
}

pub fn scratch_root() -> PathBuf {
    let p = std::env::var_os("OWFS_TEST_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&p).unwrap();
    p
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The `owfs` binary next to the test executable (target/<profile>/owfs).
pub fn owfs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OWFS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("owfs");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// Everything a restore must reproduce about one entry.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Seen {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub content: Vec<u8>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub rdev: u64,
}

/// Walks `root` (not following symlinks): entries by relative path, plus hard-link groups.
/// Entries by relative path, and the hard-link groups (sorted lists of paths).
pub type Scan = (BTreeMap<Vec<u8>, Seen>, Vec<Vec<Vec<u8>>>);

pub fn scan(root: &Path) -> Scan {
    let mut out = BTreeMap::new();
    let mut links: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    fn walk(
        dir: &Path,
        rel: &[u8],
        out: &mut BTreeMap<Vec<u8>, Seen>,
        links: &mut BTreeMap<u64, Vec<Vec<u8>>>,
    ) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let mut r = rel.to_vec();
            r.push(b'/');
            r.extend_from_slice(e.file_name().as_bytes());
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                ("dir", Vec::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else if ft.is_file() {
                ("file", std::fs::read(&p).unwrap())
            } else {
                ("special", Vec::new())
            };
            if ft.is_file() && m.nlink() > 1 {
                links.entry(m.ino()).or_default().push(r.clone());
            }
            let seen = Seen {
                kind,
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                uid: m.uid(),
                gid: m.gid(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                content,
                xattrs: chunkstore::snapshot::read_user_xattrs(&p),
                rdev: m.rdev(),
            };
            if ft.is_dir() {
                walk(&p, &r, out, links);
            }
            out.insert(r, seen);
        }
    }
    walk(root, b"", &mut out, &mut links);
    let mut groups: Vec<Vec<Vec<u8>>> = links
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    groups.sort();
    (out, groups)
}

/// Asserts that two trees are the same in everything a restore must keep.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, la) = scan(a);
    let (sb, lb) = scan(b);
    let ka: Vec<_> = sa
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let kb: Vec<_> = sb
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(ka, kb, "different entries");
    for (k, va) in &sa {
        let vb = &sb[k];
        assert_eq!(va, vb, "entry {:?} differs", String::from_utf8_lossy(k));
    }
    assert_eq!(la, lb, "hard-link groups differ");
}

pub use chunkstore::testdata::noise;

/// Restores the tree `root` into `out`, stopping at the first problem.
pub fn restore(
    repo: &Arc<Repo>,
    root: chunkstore::Hash,
    out: &Path,
) -> chunkstore::Result<chunkstore::restore::RestoreReport> {
    let progress = chunkstore::progress::Progress::default();
    let opts = chunkstore::restore::RestoreOptions {
        keep_going: false,
        progress: &progress,
    };
    chunkstore::restore::restore_tree(repo, root, out, opts)
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == canon))
}

/// A read-only mount of a generation, unmounted when dropped.
pub struct RoMount<'a> {
    case: &'a Case,
    pub at: PathBuf,
}

impl Drop for RoMount<'_> {
    fn drop(&mut self) {
        if is_mounted(&self.at) {
            let out = self.case.owfs(&["umount", self.at.to_str().unwrap()]);
            if !out.status.success() {
                // Still busy (a failed assertion left a file open): detach it lazily.
                let _ = Command::new("umount").arg("-l").arg(&self.at).status();
            }
        }
    }
}

/// A read-write mount of a workspace, unmounted (with its final commit) when dropped.
pub struct RwMount<'a> {
    pub case: &'a Case,
    pub ws: String,
    pub at: PathBuf,
    pub cache: PathBuf,
}

impl Case {
    /// Mounts `ws` read-write on a fresh directory `name` with its own cache directory.
    pub fn mount_rw(&self, ws: &str, name: &str, opts: &[&str]) -> RwMount<'_> {
        self.mount_rw_with(ws, name, opts, &[])
    }

    /// The arguments of `owfs mount` for `mount_rw_with`, without running it.
    pub fn mount_args(&self, ws: &str, name: &str, opts: &[&str], flags: &[&str]) -> Vec<String> {
        let at = self.dir(name);
        let cache = self.dir(&format!("{name}.cache"));
        std::fs::create_dir_all(&at).unwrap();
        let mut args: Vec<String> = ["mount", ws, at.to_str().unwrap(), "--cache-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(cache.to_str().unwrap().to_string());
        let mut opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
        // OWFS_TEST_URING=off: the suite again with every request through /dev/fuse.
        if let Ok(u) = std::env::var("OWFS_TEST_URING") {
            if !opts.iter().any(|o| o == "ro") {
                opts.push(format!("uring={u}"));
            }
        }
        if !opts.is_empty() {
            args.push("-o".into());
            args.push(opts.join(","));
        }
        args.extend(flags.iter().map(|s| s.to_string()));
        args
    }

    /// `mount_rw` with environment variables for the mount's daemon (`OWFS_FAULTS`).
    pub fn mount_rw_env(
        &self,
        ws: &str,
        name: &str,
        opts: &[&str],
        env: &[(&str, &str)],
    ) -> RwMount<'_> {
        let out = self.mount_cmd(ws, name, opts, &[], env).output().unwrap();
        assert!(
            out.status.success(),
            "[{}] mount: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.rw_handle(ws, name)
    }

    /// Mounts `spec` (`WS` or `WS@N`) read-only (time travel) on a fresh directory `name`.
    pub fn mount_ro(&self, spec: &str, name: &str) -> RoMount<'_> {
        let at = self.dir(name);
        std::fs::create_dir_all(&at).unwrap();
        self.ok(&["mount", spec, at.to_str().unwrap(), "-o", "ro"]);
        RoMount { case: self, at }
    }

    /// The handle of a mount made elsewhere (e.g. by a daemon the test runs in the
    /// foreground), unmounted when dropped.
    pub fn rw_handle(&self, ws: &str, name: &str) -> RwMount<'_> {
        RwMount {
            case: self,
            ws: ws.to_string(),
            at: self.dir(name),
            cache: self.dir(&format!("{name}.cache")),
        }
    }

    /// `owfs mount` as `mount_args` gives it, with `env`, not yet run.
    pub fn mount_cmd(
        &self,
        ws: &str,
        name: &str,
        opts: &[&str],
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Command {
        let args = self.mount_args(ws, name, opts, flags);
        self.owfs_cmd(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>(), env)
    }

    /// `mount_rw` with extra command-line flags (e.g. `--takeover`).
    pub fn mount_rw_with(
        &self,
        ws: &str,
        name: &str,
        opts: &[&str],
        flags: &[&str],
    ) -> RwMount<'_> {
        let args = self.mount_args(ws, name, opts, flags);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.ok(&args);
        self.rw_handle(ws, name)
    }
}

impl RwMount<'_> {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.at.join(rel)
    }

    /// `owfs sync`: the number of the generation that holds every write made before.
    pub fn sync(&self) -> u64 {
        let v = self.case.json(&["sync", self.at.to_str().unwrap()]);
        v["generation"].as_u64().expect("sync prints a generation")
    }

    pub fn status(&self) -> serde_json::Value {
        self.case.json(&["status", self.at.to_str().unwrap()])
    }

    pub fn daemon_pid(&self) -> i32 {
        self.status()["pid"].as_i64().expect("status has a pid") as i32
    }

    /// `owfs umount`: returns the final generation's number.
    pub fn umount(self) -> u64 {
        let v = self.case.json(&["umount", self.at.to_str().unwrap()]);
        let n = v["generation"]
            .as_u64()
            .expect("umount prints a generation");
        assert!(!is_mounted(&self.at));
        n
    }

    /// SIGKILL of the daemon, then the dead mount is detached (as a supervisor would).
    pub fn kill(self) {
        let pid = self.daemon_pid();
        kill_and_detach(pid, &self.at);
    }
}

/// Kills a mount's daemon with SIGKILL and detaches the mount it leaves behind.
pub fn kill_and_detach(pid: i32, at: &Path) {
    send_signal(pid, 9);
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = Command::new("umount").arg("-l").arg(at).status();
}

/// Runs `cmd` with /bin/sh as `user` (through `su`), its output collected.
pub fn run_as(user: &str, cmd: &str) -> Output {
    Command::new("su")
        .args([user, "-s", "/bin/sh", "-c", cmd])
        .output()
        .expect("running su")
}

/// Sends `sig` to `pid`.
pub fn send_signal(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for RwMount<'_> {
    fn drop(&mut self) {
        if is_mounted(&self.at) {
            let out = self.case.owfs(&["umount", self.at.to_str().unwrap()]);
            if !out.status.success() {
                let _ = Command::new("umount").arg("-l").arg(&self.at).status();
            }
        }
    }
}

/// Names the step a test is at and, if the test is still there after `limit`, prints that
/// step, every owfs process's threads with the kernel function each waits in and its kernel
/// stack, and the files given to `attach` (daemon logs), then aborts the test process: a
/// hang is reported where it happened, not as a bare timeout.
pub struct Watchdog {
    state: Arc<std::sync::Mutex<DogState>>,
}

/// The step, when it began, the files to print, and whether the test ended.
type DogState = (String, std::time::Instant, Vec<PathBuf>, bool);

impl Watchdog {
    pub fn new(test: &'static str, limit: std::time::Duration) -> Watchdog {
        let state = Arc::new(std::sync::Mutex::new((
            "start".to_string(),
            std::time::Instant::now(),
            Vec::<PathBuf>::new(),
            false,
        )));
        let s = state.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let g = s.lock().unwrap();
            if g.3 {
                return;
            }
            if g.1.elapsed() < limit {
                continue;
            }
            eprintln!(
                "WATCHDOG: {test}: stuck for {limit:?} at step {:?}; owfs processes:",
                g.0
            );
            eprintln!("{}", owfs_process_report());
            for f in &g.2 {
                eprintln!(
                    "--- {}:\n{}",
                    f.display(),
                    std::fs::read_to_string(f).unwrap_or_default()
                );
            }
            std::process::abort();
        });
        Watchdog { state }
    }

    /// The test is now at `step` (its time limit starts again).
    pub fn step(&self, step: impl Into<String>) {
        let mut g = self.state.lock().unwrap();
        g.0 = step.into();
        g.1 = std::time::Instant::now();
    }

    /// `file` is printed if the test hangs.
    pub fn attach(&self, file: &Path) {
        self.state.lock().unwrap().2.push(file.to_path_buf());
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Ok(mut g) = self.state.lock() {
            g.3 = true;
        }
    }
}

/// Every `owfs` process with, per thread, its state, the kernel function it waits in and
/// its kernel stack (this test's process too: its threads may be the ones stuck).
pub fn owfs_process_report() -> String {
    let mut out = String::new();
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if pid != me && !cmd.contains("owfs") {
            continue;
        }
        out.push_str(&format!("pid {pid}: {cmd}\n"));
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let tp = t.path();
            let read = |f: &str| std::fs::read_to_string(tp.join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rsplit_once(") ")
                .map(|(_, r)| r.chars().next().unwrap_or('?'))
                .unwrap_or('?');
            out.push_str(&format!(
                "  tid {} {} {} wchan={}\n",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                state,
                read("wchan")
            ));
            for l in read("stack").lines().take(12) {
                out.push_str(&format!("      {l}\n"));
            }
        }
    }
    out
}
