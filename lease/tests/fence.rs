//! The fence generation (docs/decisions/lease.md, "Fence"): a holder that took the lease from
//! one that had not released it publishes the latest content again, with its epoch, at
//! latest + 1; the old holder's next publish then finds that number taken. After a release
//! there is nothing to fence. Against `file://` and, when `OWFS_TEST_S3_ENDPOINT` is set, S3.

use std::collections::HashSet;
use std::sync::Arc;

use chunkstore::generation::{self, GenRecord};
use chunkstore::progress::Progress;
use chunkstore::{publish, Repo, Store};
use lease::{acquire, Error, Holder, Lease, LeaseConfig, ManualClock, Mode};

fn node(name: &str) -> Holder {
    Holder {
        node: name.into(),
        host: format!("{name}-host"),
        pid: 4242,
    }
}

/// A fresh `file://` store, and a fresh S3 bucket if `OWFS_TEST_S3_ENDPOINT` is set.
fn stores(dir: &std::path::Path) -> Vec<Store> {
    let mut stores = vec![Store::open(&format!("file://{}", dir.display())).unwrap()];
    if let Some((s3, url)) = chunkstore::testdata::s3_test_bucket("fence") {
        stores.push(Store::from_object_store(s3, &url));
    }
    stores
}

fn latest(repo: &Arc<Repo>) -> GenRecord {
    repo.block_on(generation::latest(&repo.store, "w"))
        .unwrap()
        .unwrap()
}

/// What a holder's commit publishes: the next generation after `parent`, with `epoch`.
fn publish_next(repo: &Arc<Repo>, parent: &GenRecord, epoch: u64) -> chunkstore::Result<()> {
    let mut rec = publish::derived(parent, "w", Some(parent), "commit");
    rec.epoch = epoch;
    publish::publish_checked(repo, &mut rec, &HashSet::from([parent.root_hash()?]))
}

#[test]
fn a_takeover_fences_the_old_holder_out() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"generation one").unwrap();
    for store in stores(dir.path()) {
        let repo = Repo::open(store, rt.handle().clone(), true).unwrap();
        publish::snapshot(&repo, src.path(), "w", &Progress::default()).unwrap();
        let clock = Arc::new(ManualClock::new());
        let cfg = LeaseConfig::default();
        let take = |who: &str, mode: Mode| -> Result<Lease, Error> {
            rt.block_on(acquire(
                &repo.store,
                "w",
                node(who),
                &cfg,
                mode,
                clock.clone(),
            ))
        };

        // The first holder took a free lease: nothing to fence, nothing published.
        let a = take("a", Mode::Normal).unwrap();
        assert!(a.fence(&repo).unwrap().is_none());
        let g1 = latest(&repo);
        assert_eq!(g1.number, 1);
        publish_next(&repo, &g1, a.epoch()).unwrap();
        let g2 = latest(&repo);

        // b forces it from a live a and fences.
        let b = take("b", Mode::Takeover).unwrap();
        assert_eq!(b.epoch(), 2);
        let fence = b.fence(&repo).unwrap().expect("a had not released");
        assert_eq!(
            (fence.number, fence.parent, fence.epoch, fence.kind.as_str()),
            (3, Some(2), 2, "fence")
        );
        assert_eq!(fence.root, g2.root, "the fence changes no content");
        assert_eq!(latest(&repo), fence);
        b.check_epoch(&fence).unwrap();

        // The zombie a still believes it holds the lease: its next publish is refused, and
        // the latest generation tells it why.
        match publish_next(&repo, &g2, a.epoch()) {
            Err(chunkstore::Error::Conflict(_)) => {}
            other => panic!("the zombie published: {other:?}"),
        }
        match a.check_epoch(&latest(&repo)) {
            Err(Error::Lost { reason }) => assert!(
                reason.contains("generation 3 carries epoch 2, newer than our lease's (1)"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }

        // c takes over from b and fences first: b, fencing late, finds the newer epoch.
        let c = take("c", Mode::Takeover).unwrap();
        assert_eq!(
            c.fence(&repo).unwrap().map(|f| (f.number, f.epoch)),
            Some((4, 3))
        );
        match b.fence(&repo) {
            Err(Error::Lost { reason }) => assert!(reason.contains("carries epoch 3"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(latest(&repo).number, 4);

        // A planned handoff: the next holder has nothing to fence.
        rt.block_on(c.release()).unwrap();
        let d = take("d", Mode::Normal).unwrap();
        assert!(d.took_over().is_none());
        assert!(d.fence(&repo).unwrap().is_none());
        assert_eq!(latest(&repo).number, 4);
    }
}
