//! The lease against `file://` (a temporary directory) and, when `OWFS_TEST_S3_ENDPOINT` is
//! set (e.g. `http://127.0.0.1:5998` of a `moto_server`), against a fresh S3 bucket.
//!
//! Time is simulated (`ManualClock`): it moves only when a test says so, so timings are exact
//! and nothing sleeps. The store is real; only `a_slow_acquire_renews_before_handing_out_the_lease`
//! runs on the system clock, because the slowness it needs is the store's own.

use std::sync::Arc;
use std::time::Duration;

use chunkstore::Store;
use lease::clock::MANUAL_CLOCK_START_MS;
use lease::{acquire, read, Clock, Error, Holder, Lease, LeaseConfig, ManualClock, Mode};

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

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `who` acquires workspace w on `clock`.
async fn acquire_w(
    store: &Store,
    who: &str,
    cfg: &LeaseConfig,
    mode: Mode,
    clock: &Arc<ManualClock>,
) -> Result<Lease, Error> {
    acquire(store, "w", node(who), cfg, mode, clock.clone()).await
}

fn held_by(e: Error, who: &str) {
    match e {
        Error::Held { record, .. } => assert_eq!(record.holder.node, who),
        other => panic!("expected Held by {who}, got {other}"),
    }
}

/// Runs `task` to its end on simulated time: whenever it sleeps on `clock`, moves the clock to
/// the end of that sleep (the task does nothing else while it sleeps); while it waits for the
/// store, lets it run.
async fn drive<T: Send + 'static>(clock: &ManualClock, task: tokio::task::JoinHandle<T>) -> T {
    while !task.is_finished() {
        match clock.next_wake() {
            Some(t) if t > clock.now() => clock.advance_to(t),
            _ => tokio::time::sleep(ms(1)).await,
        }
    }
    task.await.unwrap()
}

#[tokio::test]
async fn acquire_held_renew_release_reacquire() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        let clock = Arc::new(ManualClock::new());
        assert!(read(store, "w").await.unwrap().is_none());
        let t0 = clock.now();
        let mut a = acquire_w(store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        assert_eq!(a.epoch(), 1);
        assert!(a.took_over().is_none());
        // ttl 30 s − margin 5 s from the start of the acquiring write.
        assert_eq!(a.deadline(), t0 + Duration::from_secs(25));

        let e = acquire_w(store, "b", &cfg, Mode::Normal, &clock)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("workspace w is held by node a (host a-host, pid 4242), epoch 1;")
                && text.contains("expires in 32 s")
                && text.contains("--wait")
                && text.contains("--takeover"),
            "{text}"
        );
        match &e {
            // ttl + skew, to the millisecond: no time passed.
            Error::Held { expires_in, .. } => assert_eq!(*expires_in, Duration::from_secs(32)),
            other => panic!("{other}"),
        }

        let before = a.record().clone();
        let old_deadline = a.deadline();
        clock.advance(ms(20));
        a.renew().await.unwrap();
        let after = read(store, "w").await.unwrap().unwrap();
        assert_eq!(&after, a.record());
        assert_eq!(after.epoch, 1);
        assert_eq!(after.acquired_ms, before.acquired_ms);
        assert_eq!(after.renewed_ms, before.renewed_ms + 20);
        assert_eq!(after.expires_ms, after.renewed_ms + 30_000);
        assert_ne!(after.nonce, before.nonce);
        assert_eq!(a.deadline(), old_deadline + ms(20));

        a.release().await.unwrap();
        let released = read(store, "w").await.unwrap().unwrap();
        assert!(released.released);
        assert_eq!(released.epoch, 1);

        // Released: taken at once, no fence needed.
        let b = acquire_w(store, "b", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        assert_eq!(b.epoch(), 2);
        assert!(b.took_over().is_none());
        b.release().await.unwrap();
        let a = acquire_w(store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        assert_eq!(a.epoch(), 3);
        // Another workspace is independent.
        let other = acquire(store, "v", node("b"), &cfg, Mode::Normal, clock.clone())
            .await
            .unwrap();
        assert_eq!(other.epoch(), 1);
    }
}

