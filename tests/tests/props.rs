//! Property test: random trees round-trip exactly through snapshot and restore, and a
//! mutated tree's second snapshot restores exactly too.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chunkstore::progress::Progress;
use chunkstore::publish;
use owfs_tests::{assert_same_tree, noise, restore, runtime, Case};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Node {
    File {
        data: Vec<u8>,
        hole_at: Option<u32>,
        mode: u32,
    },
    Big {
        seed: u64,
        len: u32,
    },
    Dir(Vec<(Vec<u8>, Node)>),
    Symlink(Vec<u8>),
    HardLinkToFirstFile,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z]{1,8}".prop_map(|s| s.into_bytes()),
        "[ -~]{1,12}".prop_map(|s| s.into_bytes()),
        "\\PC{1,6}".prop_map(|s| s.into_bytes()),
        proptest::collection::vec(1u8..=255, 1..10),
    ]
    .prop_filter("a valid file name", |n| {
        !n.contains(&b'/') && !n.contains(&0) && n.as_slice() != b"." && n.as_slice() != b".."
    })
}

fn leaf() -> impl Strategy<Value = Node> {
    prop_oneof![
        4 => (proptest::collection::vec(any::<u8>(), 0..3000), proptest::option::of(0u32..1 << 20), prop_oneof![Just(0o644u32), Just(0o600), Just(0o755), Just(0o4755)])
            .prop_map(|(data, hole_at, mode)| Node::File { data, hole_at, mode }),
        1 => (any::<u64>(), 0u32..(3 << 20)).prop_map(|(seed, len)| Node::Big { seed, len }),
        1 => name().prop_map(Node::Symlink),
        1 => Just(Node::HardLinkToFirstFile),
    ]
}

fn tree() -> impl Strategy<Value = Node> {
    leaf().prop_recursive(6, 64, 8, |inner| {
        proptest::collection::vec((name(), inner), 0..8).prop_map(|mut v| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.dedup_by(|a, b| a.0 == b.0);
            Node::Dir(v)
        })
    })
}

fn build(path: &Path, node: &Node, first_file: &mut Option<PathBuf>) {
    match node {
        Node::Dir(children) => {
            std::fs::create_dir_all(path).unwrap();
            for (n, c) in children {
                build(&path.join(OsStr::from_bytes(n)), c, first_file);
            }
        }
        Node::File {
            data,
            hole_at,
            mode,
        } => {
            let f = std::fs::File::create(path).unwrap();
            if let Some(at) = hole_at {
                f.set_len(*at as u64).unwrap();
                f.write_all_at(data, *at as u64).unwrap();
            } else {
                f.write_all_at(data, 0).unwrap();
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).unwrap();
            first_file.get_or_insert(path.to_path_buf());
        }
        Node::Big { seed, len } => std::fs::write(path, noise(*len as usize, *seed)).unwrap(),
        Node::Symlink(target) => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path).unwrap()
        }
        Node::HardLinkToFirstFile => match first_file {
            Some(f) => std::fs::hard_link(f, path).unwrap(),
            None => std::fs::write(path, b"no file yet").unwrap(),
        },
    }
}

/// Appends to, truncates and deletes a few files: what the second snapshot must notice.
fn mutate(root: &Path, salt: u8) {
    let mut files = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(&e.path(), out);
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    walk(root, &mut files);
    files.sort();
    for (i, f) in files.iter().enumerate() {
        match (i + salt as usize) % 4 {
            0 => {
                let h = std::fs::OpenOptions::new().append(true).open(f).unwrap();
                h.write_all_at(&[salt; 100], 0).unwrap();
            }
            1 => std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .unwrap()
                .set_len(1)
                .unwrap(),
            2 => std::fs::remove_file(f).unwrap(),
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(t in tree(), salt in any::<u8>()) {
        let case = Case::file();
        let rt = runtime();
        let repo = case.repo(&rt);
        let src = case.dir("src");
        std::fs::create_dir_all(&src).unwrap();
        build(&src.join("root"), &t, &mut None);
        let progress = Progress::default();
        for round in 0..2 {
            if round == 1 {
                mutate(&src, salt);
            }
            let done = publish::snapshot(&repo, &src, "p", &progress).unwrap();
            let out = case.dir(&format!("out{round}"));
            let root = done.generation.root_hash().unwrap();
            restore(&repo, root, &out).unwrap();
            assert_same_tree(&src, &out);
        }
    }
}
