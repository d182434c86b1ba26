//! The lease against `file://` (a temporary directory) and, when `OWFS_TEST_S3_ENDPOINT` is
//! set (e.g. `http://127.0.0.1:5998` of a `moto_server`), against a fresh S3 bucket.

use std::time::{Duration, Instant};

use chunkstore::Store;
use lease::{acquire, read, Holder, Lease, LeaseConfig, LeaseError, Mode};

struct Stores {
    stores: Vec<Store>,
    _dir: tempfile::TempDir,
}

/// A fresh `file://` store, and a fresh S3 bucket if `OWFS_TEST_S3_ENDPOINT` is set.
fn stores() -> Stores {
    let dir = tempfile::tempdir().unwrap();
    let mut stores = vec![Store::open(&format!("file://{}", dir.path().display())).unwrap()];
    stores.extend(s3_store());
    Stores { stores, _dir: dir }
}

fn s3_store() -> Option<Store> {
    let (s3, url) = chunkstore::testdata::s3_test_bucket("lease")?;
    Some(Store::from_object_store(s3, &url))
}

/// A `file://` store in `dir/store` behind the fault injector (`spec`: `OWFS_FAULTS` syntax).
fn faulty_file_store(dir: &std::path::Path, spec: &str) -> Store {
    let root = dir.join("store");
    std::fs::create_dir_all(&root).unwrap();
    chunkstore::testdata::faulty_file_store(&root, spec)
}

fn node(name: &str) -> Holder {
    Holder {
        node: name.into(),
        host: format!("{name}-host"),
        pid: 4242,
    }
}

/// ttl 600 ms, renew every 200 ms, margin 200 ms, skew 100 ms.
fn short() -> LeaseConfig {
    LeaseConfig {
        ttl: Duration::from_millis(600),
        renew_every: Duration::from_millis(200),
        margin: Duration::from_millis(200),
        max_skew: Duration::from_millis(100),
    }
}

/// `who` acquires workspace w.
async fn acquire_w(
    store: &Store,
    who: &str,
    cfg: &LeaseConfig,
    mode: Mode,
) -> Result<Lease, LeaseError> {
    acquire(store, "w", node(who), cfg, mode).await
}

fn held_by(e: LeaseError, who: &str) {
    match e {
        LeaseError::Held { record, .. } => assert_eq!(record.holder.node, who),
        other => panic!("expected Held by {who}, got {other}"),
    }
}

#[tokio::test]
async fn acquire_held_renew_release_reacquire() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        assert!(read(store, "w").await.unwrap().is_none());
        let mut a = acquire_w(store, "a", &cfg, Mode::Normal).await.unwrap();
        assert_eq!(a.epoch(), 1);
        assert!(a.took_over().is_none());
        assert!(a.deadline() > Instant::now() + Duration::from_secs(24));

        let e = acquire_w(store, "b", &cfg, Mode::Normal).await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("workspace w is held by node a (host a-host, pid 4242), epoch 1;")
                && text.contains("expires in 32 s")
                && text.contains("--wait")
                && text.contains("--takeover"),
            "{text}"
        );
        match &e {
            LeaseError::Held { expires_in, .. } => {
                assert!(*expires_in <= Duration::from_secs(32), "{expires_in:?}")
            }
            other => panic!("{other}"),
        }

        let before = a.record().clone();
        let old_deadline = a.deadline();
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.renew().await.unwrap();
        let after = read(store, "w").await.unwrap().unwrap();
        assert_eq!(&after, a.record());
        assert_eq!(after.epoch, 1);
        assert_eq!(after.acquired_ms, before.acquired_ms);
        assert!(after.expires_ms > before.expires_ms);
        assert_eq!(after.expires_ms, after.renewed_ms + 30_000);
        assert_ne!(after.nonce, before.nonce);
        assert!(a.deadline() > old_deadline);

        a.release().await.unwrap();
        let released = read(store, "w").await.unwrap().unwrap();
        assert!(released.released);
        assert_eq!(released.epoch, 1);

        // Released: taken at once, no fence needed.
        let b = acquire_w(store, "b", &cfg, Mode::Normal).await.unwrap();
        assert_eq!(b.epoch(), 2);
        assert!(b.took_over().is_none());
        b.release().await.unwrap();
        let a = acquire_w(store, "a", &cfg, Mode::Normal).await.unwrap();
        assert_eq!(a.epoch(), 3);
        // Another workspace is independent.
        let other = acquire(store, "v", node("b"), &cfg, Mode::Normal)
            .await
            .unwrap();
        assert_eq!(other.epoch(), 1);
    }
}