#[tokio::test]
async fn expired_lease_is_taken_over_and_the_old_holder_loses() {
    let cfg = short();
    for store in &stores().stores {
        let clock = Arc::new(ManualClock::new());
        let mut a = acquire_w(store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        held_by(
            acquire_w(store, "b", &cfg, Mode::Normal, &clock)
                .await
                .unwrap_err(),
            "a",
        );
        // a stops renewing (crashed, partitioned). At ttl + skew exactly it is still held...
        clock.advance(ms(700));
        held_by(
            acquire_w(store, "b", &cfg, Mode::Normal, &clock)
                .await
                .unwrap_err(),
            "a",
        );
        // ...and free 1 ms later.
        clock.advance(ms(1));
        let b = acquire_w(store, "b", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        assert_eq!(b.epoch(), 2);
        let prev = b
            .took_over()
            .expect("took over from a holder that had not released");
        assert_eq!((prev.epoch, prev.holder.node.as_str()), (1, "a"));
        assert!(!prev.released);

        // a is past its deadline (400 ms): lost without even asking the store.
        match a.renew().await.unwrap_err() {
            Error::Lost { reason } => assert!(reason.contains("deadline"), "{reason}"),
            other => panic!("{other}"),
        }
    }
}

/// The timing argument of docs/decisions/lease.md on two clocks: a taker whose wall clock runs
/// `max_skew` ahead of the holder's takes over no earlier than the holder's lease runs out,
/// and by then the holder has stopped serving (its deadline is `margin` earlier).
#[tokio::test]
async fn a_taker_with_a_fast_wall_clock_takes_over_only_after_the_holder_stopped() {
    let cfg = short();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let clock_a = Arc::new(ManualClock::new());
    let skew = cfg.max_skew.as_millis() as u64;
    let clock_b = Arc::new(ManualClock::with_wall_ms(MANUAL_CLOCK_START_MS + skew));
    let a = acquire_w(&store, "a", &cfg, Mode::Normal, &clock_a)
        .await
        .unwrap();
    let mut elapsed = Duration::ZERO;
    let b = loop {
        match acquire_w(&store, "b", &cfg, Mode::Normal, &clock_b).await {
            Ok(b) => break b,
            Err(Error::Held { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        // True time moves on both nodes alike.
        clock_a.advance(ms(10));
        clock_b.advance(ms(10));
        elapsed += ms(10);
    };
    assert_eq!(b.epoch(), 2);
    // Free by b's clock once it passes expires_ms + skew: true time past the ttl.
    assert_eq!(elapsed, cfg.ttl + ms(10));
    assert!(!a.may_serve(clock_a.now()));
    assert!(!a.serving_deadline().may_serve_now());
    assert!(a.deadline() + cfg.margin <= clock_a.now());
}

#[tokio::test]
async fn takeover_fences_out_a_live_holder() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        let clock = Arc::new(ManualClock::new());
        let mut a = acquire_w(store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        let b = acquire_w(store, "b", &cfg, Mode::Takeover, &clock)
            .await
            .unwrap();
        assert_eq!(b.epoch(), 2);
        assert_eq!(b.took_over().map(|r| r.epoch), Some(1));

        // a is well inside its deadline, but its record was replaced.
        assert!(a.may_serve(clock.now()));
        match a.renew().await.unwrap_err() {
            Error::Lost { reason } => assert!(
                reason.contains("taken over by node b (host b-host, pid 4242), epoch 2"),
                "{reason}"
            ),
            other => panic!("{other}"),
        }
        assert!(matches!(a.release().await.unwrap_err(), Error::Lost { .. }));
        // b's lease is untouched by a's attempts.
        assert_eq!(read(store, "w").await.unwrap().unwrap().holder.node, "b");

        // Takeover of a released lease needs no fence.
        b.release().await.unwrap();
        let c = acquire_w(store, "c", &cfg, Mode::Takeover, &clock)
            .await
            .unwrap();
        assert_eq!(c.epoch(), 3);
        assert!(c.took_over().is_none());
    }
}

/// The holder renews every millisecond while another node takes over: a renewal
/// landing between the taker's read and its write is the same epoch, forced all the same (it
/// once made `--takeover` fail with "held", seen under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_wins_over_the_holders_renewals() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        for round in 0..10 {
            let clock = Arc::new(ManualClock::new());
            let ws = format!("race{round}");
            let mut a = acquire(store, &ws, node("a"), &cfg, Mode::Normal, clock.clone())
                .await
                .unwrap();
            let renewer = tokio::spawn(async move {
                let mut n = 0u32;
                while a.renew().await.is_ok() {
                    n += 1;
                    tokio::time::sleep(ms(1)).await;
                }
                n
            });
            tokio::time::sleep(ms(5)).await;
            let b = acquire(store, &ws, node("b"), &cfg, Mode::Takeover, clock.clone())
                .await
                .unwrap_or_else(|e| panic!("round {round}: the takeover failed: {e}"));
            assert_eq!(b.took_over().map(|r| r.holder.node.as_str()), Some("a"));
            assert_eq!(b.epoch(), 2);
            // The holder's renewals stop at the takeover, and the record is b's.
            renewer.await.unwrap();
            assert_eq!(read(store, &ws).await.unwrap().unwrap().holder.node, "b");
        }
    }
}

#[tokio::test]
async fn wait_succeeds_after_release() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        let clock = Arc::new(ManualClock::new());
        let a = acquire_w(store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        let waiter = {
            let (store, cfg, clock) = (store.clone(), cfg.clone(), clock.clone());
            tokio::spawn(async move {
                acquire_w(
                    &store,
                    "b",
                    &cfg,
                    Mode::Wait(Some(Duration::from_secs(10))),
                    &clock,
                )
                .await
            })
        };
        // The waiter polls, then sleeps (the holder's lease has 32 s to go).
        while clock.next_wake().is_none() {
            tokio::time::sleep(ms(1)).await;
        }
        assert!(!waiter.is_finished());
        clock.advance(ms(300));
        a.release().await.unwrap();
        let released_at = clock.now();
        let b = drive(&clock, waiter).await.unwrap();
        assert_eq!(b.epoch(), 2);
        assert!(b.took_over().is_none());
        // Polled at least once a second.
        let waited = clock.now() - released_at;
        assert!(waited <= Duration::from_secs(1), "{waited:?}");
    }
}

