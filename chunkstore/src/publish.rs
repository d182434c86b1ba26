//! Making and publishing generation records: a record for written blobs (`record`), its
//! publication after the gc check (`publish_checked`), and the commands that publish one:
//! snapshot of a directory, fork, rollback. (The daemon's own commit of a live mount is
//! `owfs::daemon`'s cut; it publishes through here.)

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gc;
use crate::generation::{self, new_nonce, now_ms, GenRecord, PackAt, GEN_FORMAT};
use crate::hash::Hash;
use crate::pack::PackBuilder;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::snapshot::{snapshot_dir, TreeStats};
use crate::writer::WriteStats;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Committed {
    pub generation: GenRecord,
    pub tree: TreeStats,
    pub write: WriteStats,
    pub requests: crate::store::CounterSnapshot,
}

pub struct NewGen<'a> {
    pub ws: &'a str,
    pub parent: Option<&'a GenRecord>,
    pub kind: &'a str,
    pub origin: Option<String>,
    pub root: Hash,
    pub tree: TreeStats,
    pub write: WriteStats,
    pub epoch: u64,
}

pub fn record(g: NewGen) -> GenRecord {
    GenRecord {
        format: GEN_FORMAT,
        workspace: g.ws.to_string(),
        number: g.parent.map(|p| p.number + 1).unwrap_or(1),
        parent: g.parent.map(|p| p.number),
        origin: g.origin,
        kind: g.kind.to_string(),
        epoch: g.epoch,
        created_ms: now_ms(),
        root: g.root.to_hex(),
        files: g.tree.files,
        dirs: g.tree.dirs,
        bytes: g.tree.bytes,
        bytes_new: g.write.stored_bytes_new,
        blobs_new: g.write.blobs_new,
        sqlite: BTreeMap::new(),
        nonce: new_nonce(),
        root_attr: None,
        pack: None,
        pending: g.parent.map(reachable_packs).unwrap_or_default(),
        embedded: None,
    }
}

/// The packs inside records that a generation sharing `rec`'s blobs may need: those `rec`
/// lists as pending and the one it carries. `Repo::pending_for` keeps those no index object
/// names.
fn reachable_packs(rec: &GenRecord) -> Vec<PackAt> {
    rec.pending.iter().cloned().chain(rec.pack_at()).collect()
}

/// Publishes after checking that gc is not about to delete a pack this commit relies on
/// (see docs/decisions/gc-safety.md). Sets the record's `pending` packs first.
pub fn publish_checked(
    repo: &Arc<Repo>,
    rec: &mut GenRecord,
    reused: &HashSet<Hash>,
) -> Result<()> {
    // The check looks the reused blobs up in the index: it must be loaded.
    repo.ensure_index()?;
    gc::check_reused_not_condemned(repo, reused)?;
    rec.pending = repo.pending_for(&rec.pending)?;
    repo.block_on(generation::publish_record(&repo.store, rec, true))
}

/// `publish_checked` for a mount's commit: the record carries `pack` (the commit's only
/// pack, when small: `BlobWriter::finish_embedding`), the head hint moves only when `hint`
/// is set (`generation::publish_record`), and the listing of condemned packs may be up to
/// `listing_max_age` old (`gc::check_reused_not_condemned_within`). Once published, the
/// pack's blobs join the index, its index entry deferred (docs/decisions/
/// one-request-a-commit.md).
pub fn publish_checked_mount(
    repo: &Arc<Repo>,
    rec: &mut GenRecord,
    reused: &HashSet<Hash>,
    pack: Option<PackBuilder>,
    hint: bool,
    listing_max_age: std::time::Duration,
) -> Result<()> {
    gc::check_reused_not_condemned_within(repo, reused, listing_max_age)?;
    rec.pending = repo.pending_for(&rec.pending)?;
    if pack.is_some() {
        rec.name_embedded_pack();
    }
    let entries = repo.block_on(generation::publish_record_with(
        &repo.store,
        rec,
        pack,
        hint,
    ))?;
    if let (Some(name), Some(entries)) = (rec.pack_name()?, entries) {
        repo.defer_index_at(
            rec.created_ms,
            vec![(name, entries.clone())],
            vec![(name, rec.key())],
        );
        rec.embedded = Some(Arc::new(entries));
    }
    Ok(())
}