#[tokio::test]
async fn expired_lease_is_taken_over_and_the_old_holder_loses() {
    let cfg = short();
    for store in &stores().stores {
        let mut a = acquire_w(store, "a", &cfg, Mode::Normal).await.unwrap();
        held_by(
            acquire_w(store, "b", &cfg, Mode::Normal).await.unwrap_err(),
            "a",
        );
        // a stops renewing (crashed, partitioned): free after ttl + skew.
        tokio::time::sleep(Duration::from_millis(750)).await;
        let b = acquire_w(store, "b", &cfg, Mode::Normal).await.unwrap();
        assert_eq!(b.epoch(), 2);
        let prev = b
            .took_over()
            .expect("took over from a holder that had not released");
        assert_eq!((prev.epoch, prev.holder.node.as_str()), (1, "a"));
        assert!(!prev.released);

        // a is past its deadline (400 ms): lost without even asking the store.
        match a.renew().await.unwrap_err() {
            LeaseError::Lost { reason } => assert!(reason.contains("deadline"), "{reason}"),
            other => panic!("{other}"),
        }
    }
}

#[tokio::test]
async fn takeover_fences_out_a_live_holder() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        let mut a = acquire_w(store, "a", &cfg, Mode::Normal).await.unwrap();
        let b = acquire_w(store, "b", &cfg, Mode::Takeover).await.unwrap();
        assert_eq!(b.epoch(), 2);
        assert_eq!(b.took_over().map(|r| r.epoch), Some(1));

        // a is well inside its deadline, but its record was replaced.
        assert!(a.deadline() > Instant::now());
        match a.renew().await.unwrap_err() {
            LeaseError::Lost { reason } => assert!(
                reason.contains("taken over by node b (host b-host, pid 4242), epoch 2"),
                "{reason}"
            ),
            other => panic!("{other}"),
        }
        assert!(matches!(
            a.release().await.unwrap_err(),
            LeaseError::Lost { .. }
        ));
        // b's lease is untouched by a's attempts.
        assert_eq!(read(store, "w").await.unwrap().unwrap().holder.node, "b");

        // Takeover of a released lease needs no fence.
        b.release().await.unwrap();
        let c = acquire_w(store, "c", &cfg, Mode::Takeover).await.unwrap();
        assert_eq!(c.epoch(), 3);
        assert!(c.took_over().is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_succeeds_after_release() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        let a = acquire_w(store, "a", &cfg, Mode::Normal).await.unwrap();
        let t0 = Instant::now();
        let waiter = {
            let (store, cfg) = (store.clone(), cfg.clone());
            tokio::spawn(async move {
                acquire_w(&store, "b", &cfg, Mode::Wait(Some(Duration::from_secs(10)))).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.release().await.unwrap();
        let b = waiter.await.unwrap().unwrap();
        assert_eq!(b.epoch(), 2);
        assert!(b.took_over().is_none());
        // Polled at least once a second.
        assert!(
            t0.elapsed() < Duration::from_millis(2500),
            "{:?}",
            t0.elapsed()
        );
    }
}

#[tokio::test]
async fn wait_succeeds_after_expiry() {
    let cfg = short();
    for store in &stores().stores {
        let a = acquire_w(store, "a", &cfg, Mode::Normal).await.unwrap();
        drop(a); // crashed: never renews, never releases
        let t0 = Instant::now();
        let b = acquire_w(store, "b", &cfg, Mode::Wait(Some(Duration::from_secs(5))))
            .await
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(b.epoch(), 2);
        assert_eq!(b.took_over().map(|r| r.holder.node.as_str()), Some("a"));
    }
}

#[tokio::test]
async fn wait_times_out_on_a_live_holder() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        let _a = acquire_w(store, "a", &cfg, Mode::Normal).await.unwrap();
        let t0 = Instant::now();
        let e = acquire_w(
            store,
            "b",
            &cfg,
            Mode::Wait(Some(Duration::from_millis(300))),
        )
        .await
        .unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        let text = e.to_string();
        assert!(
            matches!(&e, LeaseError::Timeout { record } if record.holder.node == "a"),
            "{text}"
        );
        assert!(
            text.contains("held by node a") && text.contains("--takeover"),
            "{text}"
        );
    }
}

/// N nodes acquire a free lease at once: exactly one wins, the others see it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_acquirers_exactly_one_wins() {
    for store in &stores().stores {
        for round in 0..2 {
            // Round 0: the lease never existed. Round 1: it expired.
            let cfg = short();
            if round == 1 {
                tokio::time::sleep(Duration::from_millis(750)).await;
            }
            let mut tasks = Vec::new();
            for i in 0..8 {
                let (store, cfg) = (store.clone(), cfg.clone());
                tasks.push(tokio::spawn(async move {
                    acquire_w(&store, &format!("n{i}"), &cfg, Mode::Normal).await
                }));
            }
            let mut winners = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(lease) => winners.push(lease),
                    Err(LeaseError::Held { .. }) => {}
                    Err(other) => panic!("{other}"),
                }
            }
            assert_eq!(winners.len(), 1, "{store:?} round {round}");
            let w = &winners[0];
            assert_eq!(w.epoch(), round + 1);
            let current = read(store, "w").await.unwrap().unwrap();
            assert_eq!(&current, w.record());
        }
    }
}

