//! Garbage collection: retention of generations, then deletion of packs no generation of any
//! workspace references. Safe while commits run, by two rules (docs/decisions/gc-safety.md):
//! nothing younger than the grace period is touched, and a pack is first condemned (dropped
//! from the index, marked under `gc/condemned/`) and deleted only by a later run, at least a
//! grace period after, that finds it still unreferenced. A committer refuses to publish if a
//! blob it reused sits in a condemned pack.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::generation::{self, now_ms};
use crate::hash::Hash;
use crate::index::IndexFile;
use crate::pack::{pack_key, read_trailer, PackEntry};
use crate::read::chunk_list;
use crate::repo::Repo;
use crate::tree::{Content, Kind, Part};

const CONDEMNED: &str = "gc/condemned";

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub dry_run: bool,
    /// Keep the newest N generations of each workspace (None: no count rule).
    pub keep_last: Option<usize>,
    /// Keep generations newer than this (None: no age rule).
    pub keep_within: Option<Duration>,
    /// Objects younger than this are never touched, and a condemned pack waits this long.
    pub grace: Duration,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub workspaces: u64,
    pub generations_kept: u64,
    pub generations_deleted: Vec<String>,
    pub live_blobs: u64,
    pub packs_total: u64,
    pub packs_condemned: u64,
    pub packs_deleted: u64,
    pub packs_resurrected: u64,
    pub bytes_deleted: u64,
    /// Unreferenced blobs inside packs that still hold live ones (not repacked).
    pub bytes_dead_in_live_packs: u64,
    /// Packs copied out of the generation records this run deleted, to their own keys.
    pub packs_moved_out_of_records: u64,
    pub index_files_merged: u64,
}

fn condemned_key(pack: &Hash) -> String {
    format!("{CONDEMNED}/{}", pack.to_hex())
}

/// Condemned packs and when each was condemned.
pub(crate) async fn condemned(repo: &Repo) -> Result<HashMap<Hash, i64>> {
    Ok(repo
        .store
        .list(CONDEMNED)
        .await?
        .into_iter()
        .filter_map(|l| Some((Hash::from_hex(l.key.rsplit('/').next()?)?, l.modified_ms)))
        .collect())
}

/// Called by committers just before publishing.
pub fn check_reused_not_condemned(repo: &Arc<Repo>, reused: &HashSet<Hash>) -> Result<()> {
    check_reused_against(repo, reused, &repo.block_on(condemned(repo))?)
}

/// `check_reused_not_condemned` with a listing of condemned packs up to `max_age` old
/// (`Repo::condemned_listing`): for a mount, whose gc runs have a grace of 15 minutes at
/// least (the CLI refuses less while a workspace is mounted), so a listing a minute old is
/// as safe as a fresh one (docs/decisions/gc-safety.md).
pub fn check_reused_not_condemned_within(
    repo: &Arc<Repo>,
    reused: &HashSet<Hash>,
    max_age: std::time::Duration,
) -> Result<()> {
    check_reused_against(repo, reused, &*repo.condemned_listing(max_age)?)
}

fn check_reused_against(
    repo: &Arc<Repo>,
    reused: &HashSet<Hash>,
    marked: &HashMap<Hash, i64>,
) -> Result<()> {
    if marked.is_empty() {
        return Ok(());
    }
    for h in reused {
        if let Some((pack, _)) = repo.with_index(|i| i.get(h)) {
            if marked.contains_key(&pack) {
                return Err(Error::Conflict(format!(
                    "gc condemned pack {} while this commit reused blob {}; nothing was published, run the command again",
                    pack.short(),
                    h.short()
                )));
            }
        }
    }
    Ok(())
}

/// Every blob reachable from `root` into `live`; shared subtrees are walked once.
pub fn mark(repo: &Arc<Repo>, root: Hash, live: &mut HashSet<Hash>) -> Result<()> {
    let mut stack = vec![(root, String::from("/"))];
    while let Some((tree_hash, dir)) = stack.pop() {
        if !live.insert(tree_hash) {
            continue;
        }
        let tree = repo.read_tree(&tree_hash, &dir)?;
        for e in &tree.entries {
            match (&e.kind, &e.content) {
                (Kind::Dir, _) => {
                    let sub = e.subtree.expect("validated: a directory has a subtree");
                    stack.push((sub, format!("{}{}/", dir, e.name_lossy())));
                }
                (_, Content::Chunks(cs)) => live.extend(cs.iter().map(|c| c.hash)),
                (_, Content::Parts(ps)) => live.extend(ps.iter().filter_map(Part::blob)),
                (_, Content::Segments(ss)) => {
                    for s in ss {
                        if live.insert(s.hash) {
                            let path = format!("{}{}", dir, e.name_lossy());
                            let chunks = chunk_list(repo, &Content::Segments(vec![*s]), &path)?;
                            live.extend(chunks.iter().filter_map(Part::blob));
                        }
                    }
                }
                (_, Content::Node(root)) => {
                    // A node already marked was walked with everything under it.
                    let path = format!("{}{}", dir, e.name_lossy());
                    let mut chunks = Vec::new();
                    crate::parts::walk(
                        repo,
                        root,
                        &path,
                        |n| live.insert(n.hash),
                        |ps| chunks.extend(ps.iter().filter_map(Part::blob)),
                    )?;
                    live.extend(chunks);
                }
                (_, Content::Empty) => {}
            }
        }
    }
    Ok(())
}