#[tokio::test]
async fn wait_succeeds_after_expiry() {
    let cfg = short();
    for store in &stores().stores {
        let clock = Arc::new(ManualClock::new());
        let a = acquire_w(store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        drop(a); // crashed: never renews, never releases
        let t0 = clock.now();
        let waiter = {
            let (store, cfg, clock) = (store.clone(), cfg.clone(), clock.clone());
            tokio::spawn(async move {
                acquire_w(
                    &store,
                    "b",
                    &cfg,
                    Mode::Wait(Some(Duration::from_secs(5))),
                    &clock,
                )
                .await
            })
        };
        let b = drive(&clock, waiter).await.unwrap();
        // Free after ttl + skew (700 ms): the waiter slept until 1 ms past that.
        assert_eq!(clock.now() - t0, ms(701));
        assert_eq!(b.epoch(), 2);
        assert_eq!(b.took_over().map(|r| r.holder.node.as_str()), Some("a"));
    }
}

#[tokio::test]
async fn wait_times_out_on_a_live_holder() {
    let cfg = LeaseConfig::default();
    for store in &stores().stores {
        let clock = Arc::new(ManualClock::new());
        let _a = acquire_w(store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap();
        let t0 = clock.now();
        let waiter = {
            let (store, cfg, clock) = (store.clone(), cfg.clone(), clock.clone());
            tokio::spawn(async move {
                acquire_w(&store, "b", &cfg, Mode::Wait(Some(ms(300))), &clock).await
            })
        };
        let e = drive(&clock, waiter).await.unwrap_err();
        assert_eq!(clock.now() - t0, ms(300));
        let text = e.to_string();
        assert!(
            matches!(&e, Error::Timeout { record } if record.holder.node == "a"),
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
        let clock = Arc::new(ManualClock::new());
        for round in 0..2 {
            // Round 0: the lease never existed. Round 1: it expired.
            let cfg = short();
            if round == 1 {
                clock.advance(ms(701));
            }
            let mut tasks = Vec::new();
            for i in 0..8 {
                let (store, cfg, clock) = (store.clone(), cfg.clone(), clock.clone());
                tasks.push(tokio::spawn(async move {
                    acquire_w(&store, &format!("n{i}"), &cfg, Mode::Normal, &clock).await
                }));
            }
            let mut winners = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(lease) => winners.push(lease),
                    Err(Error::Held { .. }) => {}
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
    let clock = Arc::new(ManualClock::new());
    let cfg = LeaseConfig {
        ttl: ms(2000),
        renew_every: ms(500),
        margin: ms(500),
        max_skew: ms(100),
    };
    let mut a = acquire_w(&store, "a", &cfg, Mode::Normal, &clock)
        .await
        .unwrap();
    clock.advance(ms(500));
    a.renew().await.unwrap();

    std::fs::write(&flag, b"").unwrap();
    let deadline = a.deadline();
    clock.advance(ms(500));
    match a.renew().await.unwrap_err() {
        Error::Store(e) => assert!(e.to_string().contains("store down"), "{e}"),
        other => panic!("{other}"),
    }
    assert_eq!(
        a.deadline(),
        deadline,
        "a failed renewal does not move the deadline"
    );

    // Back before the deadline: renewals work again.
    std::fs::remove_file(&flag).unwrap();
    clock.advance(ms(100));
    a.renew().await.unwrap();
    assert_eq!(a.deadline(), deadline + ms(600));

    // Cut off until past the deadline: the caller stops there; renew then says Lost.
    std::fs::write(&flag, b"").unwrap();
    let mut failures = 0;
    while a.may_serve(clock.now()) {
        assert!(matches!(a.renew().await, Err(Error::Store(_))));
        failures += 1;
        clock.advance(ms(200));
    }
    // Renewed at 1100 ms: deadline at 2600 ms, tries at 1100, 1300, ..., 2500 ms.
    assert_eq!(failures, 8);
    std::fs::remove_file(&flag).unwrap();
    assert!(matches!(a.renew().await, Err(Error::Lost { .. })));
}

/// Serving ends at the deadline of the last successful renewal, to the nanosecond, for the
/// lease and for the lock-free handle a mount checks on every request.
#[tokio::test]
async fn serving_ends_at_the_deadline_of_the_last_successful_renewal() {
    let cfg = short(); // deadline: 600 − 200 = 400 ms after each renewal's start
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let clock = Arc::new(ManualClock::new());
    let t0 = clock.now();
    let mut a = acquire_w(&store, "a", &cfg, Mode::Normal, &clock)
        .await
        .unwrap();
    let handle = a.serving_deadline();
    assert_eq!(a.deadline(), t0 + ms(400));
    assert!(a.may_serve(t0 + ms(400) - Duration::from_nanos(1)));
    assert!(!a.may_serve(t0 + ms(400)));
    assert_eq!(handle.get(), a.deadline());

    clock.advance(ms(250));
    a.renew().await.unwrap();
    // The handle taken before the renewal follows it.
    assert_eq!(handle.get(), t0 + ms(650));
    clock.advance(ms(399));
    assert!(handle.may_serve_now() && a.may_serve(clock.now()));
    clock.advance(ms(1));
    assert!(!handle.may_serve_now() && !a.may_serve(clock.now()));
}

/// A holder that let its deadline pass cannot renew its way back: renew refuses without
/// asking the store, even though nobody took the lease; only a new acquire (once the record
/// expired for everyone, and with a new epoch that must fence) serves again.
#[tokio::test]
async fn a_late_renewal_does_not_resurrect_serving() {
    let cfg = short();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let clock = Arc::new(ManualClock::new());
    let mut a = acquire_w(&store, "a", &cfg, Mode::Normal, &clock)
        .await
        .unwrap();
    let stored = read(&store, "w").await.unwrap().unwrap();
    clock.advance(ms(400));
    assert!(!a.may_serve(clock.now()));
    for _ in 0..2 {
        match a.renew().await.unwrap_err() {
            Error::Lost { reason } => assert!(reason.contains("deadline"), "{reason}"),
            other => panic!("{other}"),
        }
        assert!(!a.may_serve(clock.now()));
        assert_eq!(read(&store, "w").await.unwrap().unwrap(), stored);
    }
    // Its own record still stands for others until ttl + skew: the same node is refused...
    held_by(
        acquire_w(&store, "a", &cfg, Mode::Normal, &clock)
            .await
            .unwrap_err(),
        "a",
    );
    // ...and takes it afresh after that, as any node would: a new epoch, to be fenced.
    clock.advance(ms(301));
    let again = acquire_w(&store, "a", &cfg, Mode::Normal, &clock)
        .await
        .unwrap();
    assert_eq!(again.epoch(), 2);
    assert_eq!(again.took_over().map(|r| r.epoch), Some(1));
    assert!(again.may_serve(clock.now()));
    assert!(!a.may_serve(clock.now()));
}

/// A renewal whose request is still in flight when the deadline comes is `Lost` then, and
/// serving stopped at the deadline.
#[tokio::test]
async fn a_renewal_that_does_not_answer_by_the_deadline_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    // The acquiring PUT and the renewal's are slow (real time; the lease's clock stands still
    // during the first).
    let store = faulty_file_store(dir.path(), "delay_ms=300,slow_puts=2");
    let clock = Arc::new(ManualClock::new());
    let a = acquire_w(&store, "a", &short(), Mode::Normal, &clock)
        .await
        .unwrap();
    let handle = a.serving_deadline();
    let deadline = a.deadline();
    let renewal = tokio::spawn(async move {
        let mut a = a;
        a.renew().await
    });
    // The renewal waits for its answer no longer than until the deadline.
    while clock.next_wake().is_none() {
        tokio::time::sleep(ms(1)).await;
    }
    assert_eq!(clock.next_wake(), Some(deadline));
    clock.advance_to(deadline);
    match renewal.await.unwrap().unwrap_err() {
        Error::Lost { reason } => assert!(
            reason.contains("did not answer before the deadline"),
            "{reason}"
        ),
        other => panic!("{other}"),
    }
    assert!(!handle.may_serve_now());
}

/// Every write's reply is lost (it landed): acquire, renew and release still know they won.
#[tokio::test]
async fn lost_acks_are_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let store = faulty_file_store(dir.path(), "put_lost_ack=1");
    let clock = Arc::new(ManualClock::new());
    let cfg = LeaseConfig::default();
    let mut a = acquire_w(&store, "a", &cfg, Mode::Normal, &clock)
        .await
        .unwrap();
    a.renew().await.unwrap();
    a.renew().await.unwrap();
    held_by(
        acquire_w(&store, "b", &cfg, Mode::Normal, &clock)
            .await
            .unwrap_err(),
        "a",
    );
    a.release().await.unwrap();
    let b = acquire_w(&store, "b", &cfg, Mode::Normal, &clock)
        .await
        .unwrap();
    assert_eq!(b.epoch(), 2);
}

/// The acquiring write outlasts ttl − margin (a loaded store): acquire renews before it hands
/// the lease out, instead of handing out one already past its deadline or giving up. On the
/// system clock: the delay is the store's, in real time.
#[tokio::test]
async fn a_slow_acquire_renews_before_handing_out_the_lease() {
    let clock: Arc<dyn Clock> = Arc::new(lease::SystemClock);
    let dir = tempfile::tempdir().unwrap();
    let cfg = short(); // ttl 600 ms − margin 200 ms: a 500 ms write is too slow
    let store = faulty_file_store(dir.path(), "delay_ms=500,slow_puts=1");
    let t0 = std::time::Instant::now();
    let mut a = acquire(&store, "w", node("a"), &cfg, Mode::Normal, clock.clone())
        .await
        .unwrap();
    assert!(t0.elapsed() >= ms(500), "{:?}", t0.elapsed());
    assert!(
        a.may_serve(std::time::Instant::now()),
        "handed out past its deadline"
    );
    let stored = read(&store, "w").await.unwrap().unwrap();
    assert_eq!(stored, *a.record());
    assert!(stored.renewed_ms > stored.acquired_ms, "{stored:?}");
    a.renew().await.unwrap();

    // A store that stays that slow: acquire gives up with Lost (the lease then expires).
    let dir = tempfile::tempdir().unwrap();
    let store = faulty_file_store(dir.path(), "delay_ms=500,slow_puts=100");
    match acquire(&store, "w", node("a"), &cfg, Mode::Normal, clock).await {
        Err(Error::Lost { reason }) => assert!(reason.contains("deadline"), "{reason}"),
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
    let clock = Arc::new(ManualClock::new());
    let e = acquire_w(&store, "a", &cfg, Mode::Normal, &clock)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(read(&store, "w").await.unwrap().is_none());
}

#[tokio::test]
async fn record_is_pretty_json_at_ws_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let clock = Arc::new(ManualClock::new());
    let a = acquire_w(&store, "a", &LeaseConfig::default(), Mode::Normal, &clock)
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
    // The wall clock the lease was given.
    assert_eq!(v["acquired_ms"], MANUAL_CLOCK_START_MS);
    assert_eq!(v["expires_ms"], MANUAL_CLOCK_START_MS + 30_000);
    assert_eq!(v["nonce"].as_str().unwrap().len(), 32);
    assert_eq!(a.record().nonce, v["nonce"].as_str().unwrap());
}
