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
#[cfg(feature = "faults")]
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
    /// `file://`: mutable objects use the local versioned scheme (see `put_cas`).
    local: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    /// Opens `file:///abs/path` or `s3://bucket/prefix`. In builds with the `faults` feature
    /// (tests only), `OWFS_FAULTS` wraps the store in a fault injector; see `faulty.rs`.
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
                    crate::private::private_dir(&dir)?;
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
        #[cfg(feature = "faults")]
        let inner: Arc<dyn ObjectStore> = match FaultConfig::from_env() {
            Some(cfg) => Arc::new(FaultyStore::new(inner, cfg)),
            None => inner,
        };
        Ok(Store {
            inner,
            prefix,
            url: url.to_string(),
            counters: Arc::default(),
            local: parsed.scheme() == "file",
        })
    }

    /// Wraps an arbitrary `ObjectStore` (tests use this with a fault injector).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str) -> Store {
        Store {
            inner,
            prefix: Path::default(),
            url: url.to_string(),
            counters: Arc::default(),
            local: url.starts_with("file:"),
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

    /// Server-side copy of `from` to `to` (S3 CopyObject: no bytes travel through this
    /// process; counted as a PUT, which is how S3 bills it).
    pub async fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (src, dst) = (self.path(from), self.path(to));
        self.retry(from, || async {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
            self.inner.copy(&src, &dst).await
        })
        .await
    }

    /// Create-if-absent (S3 `If-None-Match: *`, a hard link on local disk). After a retried
    /// ambiguous failure `AlreadyExists` may be our own first attempt: callers re-read.
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Created> {
        let created = self.put_conditional(key, PutMode::Create, data).await?;
        Ok(if created.is_some() {
            Created::Yes
        } else {
            Created::AlreadyExists
        })
    }

    /// A conditional write (`mode`: create, or update from an ETag): `Some(ETag of the reply)`
    /// when written, `None` when a precondition refused it (maybe after our own earlier
    /// attempt landed: callers re-read).
    async fn put_conditional(
        &self,
        key: &str,
        mode: PutMode,
        data: Bytes,
    ) -> Result<Option<Option<String>>> {
        let path = self.path(key);
        let len = data.len() as u64;
        let update = matches!(mode, PutMode::Update(_));
        let res = self
            .retry(key, || async {
                self.counters.puts.fetch_add(1, Ordering::Relaxed);
                let opts = PutOptions {
                    mode: mode.clone(),
                    ..Default::default()
                };
                match self
                    .inner
                    .put_opts(&path, PutPayload::from(data.clone()), opts)
                    .await
                {
                    Ok(r) => Ok(Some(r.e_tag)),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(None),
                    // An update of an object that is gone.
                    Err(object_store::Error::NotFound { .. }) if update => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if res.is_some() {
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

    /// The first key under `prefix` after `after`: one listing request (a page), whatever
    /// follows.
    pub async fn first_after(&self, prefix: &str, after: &str) -> Result<Option<Listed>> {
        // A local directory lists in no particular order (and costs no request): the least.
        if self.local {
            let mut all = self.list_after(prefix, after).await?;
            all.sort_by(|a, b| a.key.cmp(&b.key));
            return Ok(all.into_iter().next());
        }
        // S3 lists in key order, a page at a time: the first of the first page.
        let path = self.path(prefix.trim_end_matches('/'));
        let offset = self.path(after);
        let first = self
            .retry(prefix, || async {
                self.counters.lists.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .list_with_offset(Some(&path), &offset)
                    .try_next()
                    .await
            })
            .await?;
        Ok(first.map(|m| self.listed(vec![m]).remove(0)))
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

/// Opaque version of a mutable object (S3: ETag; file://: the version number of the local scheme).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(String);

impl Version {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Outcome of a compare-and-swap (`Store::put_cas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    Won,
    /// Another writer changed the object first; nothing of ours is current.
    Lost,
}

/// Versions of a `file://` mutable object kept after a win (the newest ones). A writer whose
/// create succeeded lost only if a version at least this far ahead exists: see `put_cas`.
pub const LOCAL_KEEP_VERSIONS: u64 = 64;

/// How often `get_versioned` re-lists on `file://` when the newest version vanishes under it.
const LOCAL_MAX_RELIST: u32 = 100;

enum CasOutcome {
    /// With the new version when known.
    Won(Option<Version>),
    Lost,
}

fn local_version_key(key: &str, n: u64) -> String {
    format!("{key}.v/{n:020}")
}

/// Compare-and-swap of mutable objects (the lease).
///
/// S3: a conditional PUT (`If-Match: <ETag>`, or `If-None-Match: *` for a new object).
///
/// `file://` (`LocalFileSystem` has no conditional update): object `key` is a series of
/// immutable versions `key.v/<n, 20 digits>`, each created if absent (a hard link, so it goes
/// through the fault injector like any request); the current one is the highest present.
/// CAS from n creates n+1. A version is deleted only by the winner of a version at least
/// `LOCAL_KEEP_VERSIONS` higher, so the highest version present never decreases, and a
/// stalled writer can only re-create a deleted number while a version that far ahead exists:
/// its check after creating sees it and reports `Lost`. A winner that is merely followed by
/// quicker writers (fewer than `LOCAL_KEEP_VERSIONS` of them) still sees its win.
impl Store {
    /// Reads a mutable object with its version; None if absent.
    pub async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Version)>> {
        if self.local {
            let got = self.local_get_versioned(key).await?;
            return Ok(got.map(|(bytes, n)| (bytes, Version(n.to_string()))));
        }
        let path = self.path(key);
        let res = self
            .retry(key, || async {
                self.counters.gets.fetch_add(1, Ordering::Relaxed);
                let got = self.inner.get_opts(&path, Default::default()).await?;
                let e_tag = got.meta.e_tag.clone();
                Ok((got.bytes().await?, e_tag))
            })
            .await;
        let (bytes, e_tag) = match res {
            Ok(v) => v,
            Err(Error::Missing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.counters
            .bytes_got
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let e_tag = e_tag.ok_or_else(|| Error::Store {
            store: self.url.clone(),
            detail: format!(
                "{key}: the store returned no ETag, which conditional writes need \
                 (use a store that supports If-Match)"
            ),
        })?;
        Ok(Some((bytes, Version(e_tag))))
    }

    /// Writes `data` if the object is still at `expected` (None = must be absent).
    /// `Lost` when another writer changed it first. Handles ambiguous failures itself:
    /// after a retried error that reports Precondition/AlreadyExists, re-read and compare
    /// the bytes with `data` (callers put a random nonce in every body, so equal bytes
    /// mean our own attempt landed -> Won).
    ///
    /// One case stays ambiguous on S3: our write landed, its reply was lost, and another
    /// writer replaced it before our re-read. That is reported as `Lost` (our value is no
    /// longer current, though it may have been read). On `file://` the version stays
    /// readable, so the answer is exact unless `LOCAL_KEEP_VERSIONS` writes passed meanwhile.
    pub async fn put_cas(&self, key: &str, expected: Option<&Version>, data: Bytes) -> Result<Cas> {
        Ok(match self.cas(key, expected, data).await? {
            CasOutcome::Won(_) => Cas::Won,
            CasOutcome::Lost => Cas::Lost,
        })
    }

    /// `put_cas` that also returns the new version when it wins (`None` = lost), so that the
    /// next CAS needs no re-read.
    pub async fn put_cas_versioned(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> Result<Option<Version>> {
        match self.cas(key, expected, data).await? {
            CasOutcome::Won(Some(v)) => Ok(Some(v)),
            CasOutcome::Won(None) => Err(Error::Store {
                store: self.url.clone(),
                detail: format!(
                    "{key}: a conditional write succeeded, but the store returned no ETag \
                     (use a store that supports If-Match)"
                ),
            }),
            CasOutcome::Lost => Ok(None),
        }
    }

    async fn cas(&self, key: &str, expected: Option<&Version>, data: Bytes) -> Result<CasOutcome> {
        if self.local {
            return Ok(match self.local_put_cas(key, expected, data).await? {
                Some(v) => CasOutcome::Won(Some(v)),
                None => CasOutcome::Lost,
            });
        }
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(object_store::UpdateVersion {
                e_tag: Some(v.0.clone()),
                version: None,
            }),
        };
        let written = match self.put_conditional(key, mode, data.clone()).await? {
            Some(Some(e_tag)) => return Ok(CasOutcome::Won(Some(Version(e_tag)))),
            Some(None) => true,
            None => false,
        };
        // Refused, or written without an ETag in the reply: what is there now?
        Ok(match self.get_versioned(key).await? {
            Some((bytes, version)) if bytes == data => CasOutcome::Won(Some(version)),
            _ if written => CasOutcome::Won(None),
            _ => CasOutcome::Lost,
        })
    }

    /// Version numbers present for `key` on `file://`, ascending.
    async fn local_versions(&self, key: &str) -> Result<Vec<u64>> {
        let dir = format!("{key}.v");
        let listed = match self.list(&dir).await {
            Ok(l) => l,
            Err(Error::Missing { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let pre = format!("{dir}/");
        let mut ns: Vec<u64> = listed
            .iter()
            .filter_map(|l| l.key.strip_prefix(&pre))
            .filter(|name| name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|name| name.parse().ok())
            .collect();
        ns.sort_unstable();
        Ok(ns)
    }

    async fn local_get_versioned(&self, key: &str) -> Result<Option<(Bytes, u64)>> {
        for _ in 0..LOCAL_MAX_RELIST {
            let Some(&n) = self.local_versions(key).await?.last() else {
                return Ok(None);
            };
            // Gone: a newer version won and removed it meanwhile; list again.
            if let Some(bytes) = self.get_opt(&local_version_key(key, n)).await? {
                return Ok(Some((bytes, n)));
            }
        }
        Err(Error::Store {
            store: self.url.clone(),
            detail: format!(
                "{key}: its newest version kept disappearing while being read \
                 ({LOCAL_MAX_RELIST} tries)"
            ),
        })
    }

    async fn local_put_cas(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> Result<Option<Version>> {
        let n: u64 = match expected {
            None => 0,
            Some(v) => v.0.parse().map_err(|_| Error::Store {
                store: self.url.clone(),
                detail: format!("{key}: {:?} is not a version of a file:// store", v.0),
            })?,
        };
        let target = n + 1;
        let vkey = local_version_key(key, target);
        match self.put_if_absent(&vkey, data.clone()).await? {
            Created::Yes => {}
            // Another writer's, or our own attempt whose reply was lost (equal bytes).
            Created::AlreadyExists => match self.get_opt(&vkey).await? {
                Some(bytes) if bytes == data => {}
                _ => return Ok(None),
            },
        }
        let versions = self.local_versions(key).await?;
        let newest = versions.last().copied().unwrap_or(target);
        if newest >= target + LOCAL_KEEP_VERSIONS {
            // `target` had been deleted: we re-created a number that was won long ago (a
            // stalled writer). Never current; remove it (best effort).
            let _ = self.delete(&vkey).await;
            return Ok(None);
        }
        for &old in versions
            .iter()
            .take_while(|&&v| v + LOCAL_KEEP_VERSIONS <= target)
        {
            let _ = self.delete(&local_version_key(key, old)).await;
        }
        Ok(Some(Version(target.to_string())))
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

#[cfg(test)]
mod cas_tests {
    use super::*;
    use crate::faulty::{FaultConfig, FaultyStore};
    use crate::testdata::faulty_file_store;

    fn file_store(dir: &std::path::Path) -> Store {
        Store::open(&format!("file://{}", dir.display())).unwrap()
    }

    /// A store in a fresh bucket of the S3 endpoint in `OWFS_TEST_S3_ENDPOINT` (e.g. a
    /// `moto_server`), optionally behind a fault injector; None (and a line saying so) if unset.
    fn s3_store(faults: Option<&str>) -> Option<Store> {
        let (s3, url) = crate::testdata::s3_test_bucket("cas")?;
        let inner: Arc<dyn ObjectStore> = match faults {
            Some(spec) => Arc::new(FaultyStore::new(s3, FaultConfig::parse(spec))),
            None => s3,
        };
        Some(Store::from_object_store(inner, &url))
    }

    fn counter(body: &[u8]) -> u64 {
        let s = std::str::from_utf8(body).unwrap();
        s.split(' ').next().unwrap().parse().unwrap()
    }

    fn body(n: u64) -> Bytes {
        Bytes::from(format!("{n} {:032x}", rand::random::<u128>()))
    }

    /// Increments the counter in `key` by CAS until it wins; returns (value written, losses).
    async fn increment(store: &Store, key: &str) -> (u64, u64) {
        let mut lost = 0;
        loop {
            let cur = store.get_versioned(key).await.unwrap();
            let (n, version) = match cur {
                None => (0, None),
                Some((b, v)) => (counter(&b), Some(v)),
            };
            match store
                .put_cas(key, version.as_ref(), body(n + 1))
                .await
                .unwrap()
            {
                Cas::Won => return (n + 1, lost),
                Cas::Lost => lost += 1,
            }
        }
    }

    /// `tasks` concurrent incrementers, `each` wins apiece: every value 1..=tasks*each is
    /// written by exactly one win (no lost update, no double win), and the final counter is
    /// the number of wins. Not `exact`: S3 with lost acks, where a write that landed but was
    /// overwritten by another writer before our re-read counts as lost (see `put_cas`); then
    /// no value is won twice and the counter is at least the number of wins.
    async fn concurrent_increments(store: &Store, tasks: u64, each: u64, exact: bool) {
        let key = "ws/w/counter";
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let mut won = Vec::new();
                let mut lost = 0;
                for _ in 0..each {
                    let (v, l) = increment(&store, key).await;
                    won.push(v);
                    lost += l;
                }
                (won, lost)
            }));
        }
        let mut all = Vec::new();
        let mut lost = 0;
        for h in handles {
            let (won, l) = h.await.unwrap();
            all.extend(won);
            lost += l;
        }
        all.sort_unstable();
        let (b, _) = store.get_versioned(key).await.unwrap().unwrap();
        let last = counter(&b);
        if exact {
            let expect: Vec<u64> = (1..=tasks * each).collect();
            assert_eq!(all, expect, "each value won exactly once");
            assert_eq!(last, tasks * each, "final counter = number of wins");
        } else {
            let n = all.len();
            all.dedup();
            assert_eq!(all.len(), n, "no value won twice: {all:?}");
            assert!(
                last >= tasks * each && all.last() == Some(&last),
                "{last} {all:?}"
            );
        }
        println!("{}: {} wins, {lost} lost races", store.url(), tasks * each);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_cas_increments_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store(dir.path());
        concurrent_increments(&store, 8, 50, true).await;
        // Only the newest versions are kept.
        let kept = store.local_versions("ws/w/counter").await.unwrap();
        assert!(kept.len() as u64 <= LOCAL_KEEP_VERSIONS, "{}", kept.len());
        assert_eq!(kept.last(), Some(&400));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_cas_increments_with_lost_acks_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = faulty_file_store(dir.path(), "seed=7,put_lost_ack=0.5");
        concurrent_increments(&store, 4, 25, true).await;
    }

    #[tokio::test]
    async fn cas_basics_and_lost_acks() {
        let dir = tempfile::tempdir().unwrap();
        let mut stores = vec![
            file_store(&dir.path().join("plain")),
            faulty_file_store(dir.path(), "put_lost_ack=1"),
        ];
        stores.extend(s3_store(None));
        stores.extend(s3_store(Some("put_lost_ack=1")));
        for store in &stores {
            let key = "ws/w/lease";
            assert!(store.get_versioned(key).await.unwrap().is_none());
            let a = body(1);
            assert_eq!(store.put_cas(key, None, a.clone()).await.unwrap(), Cas::Won);
            assert_eq!(store.put_cas(key, None, body(1)).await.unwrap(), Cas::Lost);
            let (got, v1) = store.get_versioned(key).await.unwrap().unwrap();
            assert_eq!(got, a);
            let b = body(2);
            let v2 = store
                .put_cas_versioned(key, Some(&v1), b.clone())
                .await
                .unwrap()
                .expect("won");
            assert_ne!(v1, v2);
            // The old version no longer matches.
            assert_eq!(
                store.put_cas(key, Some(&v1), body(2)).await.unwrap(),
                Cas::Lost,
                "{store:?}"
            );
            let (got, v) = store.get_versioned(key).await.unwrap().unwrap();
            assert_eq!((got, &v), (b, &v2));
            assert_eq!(
                store.put_cas(key, Some(&v2), body(3)).await.unwrap(),
                Cas::Won
            );
        }
    }

    #[tokio::test]
    async fn stalled_writer_recreating_a_deleted_version_loses_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store(dir.path());
        let key = "ws/w/lease";
        assert_eq!(store.put_cas(key, None, body(1)).await.unwrap(), Cas::Won);
        let (_, v1) = store.get_versioned(key).await.unwrap().unwrap();
        assert_eq!(v1.as_str(), "1");
        // Others move on far enough that versions 1 and 2 are deleted.
        for _ in 0..LOCAL_KEEP_VERSIONS + 3 {
            increment(&store, key).await;
        }
        let before = store.local_versions(key).await.unwrap();
        assert!(!before.contains(&1) && !before.contains(&2), "{before:?}");
        let newest = *before.last().unwrap();

        // The stalled writer wakes up: its create of version 2 succeeds, and it must lose.
        assert_eq!(
            store.put_cas(key, Some(&v1), body(2)).await.unwrap(),
            Cas::Lost
        );
        // So must a writer that thinks the object is absent (version 1 is free again).
        assert_eq!(store.put_cas(key, None, body(1)).await.unwrap(), Cas::Lost);
        let after = store.local_versions(key).await.unwrap();
        assert_eq!(after, before, "the stale versions were removed again");
        let (b, v) = store.get_versioned(key).await.unwrap().unwrap();
        assert_eq!(counter(&b), newest);
        assert_eq!(v.as_str(), newest.to_string());

        // A version taken by someone else in the window is a plain loss.
        let stale = Version((newest - 1).to_string());
        assert_eq!(
            store.put_cas(key, Some(&stale), body(9)).await.unwrap(),
            Cas::Lost
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_cas_increments_s3() {
        if let Some(store) = s3_store(None) {
            concurrent_increments(&store, 8, 15, true).await;
        }
        if let Some(store) = s3_store(Some("seed=3,put_lost_ack=0.5")) {
            concurrent_increments(&store, 4, 10, false).await;
        }
    }
}
