//! Real programs on a read-write mount behave exactly as on local disk: git (clone, fsck,
//! commit, gc), cargo (build and test of a small crate), a Python venv with pip, SQLite
//! with several processes at once (WAL and rollback journal) and the sqlite3 CLI. Every
//! test runs on file:// and on S3 (moto) and survives an unmount and a mount of the same
//! workspace on a fresh cache directory (or a restore of the synced generation).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use owfs_tests::{noise, Case, RwMount};

// ---------------------------------------------------------------------------------------
// Local helpers

fn show(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, insists on success, returns stdout.
fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(out.status.success(), "{what} failed: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Prints how long a step took (seen with `--no-capture`, or on failure).
struct Clock {
    tag: String,
    start: Instant,
    lap: Instant,
}

impl Clock {
    fn new(c: &Case, test: &str) -> Clock {
        let now = Instant::now();
        Clock {
            tag: format!("[{} {test}]", c.name),
            start: now,
            lap: now,
        }
    }
    fn step(&mut self, what: &str) {
        let now = Instant::now();
        println!(
            "{} {what}: {:.2}s (total {:.2}s)",
            self.tag,
            (now - self.lap).as_secs_f64(),
            (now - self.start).as_secs_f64()
        );
        self.lap = now;
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Mounts `ws` again at the same place (paths inside the tree, like a venv's shebangs or
/// cargo's dep-info, stay valid) on a fresh cache directory: everything is read back from
/// the store.
fn remount<'a>(c: &'a Case, ws: &str, at: &Path, cache_name: &str) -> RwMount<'a> {
    let cache = c.dir(cache_name);
    assert!(!cache.exists(), "{} is not fresh", cache.display());
    c.ok(&["mount", ws, s(at), "--cache-dir", s(&cache)]);
    RwMount {
        case: c,
        ws: ws.to_string(),
        at: at.to_path_buf(),
        cache,
    }
}

/// The real interpreter behind `python3` (not a pyenv shim), so venvs point at it.
fn python() -> PathBuf {
    let out = run(
        "python3 sys.executable",
        Command::new("python3").args(["-c", "import sys; print(sys.executable)"]),
    );
    PathBuf::from(out.trim())
}

// ---------------------------------------------------------------------------------------
// 1. git

/// A git command with a clean, deterministic environment (fixed identity and dates).
fn git(c: &Case, dir: &Path, date: u32, args: &[&str]) -> Command {
    let home = c.dir("home");
    std::fs::create_dir_all(&home).unwrap();
    let when = format!("{} +0000", 1_700_000_000 + date * 3600);
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env("GIT_AUTHOR_NAME", "Ada")
        .env("GIT_AUTHOR_EMAIL", "ada@example.org")
        .env("GIT_COMMITTER_NAME", "Ada")
        .env("GIT_COMMITTER_EMAIL", "ada@example.org")
        .env("GIT_AUTHOR_DATE", &when)
        .env("GIT_COMMITTER_DATE", &when)
        .args(["-c", "init.defaultBranch=main", "-c", "gc.auto=0"])
        .args(args);
    cmd
}

fn g(c: &Case, dir: &Path, date: u32, args: &[&str]) -> String {
    run(
        &format!("[{}] git {args:?} in {}", c.name, dir.display()),
        &mut git(c, dir, date, args),
    )
}

/// A small repository: a few commits, a subdirectory, an executable, a symlink, a binary
/// file, a rename, a tag and a merged branch.
fn make_source_repo(c: &Case) -> PathBuf {
    let src = c.dir("gitsrc");
    std::fs::create_dir_all(src.join("src/sub/deep")).unwrap();
    std::fs::create_dir_all(src.join("bin")).unwrap();
    g(c, &src, 0, &["init", "-q"]);
    std::fs::write(src.join("README.md"), "# demo\n").unwrap();
    std::fs::write(src.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    std::fs::write(src.join("src/sub/deep/notes.txt"), "deep\n".repeat(100)).unwrap();
    std::fs::write(src.join("bin/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(src.join("bin/run.sh"))
            .unwrap()
            .permissions(),
        0o755,
    );
    run(
        "chmod",
        Command::new("chmod").arg("755").arg(src.join("bin/run.sh")),
    );
    std::os::unix::fs::symlink("README.md", src.join("link")).unwrap();
    std::fs::write(src.join("data.bin"), noise(300_000, 7)).unwrap();
    g(c, &src, 1, &["add", "-A"]);
    g(c, &src, 1, &["commit", "-q", "-m", "initial"]);

    std::fs::write(src.join("README.md"), "# demo\n\nmore words\n").unwrap();
    std::fs::write(src.join("src/sub/more.txt"), "more\n").unwrap();
    let mut d = noise(300_000, 7);
    d[1000..2000].copy_from_slice(&noise(1000, 8));
    std::fs::write(src.join("data.bin"), d).unwrap();
    g(c, &src, 2, &["add", "-A"]);
    g(c, &src, 2, &["commit", "-q", "-m", "second"]);

    g(c, &src, 3, &["mv", "src/main.c", "src/app.c"]);
    g(c, &src, 3, &["commit", "-q", "-m", "rename"]);
    g(c, &src, 3, &["tag", "-a", "v1", "-m", "version 1"]);

    g(c, &src, 4, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(src.join("src/sub/feature.txt"), "feature\n").unwrap();
    g(c, &src, 4, &["add", "-A"]);
    g(c, &src, 4, &["commit", "-q", "-m", "feature work"]);
    g(c, &src, 5, &["checkout", "-q", "main"]);
    std::fs::write(src.join("README.md"), "# demo\n\nmore words\nmain again\n").unwrap();
    g(c, &src, 5, &["commit", "-q", "-am", "main work"]);
    g(
        c,
        &src,
        6,
        &["merge", "-q", "--no-ff", "-m", "merge feature", "feature"],
    );
    src
}

const LOG: &[&str] = &["log", "--all", "--format=%H %P %an %at %s", "--topo-order"];

/// Work done in a clone: a commit touching several files, then gc (repack, prune,
/// pack-refs: renames and deletions in .git).
fn work_in_clone(c: &Case, clone: &Path) {
    // Longer than before: a shorter rewrite is `git_edit_shortening_a_file_survives_remount`.
    std::fs::write(
        clone.join("README.md"),
        "# demo\n\nchanged in the clone, longer than before\n",
    )
    .unwrap();
    std::fs::create_dir_all(clone.join("new/dir")).unwrap();
    std::fs::write(clone.join("new/dir/file.txt"), "new\n".repeat(1000)).unwrap();
    std::fs::remove_file(clone.join("src/sub/more.txt")).unwrap();
    g(c, clone, 7, &["add", "-A"]);
    g(c, clone, 7, &["commit", "-q", "-m", "work in the clone"]);
    g(c, clone, 8, &["gc", "-q", "--prune=now"]);
}

#[test]
fn git_clone_fsck_commit_gc_and_remount() {
    for c in Case::all() {
        let mut t = Clock::new(&c, "git");
        let src = make_source_repo(&c);
        let url = format!("file://{}", src.display());
        let src_log = g(&c, &src, 0, LOG);
        assert_eq!(src_log.lines().count(), 6, "the source has 6 commits");
        // The same work on local disk: what the mount must reproduce exactly.
        let local = c.dir("localclone");
        g(&c, &c.dir(""), 0, &["clone", "-q", &url, s(&local)]);
        work_in_clone(&c, &local);
        let local_log = g(&c, &local, 0, LOG);
        let local_head = g(&c, &local, 0, &["rev-parse", "HEAD"]);
        t.step("source repo + local clone");

        let m = c.mount_rw("ws", "mnt", &[]);
        let clone = m.path("clone");
        g(&c, &m.at, 0, &["clone", "-q", &url, s(&clone)]);
        t.step("clone into the mount");
        g(
            &c,
            &clone,
            0,
            &["fsck", "--full", "--strict", "--no-progress"],
        );
        assert_eq!(
            g(&c, &clone, 0, LOG),
            src_log,
            "[{}] git log of the clone",
            c.name
        );
        assert_eq!(g(&c, &clone, 0, &["status", "--porcelain"]), "");
        assert_eq!(
            std::fs::read_link(clone.join("link")).unwrap(),
            Path::new("README.md")
        );
        let mode = std::fs::metadata(clone.join("bin/run.sh")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::read(clone.join("data.bin")).unwrap(),
            std::fs::read(src.join("data.bin")).unwrap()
        );
        t.step("fsck + log + status");

        work_in_clone(&c, &clone);
        g(
            &c,
            &clone,
            0,
            &["fsck", "--full", "--strict", "--no-progress"],
        );
        assert_eq!(g(&c, &clone, 0, &["rev-parse", "HEAD"]), local_head);
        assert_eq!(
            g(&c, &clone, 0, LOG),
            local_log,
            "[{}] log after work",
            c.name
        );
        assert_eq!(
            g(&c, &clone, 0, &["count-objects", "-v"]).lines().next(),
            Some("count: 0"),
            "gc left loose objects"
        );
        t.step("commit + gc + fsck in the mount");
        let gen = m.umount();
        t.step(&format!("umount (generation {gen})"));

        let m2 = c.mount_rw("ws", "mnt2", &[]);
        let clone = m2.path("clone");
        g(
            &c,
            &clone,
            0,
            &["fsck", "--full", "--strict", "--no-progress"],
        );
        assert_eq!(g(&c, &clone, 0, &["status", "--porcelain"]), "");
        assert_eq!(
            g(&c, &clone, 0, LOG),
            local_log,
            "[{}] log after remount",
            c.name
        );
        g(&c, &clone, 9, &["checkout", "-q", "v1"]);
        assert!(!clone.join("src/sub/feature.txt").exists());
        assert!(clone.join("src/sub/more.txt").exists());
        g(&c, &clone, 9, &["checkout", "-q", "main"]);
        assert_eq!(g(&c, &clone, 0, &["status", "--porcelain"]), "");
        t.step("remount on a fresh cache: fsck + status + checkout");
        m2.umount();
    }
}

/// An edit that makes a tracked file shorter (open with O_TRUNC, write less than before,
/// as editors and `echo x > f` do), committed with git, then read back on a fresh cache.
#[test]
fn git_edit_shortening_a_file_survives_remount() {
    for c in Case::all() {
        let src = make_source_repo(&c);
        let url = format!("file://{}", src.display());
        let m = c.mount_rw("ws", "mnt", &[]);
        let clone = m.path("clone");
        g(&c, &m.at, 0, &["clone", "-q", &url, s(&clone)]);
        m.sync();
        let short = "# short\n";
        assert!(short.len() < std::fs::metadata(clone.join("README.md")).unwrap().len() as usize);
        std::fs::write(clone.join("README.md"), short).unwrap();
        g(&c, &clone, 7, &["commit", "-q", "-am", "shorter readme"]);
        let head = g(&c, &clone, 0, &["rev-parse", "HEAD"]);
        m.umount();

        let m2 = c.mount_rw("ws", "mnt2", &[]);
        let clone = m2.path("clone");
        assert_eq!(
            std::fs::read_to_string(clone.join("README.md")).unwrap(),
            short,
            "[{}] README.md after remount",
            c.name
        );
        g(
            &c,
            &clone,
            0,
            &["fsck", "--full", "--strict", "--no-progress"],
        );
        assert_eq!(g(&c, &clone, 0, &["rev-parse", "HEAD"]), head);
        assert_eq!(g(&c, &clone, 0, &["status", "--porcelain"]), "");
        m2.umount();
    }
}

// ---------------------------------------------------------------------------------------
// 2. cargo

/// A crate without any dependency (not even optional or dev ones) from the local registry
/// cache, so that it builds offline: (its .crate file, its directory name).
fn small_crate() -> (PathBuf, String) {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let cache = home.join("registry/cache");
    let mut found = Vec::new();
    for reg in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(reg.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(f.path());
        }
    }
    found.sort();
    for want in ["scopeguard-", "fnv-"] {
        if let Some(p) = found.iter().rev().find(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with(want) && n.ends_with(".crate")
        }) {
            let dir = p.file_stem().unwrap().to_str().unwrap().to_string();
            return (p.clone(), dir);
        }
    }
    panic!(
        "no dependency-free crate (scopeguard, fnv) in {}: run `cargo fetch` in the workspace",
        cache.display()
    );
}

fn cargo(root: &Path, krate: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join(krate))
        .args(args)
        .arg("--offline")
        .env("CARGO_TARGET_DIR", root.join("target"))
        .env("CARGO_TERM_COLOR", "never");
    for v in [
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_MANIFEST_DIR",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// Names of the files in `dir`, sorted (cargo's metadata hashes included: they do not
/// depend on where the package's directory is).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// The "test NAME ... ok" lines of `cargo test`, sorted.
fn test_lines(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("test ") && l.contains(" ... "))
        .map(|l| l.to_string())
        .collect();
    v.sort();
    v
}

/// Extracts, builds and tests the crate under `root`; returns (build artefacts in
/// target/debug, in target/debug/deps, test result lines).
fn build_crate(
    c: &Case,
    root: &Path,
    krate: &(PathBuf, String),
) -> (Vec<String>, Vec<String>, Vec<String>) {
    std::fs::create_dir_all(root).unwrap();
    run(
        "tar xzf",
        Command::new("tar")
            .arg("xzf")
            .arg(&krate.0)
            .arg("-C")
            .arg(root),
    );
    let what = format!("[{}] cargo build in {}", c.name, root.display());
    run(&what, &mut cargo(root, &krate.1, &["build"]));
    let debug = root.join("target/debug");
    let lib = krate.1.rsplit_once('-').unwrap().0.replace('-', "_");
    assert!(
        debug.join(format!("lib{lib}.rlib")).is_file(),
        "{what}: no lib{lib}.rlib"
    );
    let top = names(&debug);
    let deps = names(&debug.join("deps"));
    // A second build finds everything fresh: mtimes and fingerprints read back as written.
    let again = cargo(root, &krate.1, &["build", "-v"]).output().unwrap();
    assert!(again.status.success(), "{what} (again): {}", show(&again));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("Fresh") && !err.contains("Compiling"),
        "{what}: the second build is not a no-op:\n{err}"
    );
    let tests = run(
        &format!("[{}] cargo test in {}", c.name, root.display()),
        &mut cargo(root, &krate.1, &["test"]),
    );
    (top, deps, test_lines(&tests))
}

#[test]
fn cargo_build_and_test_a_crate() {
    let krate = small_crate();
    for c in Case::all() {
        let mut t = Clock::new(&c, "cargo");
        let local = build_crate(&c, &c.dir("local"), &krate);
        t.step(&format!("{} on local disk", krate.1));
        assert!(!local.2.is_empty(), "cargo test ran no test locally");
        assert!(local.2.iter().all(|l| l.ends_with(" ok")), "{:?}", local.2);

        let m = c.mount_rw("ws", "mnt", &[]);
        let mounted = build_crate(&c, &m.at, &krate);
        t.step(&format!("{} in the mount", krate.1));
        assert_eq!(mounted.0, local.0, "[{}] target/debug differs", c.name);
        assert_eq!(mounted.1, local.1, "[{}] target/debug/deps differs", c.name);
        assert_eq!(mounted.2, local.2, "[{}] cargo test results differ", c.name);
        let gen = m.umount();
        t.step(&format!("umount (generation {gen})"));

        // On a fresh cache the build is still up to date, and the tests still pass.
        let m2 = remount(&c, "ws", &c.dir("mnt"), "mnt.cache2");
        let again = cargo(&m2.at, &krate.1, &["build", "-v"]).output().unwrap();
        assert!(
            again.status.success(),
            "[{}] build after remount: {}",
            c.name,
            show(&again)
        );
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(
            err.contains("Fresh") && !err.contains("Compiling"),
            "[{}] after a remount the build is not a no-op:\n{err}",
            c.name
        );
        let tests = run(
            "cargo test after remount",
            &mut cargo(&m2.at, &krate.1, &["test"]),
        );
        assert_eq!(test_lines(&tests), local.2);
        t.step("remount: build fresh + test");
        m2.umount();
    }
}

// ---------------------------------------------------------------------------------------
// 3. Python venv + pip

/// Writes a wheel by hand (a zip with the package and its dist-info), with Python's
/// zipfile: no network, no setuptools or wheel package needed.
const MAKE_WHEEL: &str = r#"
import base64, hashlib, sys, zipfile
out, version = sys.argv[1], sys.argv[2]
name = "owfshello"
files = {
    f"{name}/__init__.py": f"VERSION = {version!r}\n"
        "from .greet import greet\n",
    f"{name}/greet.py": "def greet(who):\n    return 'hello ' + who + ' from ' + __name__\n",
    f"{name}/data/words.txt": "alpha\nbeta\n" * 100,
    f"{name}-{version}.dist-info/METADATA":
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: test\n",
    f"{name}-{version}.dist-info/WHEEL":
        "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    f"{name}-{version}.dist-info/entry_points.txt":
        f"[console_scripts]\nowfshello = {name}.greet:main\n",
}
files[f"{name}/greet.py"] += "def main():\n    print(greet('cli'))\n"
record = f"{name}-{version}.dist-info/RECORD"
lines = []
for path, text in files.items():
    data = text.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines.append(f"{path},sha256={digest},{len(data)}")
lines.append(f"{record},,")
files[record] = "\n".join(lines) + "\n"
with zipfile.ZipFile(f"{out}/{name}-{version}-py3-none-any.whl", "w") as z:
    for path, text in files.items():
        z.writestr(path, text)
"#;

fn pip(venv: &Path, args: &[&str]) -> String {
    run(
        &format!("pip {args:?} in {}", venv.display()),
        Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "--disable-pip-version-check", "--no-input"])
            .args(args)
            .env("PIP_NO_CACHE_DIR", "1")
            .env("PIP_CONFIG_FILE", "/dev/null")
            .env_remove("PYTHONPATH")
            .env_remove("PIP_INDEX_URL"),
    )
}

/// What the venv's python says about the package, and its console script's output.
fn use_venv(venv: &Path) -> (String, String) {
    let code = "import owfshello, os; from importlib import resources; \
                print(owfshello.VERSION, owfshello.greet('x'), \
                len(resources.files('owfshello').joinpath('data/words.txt').read_text()), \
                os.path.realpath(owfshello.__file__).startswith(os.path.realpath(os.environ['VENV'])))";
    let out = run(
        "venv python import",
        Command::new(venv.join("bin/python"))
            .args(["-c", code])
            .env("VENV", venv)
            .env_remove("PYTHONPATH"),
    );
    let cli = run(
        "console script",
        &mut Command::new(venv.join("bin/owfshello")),
    );
    (out, cli)
}

/// Creates a venv, installs 0.1 then upgrades to 0.2 (pip removes the old files);
/// returns (pip list, import output, console script output).
fn venv_session(py: &Path, wheels: &Path, venv: &Path) -> (String, (String, String)) {
    run(
        "python3 -m venv",
        Command::new(py).args(["-m", "venv"]).arg(venv),
    );
    for v in ["0.1.0", "0.2.0"] {
        pip(
            venv,
            &[
                "install",
                "--no-index",
                "--upgrade",
                s(&wheels.join(format!("owfshello-{v}-py3-none-any.whl"))),
            ],
        );
    }
    pip(venv, &["check"]);
    let list = pip(venv, &["list", "--format=freeze"]);
    (list, use_venv(venv))
}

#[test]
fn python_venv_and_pip_install() {
    let py = python();
    // The same session on local disk, once: what every mount must reproduce.
    let here = tempfile::Builder::new()
        .prefix("owfs-venv")
        .tempdir_in(owfs_tests::scratch_root())
        .unwrap();
    let wheels = here.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    for v in ["0.1.0", "0.2.0"] {
        run(
            "make wheel",
            Command::new(&py).args(["-c", MAKE_WHEEL, s(&wheels), v]),
        );
    }
    let start = Instant::now();
    let local = venv_session(&py, &wheels, &here.path().join("venv"));
    println!("[venv] local venv: {:.2}s", start.elapsed().as_secs_f64());
    assert!(
        local.0.contains("owfshello==0.2.0"),
        "local pip list: {}",
        local.0
    );
    assert!(!local.0.contains("owfshello==0.1.0"));
    assert!(
        local
            .1
             .0
            .starts_with("0.2.0 hello x from owfshello.greet 1100 True"),
        "{}",
        local.1 .0
    );
    assert_eq!(local.1 .1, "hello cli from owfshello.greet\n");
    for c in Case::all() {
        let mut t = Clock::new(&c, "venv");
        let m = c.mount_rw("ws", "mnt", &[]);
        let venv = m.path("venv");
        let mounted = venv_session(&py, &wheels, &venv);
        t.step("venv + pip install in the mount");
        assert_eq!(mounted, local, "[{}] venv in the mount", c.name);
        // The upgrade removed every file of 0.1.0.
        assert!(!venv
            .join("lib")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("site-packages/owfshello-0.1.0.dist-info")
            .exists());
        let m_at = m.at.clone();
        m.umount();
        t.step("umount");

        let m2 = remount(&c, "ws", &m_at, "mnt.cache2");
        assert_eq!(use_venv(&venv), local.1, "[{}] venv after remount", c.name);
        assert_eq!(pip(&venv, &["list", "--format=freeze"]), local.0);
        pip(&venv, &["check"]);
        t.step("remount: import + console script + pip list");
        m2.umount();
    }
}

// ---------------------------------------------------------------------------------------
// 4. SQLite: several processes at once

const SQL_PROCS: &str = r#"
import hashlib, os, sqlite3, sys, time
role, db = sys.argv[1], sys.argv[2]

def connect():
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    con.execute("PRAGMA busy_timeout=60000")
    return con

if role == "init":
    con = connect()
    mode = con.execute(f"PRAGMA journal_mode={sys.argv[3]}").fetchone()[0]
    con.execute("CREATE TABLE t(writer INTEGER, seq INTEGER, payload BLOB, PRIMARY KEY(writer, seq))")
    con.execute("CREATE INDEX t_seq ON t(seq)")
    con.execute("CREATE TABLE c(writer INTEGER PRIMARY KEY, n INTEGER)")
    print(mode)
elif role == "writer":
    w, n = int(sys.argv[3]), int(sys.argv[4])
    con = connect()
    mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    done = 0
    for i in range(n):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t VALUES(?, ?, randomblob(?))", (w, i, 200 + (i * 379) % 4000))
        con.execute("UPDATE t SET payload = randomblob(300) WHERE writer = ? AND seq = ?", (w, i // 2))
        con.execute("INSERT INTO c VALUES(?, 1) ON CONFLICT(writer) DO UPDATE SET n = n + 1", (w,))
        con.execute("COMMIT")
        done += 1
    con.close()
    print("committed", w, done, mode)
elif role == "reader":
    stop = sys.argv[3]
    con = connect()
    checks = 0
    while True:
        last = os.path.exists(stop)
        con.execute("BEGIN")
        per = dict(con.execute("SELECT writer, count(*) FROM t GROUP BY writer"))
        top = dict(con.execute("SELECT writer, max(seq) FROM t GROUP BY writer"))
        cnt = dict(con.execute("SELECT writer, n FROM c"))
        con.execute("COMMIT")
        if per != cnt or any(top[w] + 1 != per[w] for w in per):
            print("MISMATCH", per, cnt, top)
            sys.exit(1)
        checks += 1
        if last:
            break
        time.sleep(0.002)
    con.close()
    print("checks", checks, sum(per.values()))
elif role == "digest":
    con = connect()
    ok = [r[0] for r in con.execute("PRAGMA integrity_check")]
    rows = con.execute("SELECT writer, count(*) FROM t GROUP BY writer ORDER BY writer").fetchall()
    h = hashlib.sha256()
    for r in con.execute("SELECT writer, seq, payload FROM t ORDER BY writer, seq"):
        h.update(repr(r).encode())
    mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    con.close()
    print(ok, rows, h.hexdigest(), mode)
"#;

const WRITERS: u32 = 3;
const READERS: u32 = 2;
/// Transactions per writer: fewer with a rollback journal, where every commit fsyncs (and
/// so commits a generation of the workspace).
fn rows(mode: &str) -> u32 {
    if mode == "WAL" {
        150
    } else {
        60
    }
}

fn sql_procs(c: &Case, args: &[&str]) -> Command {
    let script = c.dir("sqlprocs.py");
    if !script.exists() {
        std::fs::write(&script, SQL_PROCS).unwrap();
    }
    let mut cmd = Command::new("python3");
    cmd.arg(&script).args(args).stdin(Stdio::null());
    cmd
}

/// 3 writers (one transaction per row, with a per-writer sequence and a counter) and 2
/// readers (checking in one read transaction that counts, counters and sequences agree)
/// run at once on app.db in the mount; then the database is checked on the mount and in
/// a restore of the generation `owfs sync` returns.
fn sqlite_processes(mode: &str) {
    let n_rows = rows(mode);
    for c in Case::all() {
        let mut t = Clock::new(&c, &format!("sqlite {mode}"));
        let m = c.mount_rw("ws", "mnt", &[]);
        let db = m.path("app.db");
        let dbs = s(&db).to_string();
        let got = run("init", &mut sql_procs(&c, &["init", &dbs, mode]));
        assert_eq!(got.trim(), mode.to_lowercase(), "[{}] journal_mode", c.name);
        let stop = c.dir("stop");
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                sql_procs(&c, &["reader", &dbs, s(&stop)])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                sql_procs(&c, &["writer", &dbs, &w.to_string(), &n_rows.to_string()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut committed = Vec::new();
        for (w, p) in writers.into_iter().enumerate() {
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "[{}] writer {w}: {}",
                c.name,
                show(&out)
            );
            let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f[0], "committed", "writer {w}: {line}");
            assert_eq!(f[3], mode.to_lowercase(), "writer {w}: {line}");
            committed.push((w as u64, f[2].parse::<u64>().unwrap()));
        }
        std::fs::write(&stop, "").unwrap();
        for (r, p) in readers.into_iter().enumerate() {
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "[{}] reader {r}: {}",
                c.name,
                show(&out)
            );
            let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f[0], "checks", "reader {r}: {line}");
            assert!(f[1].parse::<u64>().unwrap() > 0);
            // Its last check came after every writer was done.
            assert_eq!(f[2], (WRITERS * n_rows).to_string(), "reader {r}: {line}");
        }
        t.step(&format!(
            "{WRITERS} writers x {n_rows} transactions + {READERS} readers"
        ));
        assert!(
            committed.iter().all(|&(_, n)| n == n_rows as u64),
            "{committed:?}"
        );

        let digest = run("digest on the mount", &mut sql_procs(&c, &["digest", &dbs]));
        let want_rows = format!(
            "['ok'] [{}]",
            committed
                .iter()
                .map(|(w, n)| format!("({w}, {n})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(
            digest.starts_with(&want_rows),
            "[{}] on the mount: {digest} (want {want_rows})",
            c.name
        );
        assert!(digest.trim().ends_with(&mode.to_lowercase()), "{digest}");

        let gen = m.sync();
        let restored = c.dir("restored");
        c.ok(&["restore", &format!("ws@{gen}"), s(&restored)]);
        let there = restored.join("app.db");
        let digest2 = run(
            "digest of the restore",
            &mut sql_procs(&c, &["digest", s(&there)]),
        );
        assert_eq!(
            digest2, digest,
            "[{}] the restored database differs",
            c.name
        );
        t.step(&format!(
            "integrity_check, sync (generation {gen}), restore"
        ));
        m.umount();
    }
}

#[test]
fn sqlite_concurrent_processes_wal() {
    sqlite_processes("WAL");
}

#[test]
fn sqlite_concurrent_processes_rollback_journal() {
    sqlite_processes("DELETE");
}

const SQLITE_SCRIPT: &str = "
CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT NOT NULL, c BLOB);
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 3000)
  INSERT INTO t SELECT x, printf('row %d %s', x, hex(x * x)), zeroblob(x % 700) FROM n;
CREATE INDEX t_b ON t(b);
CREATE VIEW v AS SELECT a, length(c) AS len FROM t WHERE a % 7 = 0;
CREATE TRIGGER t_del AFTER DELETE ON t BEGIN INSERT INTO gone VALUES (old.a); END;
CREATE TABLE gone(a INTEGER);
BEGIN;
UPDATE t SET b = upper(b) WHERE a % 3 = 0;
DELETE FROM t WHERE a % 11 = 0;
COMMIT;
BEGIN;
INSERT INTO t(b) VALUES ('rolled back');
ROLLBACK;
VACUUM;
";

/// Runs the sqlite3 CLI script on `db` (in `mode`), returns `.dump` and integrity_check.
fn sqlite_cli(db: &Path, mode: &str) -> (String, String) {
    let script = db.with_extension("sql");
    std::fs::write(
        &script,
        format!("PRAGMA journal_mode={mode};\n{SQLITE_SCRIPT}"),
    )
    .unwrap();
    let what = format!("sqlite3 {}", db.display());
    let out = run(
        &what,
        Command::new("sqlite3")
            .arg(db)
            .arg(format!(".read {}", s(&script))),
    );
    assert_eq!(out.trim(), mode.to_lowercase(), "{what}");
    let dump = run(&what, Command::new("sqlite3").arg(db).arg(".dump"));
    let check = run(
        &what,
        Command::new("sqlite3")
            .arg(db)
            .arg("PRAGMA integrity_check"),
    );
    (dump, check)
}

#[test]
fn sqlite3_cli_dump_matches_local_disk() {
    for c in Case::all() {
        let mut t = Clock::new(&c, "sqlite3 cli");
        let local = c.dir("local");
        std::fs::create_dir_all(&local).unwrap();
        let m = c.mount_rw("ws", "mnt", &[]);
        for mode in ["DELETE", "WAL"] {
            let name = format!("cli-{mode}.db");
            let want = sqlite_cli(&local.join(&name), mode);
            assert_eq!(want.1, "ok\n");
            assert!(want.0.contains("CREATE TRIGGER t_del") && want.0.len() > 100_000);
            let got = sqlite_cli(&m.path(&name), mode);
            assert_eq!(
                got.1, "ok\n",
                "[{}] integrity_check on the mount ({mode})",
                c.name
            );
            assert!(
                got.0 == want.0,
                "[{}] .dump differs on the mount ({mode})",
                c.name
            );
        }
        t.step("sqlite3 CLI, DELETE and WAL, local and mount");
        let gen = m.sync();
        let restored = c.dir("restored");
        c.ok(&["restore", &format!("ws@{gen}"), s(&restored)]);
        for mode in ["DELETE", "WAL"] {
            let db = restored.join(format!("cli-{mode}.db"));
            let local_dump = run(
                "dump",
                Command::new("sqlite3")
                    .arg(local.join(format!("cli-{mode}.db")))
                    .arg(".dump"),
            );
            let dump = run("dump", Command::new("sqlite3").arg(&db).arg(".dump"));
            assert!(
                dump == local_dump,
                "[{}] .dump of the restore differs ({mode})",
                c.name
            );
        }
        t.step(&format!("sync (generation {gen}) + restore + dump"));
        m.umount();
    }
}