#[tokio::test]
async fn partition_makes_renew_fail_and_the_deadline_passes() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("partitioned");
    let store = faulty_file_store(dir.path(), &format!("down_file={}", flag.display()));
    let cfg = LeaseConfig {
        ttl: Duration::from_millis(2000),
        renew_every: Duration::from_millis(500),
        margin: Duration::from_millis(500),
        max_skew: Duration::from_millis(100),
    };
    let mut a = acquire_w(&store, "a", &cfg, Mode::Normal).await.unwrap();
    a.renew().await.unwrap();

    std::fs::write(&flag, b"").unwrap();
    let deadline = a.deadline();
    match a.renew().await.unwrap_err() {
        LeaseError::Store(e) => assert!(e.to_string().contains("store down"), "{e}"),
        other => panic!("{other}"),
    }
    assert_eq!(
        a.deadline(),
        deadline,
        "a failed renewal does not move the deadline"
    );

    // Back before the deadline: renewals work again.
    std::fs::remove_file(&flag).unwrap();
    a.renew().await.unwrap();
    assert!(a.deadline() > deadline);

    // Cut off until past the deadline: the caller stops there; renew then says Lost.
    std::fs::write(&flag, b"").unwrap();
    while Instant::now() < a.deadline() {
        assert!(matches!(a.renew().await, Err(LeaseError::Store(_))));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::remove_file(&flag).unwrap();
    assert!(matches!(a.renew().await, Err(LeaseError::Lost { .. })));
}

/// Every write's reply is lost (it landed): acquire, renew and release still know they won.
#[tokio::test]
async fn lost_acks_are_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let store = faulty_file_store(dir.path(), "put_lost_ack=1");
    let cfg = LeaseConfig::default();
    let mut a = acquire_w(&store, "a", &cfg, Mode::Normal).await.unwrap();
    a.renew().await.unwrap();
    a.renew().await.unwrap();
    held_by(
        acquire_w(&store, "b", &cfg, Mode::Normal)
            .await
            .unwrap_err(),
        "a",
    );
    a.release().await.unwrap();
    let b = acquire_w(&store, "b", &cfg, Mode::Normal).await.unwrap();
    assert_eq!(b.epoch(), 2);
}

/// The acquiring write outlasts ttl − margin (a loaded store): acquire renews before it hands
/// the lease out, instead of handing out one already past its deadline or giving up.
#[tokio::test]
async fn a_slow_acquire_renews_before_handing_out_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = short(); // ttl 600 ms − margin 200 ms: a 500 ms write is too slow
    let store = faulty_file_store(dir.path(), "delay_ms=500,slow_puts=1");
    let t0 = Instant::now();
    let mut a = acquire_w(&store, "a", &cfg, Mode::Normal).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        a.deadline() > Instant::now(),
        "handed out past its deadline"
    );
    let stored = read(&store, "w").await.unwrap().unwrap();
    assert_eq!(stored, *a.record());
    assert!(stored.renewed_ms > stored.acquired_ms, "{stored:?}");
    a.renew().await.unwrap();

    // A store that stays that slow: acquire gives up with Lost (the lease then expires).
    let dir = tempfile::tempdir().unwrap();
    let store = faulty_file_store(dir.path(), "delay_ms=500,slow_puts=100");
    match acquire_w(&store, "a", &cfg, Mode::Normal).await {
        Err(LeaseError::Lost { reason }) => assert!(reason.contains("deadline"), "{reason}"),
        other => panic!("expected Lost, got {other:?}"),
    }
}

#[test]
fn config_validation_says_what_to_fix() {
    LeaseConfig::default().validate().unwrap();
    short().validate().unwrap();
    let e = LeaseConfig {
        renew_every: Duration::from_secs(25),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("renew_every (25 s) must be shorter than ttl − margin (30 s − 5 s = 25 s)")
            && e.contains("lower renew_every"),
        "{e}"
    );
    let e = LeaseConfig {
        margin: Duration::ZERO,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("margin must be above 0"), "{e}");
    let e = LeaseConfig {
        margin: Duration::from_secs(40),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("margin (40 s) must be shorter than the ttl (30 s)"),
        "{e}"
    );
}

#[tokio::test]
async fn invalid_config_is_refused_by_acquire() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let cfg = LeaseConfig {
        renew_every: Duration::from_secs(60),
        ..Default::default()
    };
    let e = acquire_w(&store, "a", &cfg, Mode::Normal)
        .await
        .unwrap_err();
    assert!(matches!(e, LeaseError::Config(_)), "{e}");
    assert!(read(&store, "w").await.unwrap().is_none());
}

#[tokio::test]
async fn record_is_pretty_json_at_ws_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let a = acquire_w(&store, "a", &LeaseConfig::default(), Mode::Normal)
        .await
        .unwrap();
    let (bytes, _) = store.get_versioned("ws/w/lease").await.unwrap().unwrap();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.starts_with("{\n  \"format\": 1,\n"), "{text}");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["epoch"], 1);
    assert_eq!(v["holder"]["node"], "a");
    assert_eq!(v["ttl_ms"], 30_000);
    assert_eq!(v["released"], false);
    assert_eq!(v["nonce"].as_str().unwrap().len(), 32);
    assert_eq!(a.record().nonce, v["nonce"].as_str().unwrap());
}