pub fn gc(repo: &Arc<Repo>, opts: &GcOptions) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let now = now_ms() as i64;
    let grace_ms = opts.grace.as_millis() as i64;
    let store = &repo.store;

    // 1. Retention: which generations stay. The latest of each workspace always does.
    let mut kept = Vec::new();
    let mut doomed = Vec::new();
    // The newest generation of each workspace when this run listed them.
    let mut newest: HashMap<String, u64> = HashMap::new();
    for ws in repo.block_on(generation::list_workspaces(store))? {
        report.workspaces += 1;
        let numbers = repo.block_on(generation::list_generations(store, &ws))?;
        let Some(&latest) = numbers.last() else {
            continue;
        };
        newest.insert(ws.clone(), latest);
        let count_keep: HashSet<u64> = match opts.keep_last {
            Some(n) => numbers.iter().rev().take(n.max(1)).copied().collect(),
            None => HashSet::new(),
        };
        let rules = opts.keep_last.is_some() || opts.keep_within.is_some();
        for &n in &numbers {
            let rec = repo.block_on(generation::get_generation(store, &ws, n))?;
            let young = opts
                .keep_within
                .is_some_and(|d| now - (rec.created_ms as i64) <= d.as_millis() as i64);
            let keep = !rules || n == latest || count_keep.contains(&n) || young;
            if keep {
                report.generations_kept += 1;
                kept.push(rec);
            } else {
                report.generations_deleted.push(rec.spec());
                doomed.push(rec);
            }
        }
    }

    // 2. Mark. A tree that cannot be read stops gc: deleting on an incomplete mark loses data.
    repo.reset_index();
    repo.refresh_index()?;
    // Packs no index object names yet (a mount writes its commits' index object after up
    // to 16 of them, or never if it crashed) are read by their trailers: their blobs are
    // located for the mark, and the packs judged and kept in the new index like the others.
    // (Condemned packs stay out: the sweep below reads those itself.)
    repo.adopt_unindexed()?;
    // Packs inside records (a mount's small commits, docs/decisions/one-request-a-commit.md):
    // every record was read whole above, so each one's pack is known. A record about to be
    // deleted first has its pack copied to the pack's own key, where the sweep below judges
    // it like any other (a blob in it may be live, or reused by a commit running now).
    for rec in kept.iter().chain(&doomed) {
        repo.root_of(rec)?;
    }
    let packs = repo.block_on(store.list("packs"))?;
    let listed: HashSet<Hash> = packs
        .iter()
        .filter_map(|p| p.key.rsplit('/').next().and_then(Hash::from_hex))
        .collect();
    let mut changed = false;
    for rec in &doomed {
        let Some(name) = rec.pack_name()? else {
            continue;
        };
        if listed.contains(&name) || opts.dry_run {
            continue;
        }
        repo.block_on(store.copy(&rec.key(), &pack_key(&name)))?;
        repo.forget_home(&name);
        report.packs_moved_out_of_records += 1;
        changed = true;
    }
    let mut live = HashSet::new();
    for rec in &kept {
        mark(repo, rec.root_hash()?, &mut live)?;
    }
    // Listed again after the mark: a pack uploaded meanwhile, named by an index object the
    // mark merged (and this run deletes), is swept and kept in the new index like the others.
    // The copies made above are in it, each judged by its own time: a new object on S3; on a
    // file:// store a hard link, with its record's time.
    let packs = repo.block_on(store.list("packs"))?;
    report.live_blobs = live.len() as u64;
    // Generation records go only once the mark is complete.
    if !opts.dry_run {
        for rec in &doomed {
            repo.block_on(generation::delete_generation(
                store,
                &rec.workspace,
                rec.number,
            ))?;
        }
    }

    // 3. Sweep, pack by pack.
    let index_files: Vec<String> = repo.with_index(|i| i.files.clone());
    let by_pack = repo.with_index(|i| i.by_pack());
    let marked = repo.block_on(condemned(repo))?;
    report.packs_total = packs.len() as u64;
    let mut keep_in_index: Vec<(Hash, Vec<PackEntry>)> = Vec::new();
    let mut to_delete: Vec<Hash> = Vec::new();
    // The packs inside kept records stay where they are, named with their homes.
    // So do those of records published after this run listed them (an index object this
    // run merged may name one, and nothing else would name it again). A home older than
    // the listing that is not a kept record was deleted (its pack copied out first).
    let kept_keys: HashSet<String> = kept.iter().map(|r| r.key()).collect();
    let home_stays = |home: &str| {
        kept_keys.contains(home)
            || generation::parse_record_key(home)
                .is_some_and(|(ws, n)| newest.get(&ws).is_none_or(|&latest| n > latest))
    };
    let mut homes = Vec::new();
    for (name, home) in repo.with_index(|i| i.homed()) {
        if listed.contains(&name) || !home_stays(&home) {
            continue;
        }
        let Some(entries) = by_pack.get(&name) else {
            continue;
        };
        changed |= !repo.with_index(|i| i.is_named(&name));
        keep_in_index.push((name, entries.clone()));
        homes.push((name, home));
    }
    for p in packs {
        let Some(name) = p.key.rsplit('/').next().and_then(Hash::from_hex) else {
            continue;
        };
        let entries = by_pack.get(&name).cloned();
        let is_live = entries
            .as_ref()
            .is_some_and(|es| es.iter().any(|e| live.contains(&e.hash)));
        let young = now - p.modified_ms < grace_ms;
        if is_live {
            let entries = match entries {
                Some(es) => es,
                None => unreachable!("live implies indexed"),
            };
            report.bytes_dead_in_live_packs += entries
                .iter()
                .filter(|e| !live.contains(&e.hash))
                .map(|e| e.stored_len as u64)
                .sum::<u64>();
            if marked.contains_key(&name) {
                report.packs_resurrected += 1;
                changed = true;
                if !opts.dry_run {
                    repo.block_on(store.delete(&condemned_key(&name)))?;
                }
            }
            keep_in_index.push((name, entries));
            continue;
        }
        if marked
            .get(&name)
            .is_some_and(|&since| p.modified_ms >= since)
        {
            // Written again (same content, same name) after it was condemned: a commit
            // uploaded it anew. It is not condemned any more.
            report.packs_resurrected += 1;
            changed = true;
            if !opts.dry_run {
                repo.block_on(store.delete(&condemned_key(&name)))?;
            }
            if let Some(es) = entries {
                keep_in_index.push((name, es));
            }
            continue;
        }
        if let Some(&since) = marked.get(&name) {
            // Condemned earlier; is it referenced by something published since? Only the
            // pack's own trailer knows its blobs if the index dropped it.
            let es = match entries {
                Some(es) => es,
                None => {
                    let bytes = repo.block_on(store.get(&pack_key(&name)))?;
                    read_trailer(&bytes, &format!("pack {}", name.short()))?
                }
            };
            // Needed only for live blobs that no other (uncondemned) pack holds.
            let elsewhere = |h: &Hash| {
                repo.with_index(|i| i.get(h))
                    .is_some_and(|(p, _)| p != name && !marked.contains_key(&p))
            };
            if es
                .iter()
                .any(|e| live.contains(&e.hash) && !elsewhere(&e.hash))
            {
                report.packs_resurrected += 1;
                changed = true;
                if !opts.dry_run {
                    repo.block_on(store.delete(&condemned_key(&name)))?;
                }
                keep_in_index.push((name, es));
            } else if now - since >= grace_ms {
                to_delete.push(name);
                report.bytes_deleted += p.size;
                changed = true;
            }
            continue;
        }
        if young {
            if let Some(es) = entries {
                keep_in_index.push((name, es));
            }
            continue;
        }
        report.packs_condemned += 1;
        changed = true;
        if !opts.dry_run {
            repo.block_on(store.put(&condemned_key(&name), now.to_string().into()))?;
        }
    }
    report.packs_deleted = to_delete.len() as u64;

    // 4. One index object for what stays, then the old ones go, then condemned packs.
    if opts.dry_run || (!changed && index_files.len() <= 1) {
        return Ok(report);
    }
    let file = IndexFile {
        packs: keep_in_index,
        homes,
    };
    let bytes = file.encode();
    let key = file.key(now_ms(), &bytes);
    repo.block_on(store.put(&key, bytes.into()))?;
    for old in &index_files {
        repo.block_on(store.delete(old))?;
    }
    report.index_files_merged = index_files.len() as u64;
    for name in to_delete {
        repo.block_on(store.delete(&pack_key(&name)))?;
        repo.block_on(store.delete(&condemned_key(&name)))?;
    }
    repo.reset_index();
    Ok(report)
}
