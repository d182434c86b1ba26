//! A store wrapper that fails, delays or truncates requests: the fault injector of the tests.
//! Compiled only with the `faults` feature, which the tests turn on and a release build of
//! owfs does not have (docs/decisions/faults-only-in-test-builds.md).
//!
//! Configured by `OWFS_FAULTS`, a comma-separated list:
//! `seed=N`, `delay_ms=N`, `slow_puts=N` (only the first N PUTs wait `delay_ms`; other requests
//! are not delayed), `put_fail=P` (fail before writing), `put_lost_ack=P` (write, then
//! report an error: the ambiguous case), `get_fail=P`, `get_truncate=P` (return a short body),
//! `list_fail=P`, `only=PREFIX` (fault only keys containing PREFIX), `down=1` (every request
//! fails as unreachable), `down_file=PATH` (like `down=1` while the file PATH exists, checked
//! on every request: a test cuts one daemon off from the store by creating it),
//! `fuse_write_delay_ms=N` (not a store fault: a mount's daemon waits N ms before serving each
//! WRITE, so the kernel's writeback is still in flight when a cut starts), `uring_stop_after=N`
//! (not a store fault either: each of the daemon's io_uring queue threads stops after taking N
//! requests, leaving the last unanswered), `commit_pause_ms=N` (the daemon's committer waits
//! N ms between its barrier and reading the frozen files), `barrier_pause_ms=N` (the committer
//! waits N ms between its flush of the kernel's pages and its barrier), `cut_attempts=N` (the barriers a
//! commit tries before it holds back names replaced by renames whose sources it has not
//! flushed yet; 1 holds them back at once). P is a probability in [0, 1].

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    pub seed: u64,
    pub delay_ms: u64,
    /// If set, only this many PUTs (the first ones) are delayed, and nothing else is.
    pub slow_puts: Option<u64>,
    pub put_fail: f64,
    pub put_lost_ack: f64,
    pub get_fail: f64,
    pub get_truncate: f64,
    pub list_fail: f64,
    pub only: Option<String>,
    pub down: bool,
    /// While this file exists, the store is down (checked per request).
    pub down_file: Option<std::path::PathBuf>,
    /// Read by the mount's daemon: each FUSE WRITE waits this long before it is served.
    pub fuse_write_delay_ms: u64,
    /// Read by the mount's daemon: an io_uring queue thread stops after this many requests.
    pub uring_stop_after: Option<u64>,
    /// Read by the mount's daemon: the committer waits this long after each barrier.
    pub commit_pause_ms: u64,
    /// Read by the mount's daemon: the committer waits this long before each barrier.
    pub barrier_pause_ms: u64,
    /// Read by the mount's daemon: barriers tried before names are held back.
    pub cut_attempts: Option<u32>,
}

impl FaultConfig {
    pub fn from_env() -> Option<FaultConfig> {
        let spec = std::env::var("OWFS_FAULTS").ok()?;
        if spec.trim().is_empty() {
            return None;
        }
        Some(FaultConfig::parse(&spec))
    }

    pub fn parse(spec: &str) -> FaultConfig {
        let mut c = FaultConfig::default();
        for item in spec.split(',') {
            let (k, v) = item.split_once('=').unwrap_or((item, "1"));
            let p = || v.parse::<f64>().unwrap_or(0.0);
            match k.trim() {
                "seed" => c.seed = v.parse().unwrap_or(0),
                "delay_ms" => c.delay_ms = v.parse().unwrap_or(0),
                "slow_puts" => c.slow_puts = v.parse().ok(),
                "put_fail" => c.put_fail = p(),
                "put_lost_ack" => c.put_lost_ack = p(),
                "get_fail" => c.get_fail = p(),
                "get_truncate" => c.get_truncate = p(),
                "list_fail" => c.list_fail = p(),
                "only" => c.only = Some(v.to_string()),
                "down" => c.down = v == "1" || v == "true",
                "down_file" => c.down_file = Some(v.into()),
                "fuse_write_delay_ms" => c.fuse_write_delay_ms = v.parse().unwrap_or(0),
                "uring_stop_after" => c.uring_stop_after = v.parse().ok(),
                "commit_pause_ms" => c.commit_pause_ms = v.parse().unwrap_or(0),
                "barrier_pause_ms" => c.barrier_pause_ms = v.parse().unwrap_or(0),
                "cut_attempts" => c.cut_attempts = v.parse().ok(),
                _ => {}
            }
        }
        c
    }
}

pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    cfg: FaultConfig,
    rng: Mutex<rand::rngs::StdRng>,
    /// PUTs seen so far (for `slow_puts`).
    puts: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, cfg: FaultConfig) -> FaultyStore {
        let rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        FaultyStore {
            inner,
            cfg,
            rng: Mutex::new(rng),
            puts: AtomicU64::new(0),
        }
    }

    /// `down=1`, or the `down_file` exists right now.
    fn is_down(&self) -> bool {
        self.cfg.down || self.cfg.down_file.as_ref().is_some_and(|f| f.exists())
    }

    fn roll(&self, location: &Path, p: f64) -> bool {
        if let Some(only) = &self.cfg.only {
            if !location.as_ref().contains(only.as_str()) {
                return false;
            }
        }
        p > 0.0 && self.rng.lock().expect("fault rng").random::<f64>() < p
    }

    /// Delay (see `delay_ms`, `slow_puts`) and the `down` check, before every request.
    async fn before(&self, location: &Path, put: bool) -> object_store::Result<()> {
        let delayed = match self.cfg.slow_puts {
            None => true,
            Some(n) => put && self.puts.fetch_add(1, Ordering::Relaxed) < n,
        };
        if delayed && self.cfg.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.cfg.delay_ms)).await;
        }
        if self.is_down() {
            return Err(injected(
                location,
                "connection refused (injected: store down)",
            ));
        }
        Ok(())
    }
}

fn injected(location: &Path, what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("{location}: injected fault: {what}").into(),
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?})", self.cfg)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.before(location, true).await?;
        if self.roll(location, self.cfg.put_fail) {
            return Err(injected(location, "put failed"));
        }
        let res = self.inner.put_opts(location, payload, opts).await?;
        if self.roll(location, self.cfg.put_lost_ack) {
            return Err(injected(location, "put landed but its answer was lost"));
        }
        Ok(res)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.before(location, false).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.before(location, false).await?;
        if self.roll(location, self.cfg.get_fail) {
            return Err(injected(location, "get failed"));
        }
        let res = self.inner.get_opts(location, options).await?;
        if !self.roll(location, self.cfg.get_truncate) {
            return Ok(res);
        }
        let GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        } = res;
        let body: Bytes = match payload {
            GetResultPayload::Stream(s) => {
                let parts: Vec<Bytes> = s
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<_, _>>()?;
                parts.concat().into()
            }
            GetResultPayload::File(..) => {
                let r = GetResult {
                    payload,
                    meta: meta.clone(),
                    range: range.clone(),
                    attributes: attributes.clone(),
                    extensions: extensions.clone(),
                };
                r.bytes().await?
            }
        };
        let cut = body.slice(..body.len() / 2);
        Ok(GetResult {
            payload: GetResultPayload::Stream(
                futures::stream::once(async move { Ok(cut) }).boxed(),
            ),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let opts = GetOptions {
                range: Some(r.clone().into()),
                ..Default::default()
            };
            out.push(self.get_opts(location, opts).await?.bytes().await?);
        }
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        if self.is_down() {
            return locations
                .map(|l| {
                    let l = l?;
                    Err(injected(&l, "connection refused (injected: store down)"))
                })
                .boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let p = prefix.cloned().unwrap_or_default();
        if self.is_down() {
            let e = injected(&p, "connection refused (injected: store down)");
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        if self.roll(&p, self.cfg.list_fail) {
            let e = injected(&p, "list failed");
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let p = prefix.cloned().unwrap_or_default();
        self.before(&p, false).await?;
        if self.roll(&p, self.cfg.list_fail) {
            return Err(injected(&p, "list failed"));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.before(from, false).await?;
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::faulty_file_store;

    #[tokio::test]
    async fn down_file_cuts_the_store_off_while_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        std::fs::create_dir_all(&root).unwrap();
        let flag = dir.path().join("partition");
        let spec = format!("seed=1,down_file={}", flag.display());
        let cfg = FaultConfig::parse(&spec);
        assert_eq!(cfg.down_file.as_deref(), Some(flag.as_path()));
        assert!(!cfg.down);
        let store = faulty_file_store(&root, &spec);

        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(store.get("a").await.unwrap(), Bytes::from_static(b"1"));

        std::fs::write(&flag, b"").unwrap();
        let down = |e: crate::Error| e.to_string().contains("injected: store down");
        assert!(down(store.get("a").await.unwrap_err()));
        assert!(down(
            store.put("b", Bytes::from_static(b"2")).await.unwrap_err()
        ));
        assert!(down(store.list("").await.unwrap_err()));
        assert!(down(store.list_dirs("").await.unwrap_err()));
        assert!(down(store.delete("a").await.unwrap_err()));
        assert!(down(store.get_versioned("m").await.unwrap_err()));

        std::fs::remove_file(&flag).unwrap();
        assert_eq!(store.get("a").await.unwrap(), Bytes::from_static(b"1"));
        assert_eq!(store.list("").await.unwrap().len(), 1);
        store.delete("a").await.unwrap();
        assert!(store.get_opt("a").await.unwrap().is_none());
    }
}
