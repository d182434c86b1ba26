//! Test data and test stores, shared by this crate's unit tests, the lease's tests and the
//! end-to-end tests. Compiled only with the `faults` feature, like the fault injector.

/// Deterministic pseudo-random bytes (xorshift): incompressible test data.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A fresh bucket on the S3 server named by `OWFS_TEST_S3_ENDPOINT` (e.g. a `moto_server`),
/// as an object store and its URL; None (and a line saying so) if the variable is unset.
/// `tag` goes into the bucket's name.
pub fn s3_test_bucket(
    tag: &str,
) -> Option<(std::sync::Arc<dyn object_store::ObjectStore>, String)> {
    let Ok(endpoint) = std::env::var("OWFS_TEST_S3_ENDPOINT") else {
        println!("OWFS_TEST_S3_ENDPOINT is unset: skipping the S3 part of this test");
        return None;
    };
    let bucket = format!(
        "owfs-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let ok = std::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-X", "PUT"])
        .arg(format!("{endpoint}/{bucket}"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "creating bucket {bucket} at {endpoint}");
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .expect("an S3 client for the test server");
    Some((std::sync::Arc::new(s3), format!("s3://{bucket}")))
}

/// A `file://` store at `root` (which must exist) behind the fault injector, configured by
/// `spec` in the syntax of `OWFS_FAULTS` (see `faulty`).
pub fn faulty_file_store(root: &std::path::Path, spec: &str) -> crate::Store {
    use crate::faulty::{FaultConfig, FaultyStore};
    let fs = object_store::local::LocalFileSystem::new_with_prefix(root)
        .expect("a local object store at an existing directory");
    let inner = FaultyStore::new(std::sync::Arc::new(fs), FaultConfig::parse(spec));
    crate::Store::from_object_store(
        std::sync::Arc::new(inner),
        &format!("file://{}", root.display()),
    )
}

/// A new repository on a `file://` store at `dir`, and the runtime its requests run on (keep
/// both alive as long as the repository is used).
pub fn file_repo(dir: &std::path::Path) -> (tokio::runtime::Runtime, std::sync::Arc<crate::Repo>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let store = crate::Store::open(&format!("file://{}", dir.display())).expect("a file store");
    let repo = crate::Repo::open(store, rt.handle().clone(), true).expect("a repository");
    (rt, repo)
}