/// `owfs snapshot DIR WS`: commits DIR as WS's next generation, reading only what changed
/// since the latest one.
pub fn snapshot(repo: &Arc<Repo>, dir: &Path, ws: &str, progress: &Progress) -> Result<Committed> {
    generation::check_workspace_name(ws)?;
    let before = repo.store.counters();
    let parent = repo.block_on(generation::latest(&repo.store, ws))?;
    let parent_root = parent.as_ref().map(|p| repo.root_of(p)).transpose()?;
    // Trees of the parent are needed to skip unchanged files; gc keeps the latest.
    let res = snapshot_dir(repo, dir, parent_root, progress)?;
    let mut rec = record(NewGen {
        ws,
        parent: parent.as_ref(),
        kind: "snapshot",
        origin: None,
        root: res.root,
        tree: res.tree,
        write: res.write,
        epoch: parent.as_ref().map(|p| p.epoch).unwrap_or(0),
    });
    publish_checked(repo, &mut rec, &res.reused)?;
    Ok(Committed {
        generation: rec,
        tree: res.tree,
        write: res.write,
        requests: delta(before, repo.store.counters()),
    })
}

pub fn delta(
    a: crate::store::CounterSnapshot,
    b: crate::store::CounterSnapshot,
) -> crate::store::CounterSnapshot {
    crate::store::CounterSnapshot {
        puts: b.puts - a.puts,
        gets: b.gets - a.gets,
        lists: b.lists - a.lists,
        deletes: b.deletes - a.deletes,
        bytes_put: b.bytes_put - a.bytes_put,
        bytes_got: b.bytes_got - a.bytes_got,
    }
}

/// `owfs fork WS[@N] NEW`: NEW's first generation shares the source's root; no data is copied.
pub fn fork(repo: &Arc<Repo>, source: &GenRecord, new_ws: &str) -> Result<GenRecord> {
    generation::check_workspace_name(new_ws)?;
    if repo
        .block_on(generation::latest_number(&repo.store, new_ws))?
        .is_some()
    {
        return Err(Error::Conflict(format!(
            "workspace {new_ws:?} already exists; choose a new name (or `owfs rollback` to move an existing workspace)"
        )));
    }
    let mut rec = derived(source, new_ws, None, "fork");
    publish_checked(repo, &mut rec, &HashSet::from([repo.root_of(source)?]))?;
    Ok(rec)
}

/// `owfs rollback WS N`: a new generation whose content is that of N; history is kept. It
/// carries `epoch` (a mount's rollback, under its lease), else the latest generation's.
pub fn rollback(repo: &Arc<Repo>, ws: &str, n: u64, epoch: Option<u64>) -> Result<GenRecord> {
    let target = repo.block_on(generation::get_generation(&repo.store, ws, n))?;
    let latest = repo
        .block_on(generation::latest(&repo.store, ws))?
        .ok_or_else(|| Error::UnknownWorkspace(ws.to_string()))?;
    let mut rec = derived(&target, ws, Some(&latest), "rollback");
    if let Some(e) = epoch {
        rec.epoch = e;
    }
    publish_checked(repo, &mut rec, &HashSet::from([repo.root_of(&target)?]))?;
    Ok(rec)
}

/// A record of `source`'s content (its root, totals and databases, no new blobs) as the next
/// generation of `ws` after `parent` (generation 1 without one), of kind `kind`, carrying the
/// parent's epoch: what fork, rollback and the lease's fence publish.
pub fn derived(source: &GenRecord, ws: &str, parent: Option<&GenRecord>, kind: &str) -> GenRecord {
    GenRecord {
        format: GEN_FORMAT,
        workspace: ws.to_string(),
        number: parent.map(|p| p.number + 1).unwrap_or(1),
        parent: parent.map(|p| p.number),
        origin: Some(source.spec()),
        kind: kind.to_string(),
        epoch: parent.map(|p| p.epoch).unwrap_or(0),
        created_ms: now_ms(),
        root: source.root.clone(),
        files: source.files,
        dirs: source.dirs,
        bytes: source.bytes,
        bytes_new: 0,
        blobs_new: 0,
        sqlite: source.sqlite.clone(),
        nonce: new_nonce(),
        root_attr: source.root_attr,
        pack: None,
        pending: reachable_packs(source),
        embedded: None,
    }
}
