//! Access to the object store: one abstraction (`object_store`) for `file://` and `s3://`,
//! a key prefix, bounded retries of transient errors, request counters, and the mapping of
//! the store's errors to ours.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Error, Result};
use crate::faulty::{FaultConfig, FaultyStore};

/// Attempts per request for transient failures (the S3 client retries inside as well).
const MAX_ATTEMPTS: u32 = 4;
const BACKOFF_BASE_MS: u64 = 50;

/// Requests made, by kind: what the benchmarks and `--json` outputs report.
#[derive(Debug, Default)]
pub struct Counters {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub bytes_put: AtomicU64,
    pub bytes_got: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CounterSnapshot {
    pub puts: u64,
    pub gets: u64,
    pub lists: u64,
    pub deletes: u64,
    pub bytes_put: u64,
    pub bytes_got: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            puts: self.puts.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            bytes_put: self.bytes_put.load(Ordering::Relaxed),
            bytes_got: self.bytes_got.load(Ordering::Relaxed),
        }
    }
}

/// An object listed from the store.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Key relative to the store's prefix.
    pub key: String,
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// Outcome of a create-if-absent write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Yes,
    /// Something is already there: maybe our own earlier attempt. The caller re-reads.
    AlreadyExists,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    /// Opens `file:///abs/path` or `s3://bucket/prefix`. `OWFS_FAULTS` (testing only) wraps the
    /// store in a fault injector; see `faulty.rs`.
    pub fn open(url: &str) -> Result<Store> {
        Store::open_with(url, true)
    }

    /// With `create` false, a `file://` store that does not exist is not created (reads of
    /// it find nothing).
    pub fn open_with(url: &str, create: bool) -> Result<Store> {
        let bad = |reason: &str| Error::BadStoreUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let (inner, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme() {
            "file" => {
                let dir = parsed.to_file_path().map_err(|_| {
                    bad("file:// needs an absolute path, e.g. file:///var/lib/owfs/store")
                })?;
                if create {
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                } else if !dir.is_dir() {
                    return Err(Error::Unreachable {
                        store: url.to_string(),
                        detail: format!(
                            "there is no store at {} (nothing was ever committed there)",
                            dir.display()
                        ),
                    });
                }
                // Durability: a published generation must survive a power cut (fsync of the
                // file and its directory on every write).
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(&e.to_string()))?
                    .with_fsync(true);
                (Arc::new(fs), Path::default())
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("s3:// needs a bucket: s3://bucket/prefix"))?;
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(object_store::RetryConfig {
                        backoff: Default::default(),
                        max_retries: 3,
                        retry_timeout: Duration::from_secs(30),
                    });
                // Plain HTTP only when the endpoint URL itself says http://.
                let endpoint =
                    std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT"));
                if let Ok(endpoint) = endpoint {
                    builder = builder
                        .with_endpoint(&endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    builder = builder.with_region("us-east-1");
                }
                let s3 = builder.build().map_err(|e| bad(&e.to_string()))?;
                let prefix = Path::parse(parsed.path().trim_matches('/'))
                    .map_err(|e| bad(&e.to_string()))?;
                (Arc::new(s3), prefix)
            }
            other => {
                return Err(bad(&format!(
                    "unknown scheme {other:?}; use file:///abs/path or s3://bucket/prefix"
                )))
            }
        };
        let inner: Arc<dyn ObjectStore> = match FaultConfig::from_env() {
            Some(cfg) => Arc::new(FaultyStore::new(inner, cfg)),
            None => inner,
        };
        Ok(Store {
            inner,
            prefix,
            url: url.to_string(),
            counters: Arc::default(),
        })
    }

    /// Wraps an arbitrary `ObjectStore` (tests use this with a fault injector).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str) -> Store {
        Store {
            inner,
            prefix: Path::default(),
            url: url.to_string(),
            counters: Arc::default(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    fn path(&self, key: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in key.split('/') {
            p = p.clone().join(part);
        }
        p
    }

    fn rel(&self, p: &Path) -> String {
        let full = p.as_ref();
        let pre = self.prefix.as_ref();
        if pre.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(pre)
                .unwrap_or(full)
                .trim_start_matches('/')
                .to_string()
        }
    }

    fn listed(&self, metas: Vec<object_store::ObjectMeta>) -> Vec<Listed> {
        metas
            .into_iter()
            .map(|m| Listed {
                key: self.rel(&m.location),
                size: m.size,
                modified_ms: m.last_modified.timestamp_millis(),
            })
            .collect()
    }

    fn map_err(&self, key: &str, e: object_store::Error) -> Error {
        map_store_error(&self.url, key, e)
    }

    async fn retry<T, F, Fut>(&self, key: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let err = self.map_err(key, e);
                    if !err.is_transient() || attempt >= MAX_ATTEMPTS {
                        return Err(err);
                    }
                    let delay = BACKOFF_BASE_MS << (attempt - 1);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
            }
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key);
        let bytes = self
            .retry(key, || async {
                self.counters.gets.fetch_add(1, Ordering::Relaxed);
                self.inner.get(&path).await?.bytes().await
            })
            .await?;
        self.counters
            .bytes_got
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Like `get`, but a missing object is `None`.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(Error::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let path = self.path(key);
        let want = range.end - range.start;
        let bytes = self
            .retry(key, || async {
                self.counters.gets.fetch_add(1, Ordering::Relaxed);
                self.inner.get_range(&path, range.clone()).await
            })
            .await?;
        if bytes.len() as u64 != want {
            return Err(Error::corrupt(format!(
                "{key}: asked for {want} bytes at {}, got {} (truncated object?)",
                range.start,
                bytes.len()
            )));
        }
        self.counters.bytes_got.fetch_add(want, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Unconditional write: only for immutable, content-addressed objects (packs, indexes)
    /// and for hints that no reader trusts without checking.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key);
        let len = data.len() as u64;
        self.retry(key, || async {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
            self.inner.put(&path, PutPayload::from(data.clone())).await
        })
        .await?;
        self.counters.bytes_put.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Create-if-absent (S3 `If-None-Match: *`, a hard link on local disk). After a retried
    /// ambiguous failure `AlreadyExists` may be our own first attempt: callers re-read.
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Created> {
        let path = self.path(key);
        let len = data.len() as u64;
        let res = self
            .retry(key, || async {
                self.counters.puts.fetch_add(1, Ordering::Relaxed);
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match self
                    .inner
                    .put_opts(&path, PutPayload::from(data.clone()), opts)
                    .await
                {
                    Ok(_) => Ok(Created::Yes),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(Created::AlreadyExists),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if res == Created::Yes {
            self.counters.bytes_put.fetch_add(len, Ordering::Relaxed);
        }
        Ok(res)
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        let res = self
            .retry(key, || async {
                self.counters.deletes.fetch_add(1, Ordering::Relaxed);
                self.inner.delete(&path).await
            })
            .await;
        match res {
            Ok(()) | Err(Error::Missing { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix` (a key prefix ending at a `/` boundary).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let path = self.path(prefix.trim_end_matches('/'));
        self.retry(prefix, || async {
            self.counters.lists.fetch_add(1, Ordering::Relaxed);
            self.inner.list(Some(&path)).try_collect::<Vec<_>>().await
        })
        .await
        .map(|metas| self.listed(metas))
    }

    /// Objects under `prefix` whose key sorts after `after` (S3 pushes this down as StartAfter).
    pub async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<Listed>> {
        let path = self.path(prefix.trim_end_matches('/'));
        let offset = self.path(after);
        self.retry(prefix, || async {
            self.counters.lists.fetch_add(1, Ordering::Relaxed);
            self.inner
                .list_with_offset(Some(&path), &offset)
                .try_collect::<Vec<_>>()
                .await
        })
        .await
        .map(|metas| self.listed(metas))
    }

    /// Names of the immediate "directories" under `prefix`.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.path(prefix.trim_end_matches('/'));
        let res = self
            .retry(prefix, || async {
                self.counters.lists.fetch_add(1, Ordering::Relaxed);
                self.inner.list_with_delimiter(Some(&path)).await
            })
            .await;
        let res = match res {
            Ok(r) => r,
            Err(Error::Missing { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(res
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(|s| s.to_string()))
            .collect())
    }
}

/// Sorts an `object_store` error into our kinds: by variant, then by the HTTP or I/O error
/// found in its source chain. Never by the message text, which contains keys and URLs.
fn map_store_error(store: &str, key: &str, e: object_store::Error) -> Error {
    let store = store.to_string();
    let detail = e.to_string();
    // A missing bucket has no variant of its own (S3 answers 404 or 400); its body names it.
    if detail.contains("<Code>NoSuchBucket</Code>") {
        return Error::Unreachable {
            store,
            detail: "the bucket does not exist".into(),
        };
    }
    match e {
        object_store::Error::NotFound { .. } => Error::Missing {
            key: key.to_string(),
            what: "not found".into(),
        },
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Error::AccessDenied { store, detail },
        other => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> =
                std::error::Error::source(&other);
            for _ in 0..16 {
                let Some(err) = cur else { break };
                if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
                    use object_store::client::HttpErrorKind as K;
                    if matches!(
                        h.kind(),
                        K::Connect | K::Request | K::Timeout | K::Interrupted
                    ) {
                        return Error::Unreachable { store, detail };
                    }
                }
                if let Some(io) = err.downcast_ref::<std::io::Error>() {
                    if io.kind() == std::io::ErrorKind::PermissionDenied {
                        return Error::AccessDenied { store, detail };
                    }
                }
                cur = err.source();
            }
            Error::Store {
                store,
                detail: format!("{key}: {detail}"),
            }
        }
    }
}

/// Runs async store work from synchronous code. The callers are plain threads, never runtime
/// workers, so `block_on` is always allowed.
pub fn block_on<F: std::future::Future>(handle: &tokio::runtime::Handle, f: F) -> F::Output {
    handle.block_on(f)
}
