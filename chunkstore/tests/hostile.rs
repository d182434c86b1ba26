//! Hostile store contents (docs/decisions/hostile-store-contents.md): every decoder of an
//! object read from the store, given arbitrary bytes or a real encoding damaged on purpose,
//! returns Ok or Err. It never panics, and no single allocation it makes exceeds the bound
//! the decision states, whatever a length field claims. Unmodified encodings round-trip.
//!
//! A tracking global allocator (tests/support/largest_alloc.rs) records the largest
//! allocation made on the current thread, so `largest_alloc` measures one call.

use std::collections::BTreeMap;
use std::sync::Arc;

use chunkstore::codec::{self, ObjKind, FORMAT_VERSION, MAGIC};
use chunkstore::generation::{decode_record, DbState, GenRecord, RootAttr, WalState};
use chunkstore::hash::Hash;
use chunkstore::index::IndexFile;
use chunkstore::pack::{
    compress, max_raw_len, open_blob, read_trailer, BlobKind, PackBuilder, PackEntry,
};
use chunkstore::repo::{decode_config, StoreConfig};
use chunkstore::tree::{ChunkRef, Content, Entry, Kind, Segment, SegmentRef, Tree};
use chunkstore::Repo;
use proptest::prelude::*;
use proptest::sample::Index;

#[path = "support/largest_alloc.rs"]
mod tracking;
use tracking::largest_alloc;

/// Largest allocation a postcard decoder may make: serde preallocates a sequence from its
/// length field only up to 1 MiB (`serde::__private::size_hint::cautious`), postcard checks a
/// byte string's length against the input before copying it. The rest is messages.
const POSTCARD_ALLOC: usize = (1 << 20) + (64 << 10);

/// Largest allocation `IndexFile::decode` may make for `stored` bytes (see index.rs).
fn index_alloc(stored: usize) -> usize {
    chunkstore::index::max_body_len(stored) + POSTCARD_ALLOC
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Damage

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    Truncate(Index),
    Extend(Vec<u8>),
    Insert(Index, Vec<u8>),
    /// Overwrite at a position (extending if needed): a huge length field, LE or varint.
    Overwrite(Index, Vec<u8>),
}

/// Length fields as the formats spell them, mostly huge.
fn length_field() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(u32::MAX.to_le_bytes().to_vec()),
        Just(u64::MAX.to_le_bytes().to_vec()),
        Just((u32::MAX / 2).to_le_bytes().to_vec()),
        // postcard varints: u32::MAX, u64::MAX, 2^28 - 1
        Just(vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
        Just(vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ]),
        Just(vec![0xff, 0xff, 0xff, 0x7f]),
        any::<u32>().prop_map(|v| v.to_le_bytes().to_vec()),
        any::<u64>().prop_map(|v| v.to_le_bytes().to_vec()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        3 => (any::<Index>(), length_field()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

fn damage(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        match m {
            Mutation::Flip(i, x) if !b.is_empty() => {
                let i = i.index(b.len());
                b[i] ^= x;
            }
            Mutation::Truncate(i) if !b.is_empty() => b.truncate(i.index(b.len())),
            Mutation::Extend(e) => b.extend_from_slice(e),
            Mutation::Insert(i, e) => {
                let i = i.index(b.len() + 1);
                b.splice(i..i, e.iter().copied());
            }
            Mutation::Overwrite(i, f) => {
                let i = i.index(b.len() + 1);
                if b.len() < i + f.len() {
                    b.resize(i + f.len(), 0);
                }
                b[i..i + f.len()].copy_from_slice(f);
            }
            _ => {}
        }
    }
    b
}

/// Arbitrary bytes, 0..4096 of them: short ones byte by byte (they shrink well), long ones
/// from a seed (generating 4 KiB byte by byte dominated the run time).
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (0usize..4096, any::<u64>()).prop_map(|(n, seed)| chunkstore::testdata::noise(n, seed)),
    ]
}

/// A valid object header of `kind` followed by arbitrary bytes: reaches the postcard body.
fn framed(kind: ObjKind) -> impl Strategy<Value = Vec<u8>> {
    bytes().prop_map(move |body| {
        let mut b = MAGIC.to_vec();
        b.extend([kind as u8, FORMAT_VERSION]);
        b.extend(body);
        b
    })
}

// ---------------------------------------------------------------------------------------
// Valid values

fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}

fn chunk_ref() -> impl Strategy<Value = ChunkRef> {
    (hash(), any::<u32>()).prop_map(|(hash, len)| ChunkRef { hash, len })
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        Just(Content::Empty),
        prop::collection::vec(chunk_ref(), 0..5).prop_map(Content::Chunks),
        prop::collection::vec(
            (hash(), any::<u64>(), any::<u32>()).prop_map(|(hash, bytes, chunks)| SegmentRef {
                hash,
                bytes,
                chunks
            }),
            0..3
        )
        .prop_map(Content::Segments),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::File),
        Just(Kind::Dir),
        Just(Kind::Symlink),
        Just(Kind::Fifo),
        Just(Kind::CharDev),
        Just(Kind::BlockDev),
    ]
}

fn small_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..12)
}

/// A tree `Tree::decode` accepts: safe names, sorted and unique, subtree iff directory.
fn tree() -> impl Strategy<Value = Tree> {
    let name = prop::collection::vec(
        any::<u8>().prop_filter("no / or NUL", |b| *b != 0 && *b != b'/'),
        1..12,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..");
    let attrs = (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<i64>(),
        any::<u64>(),
        any::<u64>(),
    );
    let more = (
        any::<u64>(),
        any::<i64>(),
        any::<u64>(),
        prop::collection::vec((small_bytes(), small_bytes()), 0..3),
        small_bytes(),
        hash(),
        content(),
    );
    prop::collection::btree_map(name, (kind(), attrs, more), 0..8).prop_map(|m| Tree {
        entries: m
            .into_iter()
            .map(
                |(
                    name,
                    (
                        kind,
                        (mode, uid, gid, mtime_ns, size, link),
                        (ino, ctime_ns, rdev, xattrs, target, sub, content),
                    ),
                )| Entry {
                    name,
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime_ns,
                    size,
                    link,
                    ino,
                    ctime_ns,
                    rdev,
                    xattrs,
                    target,
                    subtree: (kind == Kind::Dir).then_some(sub),
                    content,
                },
            )
            .collect(),
    })
}

fn blob_kind() -> impl Strategy<Value = BlobKind> {
    prop_oneof![
        Just(BlobKind::Data),
        Just(BlobKind::Tree),
        Just(BlobKind::Segment)
    ]
}

fn pack_entry() -> impl Strategy<Value = PackEntry> {
    (
        hash(),
        blob_kind(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(hash, kind, offset, stored_len, raw_len, compressed)| PackEntry {
                hash,
                kind,
                offset,
                stored_len,
                raw_len,
                compressed,
            },
        )
}

fn index_file() -> impl Strategy<Value = IndexFile> {
    prop::collection::vec((hash(), prop::collection::vec(pack_entry(), 0..6)), 0..5).prop_map(
        |packs| IndexFile {
            packs,
            homes: Vec::new(),
        },
    )
}

/// Blobs for a pack: compressible (zeros, repeated text) and incompressible ones.
fn blobs() -> impl Strategy<Value = Vec<(BlobKind, Vec<u8>)>> {
    let raw = prop_oneof![
        (0usize..20_000).prop_map(|n| vec![0u8; n]),
        (0usize..2_000).prop_map(|n| b"owfs ".repeat(n)),
        (0usize..3_000, any::<u64>()).prop_map(|(n, s)| chunkstore::testdata::noise(n, s)),
    ];
    prop::collection::vec((blob_kind(), raw), 1..5)
}

fn build_pack(blobs: &[(BlobKind, Vec<u8>)]) -> (Hash, Vec<u8>, Vec<PackEntry>) {
    let mut b = PackBuilder::default();
    for (kind, raw) in blobs {
        let (stored, compressed) = compress(raw, 3);
        b.push(Hash::of(raw), *kind, &stored, raw.len(), compressed);
    }
    b.finish()
}

fn gen_record() -> impl Strategy<Value = GenRecord> {
    let ids = (
        any::<u64>(),
        any::<Option<u64>>(),
        any::<u64>(),
        any::<u64>(),
    );
    let counts = (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    );
    let text = "[a-z0-9@ \"\\\\\u{e9}\u{1F600}]{0,12}";
    let wal = prop::option::of(
        (
            any::<(u32, u32, u32)>(),
            any::<u64>(),
            any::<[u32; 2]>(),
            any::<u64>(),
        )
            .prop_map(
                |((salt1, salt2, checkpoint_seq), last_commit, commit_checksum, torn_frames)| {
                    WalState {
                        salt1,
                        salt2,
                        checkpoint_seq,
                        last_commit,
                        commit_checksum,
                        torn_frames,
                    }
                },
            ),
    );
    let state = (
        any::<(u32, u32, u32)>(),
        text,
        wal,
        any::<bool>(),
        text,
        prop::option::of(text),
    )
        .prop_map(
            |((v, page_size, page_count), journal_mode, wal, hot_journal, checksum, corruption)| {
                DbState {
                    v,
                    page_size,
                    page_count,
                    journal_mode,
                    wal,
                    hot_journal,
                    checksum,
                    corruption,
                }
            },
        );
    let sqlite = prop::collection::btree_map(text, state, 0..3);
    let root_attr = prop::option::of(
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<i64>()).prop_map(
            |(mode, uid, gid, mtime_ns)| RootAttr {
                mode,
                uid,
                gid,
                mtime_ns,
            },
        ),
    );
    (
        ids,
        counts,
        prop::option::of(text),
        text,
        hash(),
        sqlite,
        root_attr,
    )
        .prop_map(
            |(
                (number, parent, epoch, created_ms),
                (files, dirs, bytes, bytes_new, blobs_new),
                origin,
                kind,
                root,
                sqlite,
                root_attr,
            )| GenRecord {
                format: chunkstore::generation::GEN_FORMAT,
                workspace: "ws".into(),
                number,
                parent,
                origin,
                kind,
                epoch,
                created_ms,
                root: root.to_hex(),
                files,
                dirs,
                bytes,
                bytes_new,
                blobs_new,
                sqlite: sqlite.into_iter().collect::<BTreeMap<_, _>>(),
                nonce: chunkstore::generation::new_nonce(),
                root_attr,
                pack: None,
                pending: Vec::new(),
                embedded: None,
            },
        )
}

/// Store configurations, valid and not: the interesting chunk sizes around FastCDC's limits.
fn config_json() -> impl Strategy<Value = Vec<u8>> {
    let size = prop_oneof![
        Just(0u32),
        Just(1),
        Just(63),
        Just(64),
        Just(256),
        Just(1024),
        Just(16 << 10),
        Just(64 << 10),
        Just(256 << 10),
        Just(1 << 20),
        Just((1 << 20) + 1),
        Just(4_194_304),
        Just(16_777_216),
        Just(16_777_218),
        Just(u32::MAX),
        any::<u32>(),
    ];
    let level = prop_oneof![
        Just(0i32),
        Just(1),
        Just(3),
        Just(22),
        Just(23),
        Just(-7),
        any::<i32>()
    ];
    (size.clone(), size.clone(), size, level, any::<u64>()).prop_map(
        |(min, avg, max, level, ms)| {
            serde_json::to_vec_pretty(&StoreConfig {
                format: 1,
                chunk_min: min,
                chunk_avg: avg,
                chunk_max: max,
                zstd_level: level,
                created_ms: ms,
            })
            .unwrap()
        },
    )
}

// ---------------------------------------------------------------------------------------
// Decoders under test, each with its bound checked

fn tree_decode(b: &[u8]) {
    let (_r, largest) = largest_alloc(|| Tree::decode(b, "d"));
    assert!(
        largest <= POSTCARD_ALLOC,
        "Tree::decode allocated {largest} bytes"
    );
}

fn segment_decode(b: &[u8]) {
    let (_r, largest) = largest_alloc(|| Segment::decode(b, "s"));
    assert!(
        largest <= POSTCARD_ALLOC,
        "Segment::decode allocated {largest} bytes"
    );
}

fn index_decode(b: &[u8]) {
    let (_r, largest) = largest_alloc(|| IndexFile::decode(b, "i"));
    assert!(
        largest <= index_alloc(b.len()),
        "IndexFile::decode of {} bytes allocated {largest} bytes",
        b.len()
    );
}

fn trailer_decode(b: &[u8]) {
    let (_r, largest) = largest_alloc(|| read_trailer(b, "p"));
    assert!(
        largest <= POSTCARD_ALLOC,
        "read_trailer allocated {largest} bytes"
    );
}

static NOISE: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| chunkstore::testdata::noise(1 << 20, 1));

fn config_decode(b: &[u8]) {
    let (r, largest) = largest_alloc(|| decode_config(b, "file:///s"));
    assert!(
        largest <= b.len() + (64 << 10),
        "decode_config allocated {largest} bytes"
    );
    if let Ok(cfg) = r {
        // What the store is then used for must not panic either: chunking with its
        // parameters (FastCDC asserts its limits) and compressing at its level.
        let p = chunkstore::chunker::ChunkParams {
            min: cfg.chunk_min,
            avg: cfg.chunk_avg,
            max: cfg.chunk_max,
        };
        let data = &NOISE[..(3 * cfg.chunk_max as usize).min(NOISE.len())];
        let mut total = 0usize;
        chunkstore::chunker::chunk_reader::<_, std::io::Error>(data, p, |c| {
            assert!(c.len() <= p.max as usize);
            total += c.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(total, data.len());
        let _ = compress(&data[..4096.min(data.len())], cfg.zstd_level);
    }
}

fn record_decode(b: &[u8]) {
    let (_r, largest) = largest_alloc(|| decode_record(b, "ws", 7));
    assert!(
        largest <= b.len() + (64 << 10),
        "decode_record allocated {largest} bytes"
    );
}

/// What a reader does with an index entry: take its stored bytes out of the pack, then
/// `open_blob`. Checks the allocation bound: the entry's `raw_len`, within its kind's cap.
fn blob_open(entry: &PackEntry, pack: &[u8]) {
    let start = entry.offset as usize;
    let Some(stored) = start
        .checked_add(entry.stored_len as usize)
        .and_then(|end| pack.get(start..end))
    else {
        return;
    };
    let (r, largest) = largest_alloc(|| open_blob(entry, stored, "p"));
    let bound = (entry.raw_len as usize)
        .min(max_raw_len(entry.kind))
        .max(stored.len())
        + (64 << 10);
    assert!(
        largest <= bound,
        "open_blob of {entry:?} allocated {largest} bytes (bound {bound})"
    );
    if let Ok(raw) = r {
        assert_eq!(raw.len(), entry.raw_len as usize);
        assert_eq!(Hash::of(&raw), entry.hash);
    }
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn tree_arbitrary(b in bytes(), f in framed(ObjKind::Tree)) {
        tree_decode(&b);
        tree_decode(&f);
    }

    #[test]
    fn tree_damaged(t in tree(), ms in mutations()) {
        let enc = t.encode();
        prop_assert_eq!(Tree::decode(&enc, "d").unwrap(), t);
        tree_decode(&damage(enc, &ms));
    }

    #[test]
    fn segment_arbitrary(b in bytes(), f in framed(ObjKind::Segment)) {
        segment_decode(&b);
        segment_decode(&f);
    }

    #[test]
    fn segment_damaged(chunks in prop::collection::vec(chunk_ref(), 0..64), ms in mutations()) {
        let s = Segment { chunks };
        let enc = s.encode();
        prop_assert_eq!(Segment::decode(&enc, "s").unwrap(), s);
        segment_decode(&damage(enc, &ms));
    }

    #[test]
    fn codec_other_kinds(b in framed(ObjKind::PackTrailer), ms in mutations()) {
        // The framing itself, for a value of another type and a damaged header.
        let v: Vec<String> = vec!["a".into(), "bc".into()];
        let enc = codec::encode(ObjKind::Index, &v);
        prop_assert_eq!(codec::decode::<Vec<String>>(ObjKind::Index, &enc, "x").unwrap(), v);
        let damaged = damage(enc, &ms);
        let (_r, largest) = largest_alloc(|| codec::decode::<Vec<String>>(ObjKind::Index, &damaged, "x"));
        prop_assert!(largest <= POSTCARD_ALLOC);
        let (_r, largest) = largest_alloc(|| codec::decode::<Vec<PackEntry>>(ObjKind::PackTrailer, &b, "x"));
        prop_assert!(largest <= POSTCARD_ALLOC);
    }

    #[test]
    fn index_arbitrary(b in bytes()) {
        index_decode(&b);
        // A valid zstd frame around arbitrary bytes reaches the object decoder.
        index_decode(&zstd::bulk::compress(&b, 1).unwrap());
    }

    #[test]
    fn index_damaged(f in index_file(), ms in mutations()) {
        let enc = f.encode();
        let back = IndexFile::decode(&enc, "i").unwrap();
        prop_assert_eq!(back.packs, f.packs.clone());
        index_decode(&damage(enc, &ms));
        // Damage to the body under a valid frame.
        let body = codec::encode(ObjKind::Index, &f);
        index_decode(&zstd::bulk::compress(&damage(body, &ms), 3).unwrap());
    }

    #[test]
    fn trailer_arbitrary(b in bytes(), tlen in any::<u32>()) {
        trailer_decode(&b);
        let mut b = b;
        b.extend(tlen.to_le_bytes());
        b.extend(b"OWPK");
        trailer_decode(&b);
    }

    #[test]
    fn pack_damaged(blobs in blobs(), ms in mutations(), tlen in length_field()) {
        let (_name, pack, entries) = build_pack(&blobs);
        prop_assert_eq!(read_trailer(&pack, "p").unwrap(), entries.clone());
        for e in &entries {
            blob_open(e, &pack);
        }
        let damaged = damage(pack.clone(), &ms);
        trailer_decode(&damaged);
        for e in &entries {
            blob_open(e, &damaged);
        }
        // The trailer's length field, overwritten.
        let mut p = pack.clone();
        let n = p.len();
        let f = &tlen[..4];
        p[n - 8..n - 4].copy_from_slice(f);
        trailer_decode(&p);
    }

    #[test]
    fn blob_damaged_entry(blobs in blobs(), hostile in pack_entry(), pick in any::<Index>(),
                          which in 0usize..6, field in length_field()) {
        // A real entry with one field replaced (a damaged or hostile index), against the
        // real pack, or a wholly arbitrary entry.
        let (_name, pack, entries) = build_pack(&blobs);
        let mut e = *pick.get(&entries);
        let huge = u32::from_le_bytes(field[..4].try_into().unwrap());
        match which {
            0 => e.raw_len = huge,
            1 => e.stored_len = huge,
            2 => e.offset = huge,
            3 => e.compressed = !e.compressed,
            4 => e.kind = hostile.kind,
            _ => e = hostile,
        }
        blob_open(&e, &pack);
    }

    #[test]
    fn config_arbitrary(b in bytes(), c in config_json(), ms in mutations()) {
        config_decode(&b);
        config_decode(&c);
        config_decode(&damage(c, &ms));
    }

    #[test]
    fn record_arbitrary(b in bytes()) {
        record_decode(&b);
    }

    #[test]
    fn record_damaged(
        mut r in gen_record(),
        blobs in prop::option::of(prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..4)),
        ms in mutations(),
    ) {
        let n = r.number;
        // With a pack inside (a mount's small commit) or without.
        let pack = blobs.map(|blobs| {
            let mut p = chunkstore::pack::PackBuilder::default();
            for b in &blobs {
                p.push(Hash::of(b), chunkstore::pack::BlobKind::Data, b, b.len(), false);
            }
            p
        });
        if pack.is_some() {
            r.name_embedded_pack();
        }
        let (enc, entries) = chunkstore::generation::encode_record(&r, pack);
        r.embedded = entries.map(std::sync::Arc::new);
        prop_assert_eq!(decode_record(&enc, "ws", n).unwrap(), r);
        let damaged = damage(enc, &ms);
        let (_r, largest) = largest_alloc(|| decode_record(&damaged, "ws", n));
        prop_assert!(largest <= damaged.len() + (64 << 10));
    }
}

// ---------------------------------------------------------------------------------------
// Length fields at their maximum: refused, quickly, without allocating what they claim

/// A zstd frame of one raw block (`payload`) whose header declares `content_size`.
fn zstd_frame_claiming(content_size: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
    // Frame header descriptor: 8-byte content size, single segment, no checksum, no dict.
    f.push(0xe0);
    f.extend(content_size.to_le_bytes());
    let header = 1 | ((payload.len() as u32) << 3); // last block, raw
    f.extend(&header.to_le_bytes()[..3]);
    f.extend(payload);
    f
}

#[test]
fn huge_declared_sizes_are_refused_without_allocating_them() {
    let t0 = std::time::Instant::now();
    // A blob whose entry and zstd frame both claim 4 GiB.
    let payload = b"not 4 GiB";
    let stored = zstd_frame_claiming(u32::MAX as u64, payload);
    for kind in [BlobKind::Data, BlobKind::Tree, BlobKind::Segment] {
        let e = PackEntry {
            hash: Hash::of(payload),
            kind,
            offset: 0,
            stored_len: stored.len() as u32,
            raw_len: u32::MAX,
            compressed: true,
        };
        let (r, largest) = largest_alloc(|| open_blob(&e, &stored, "p"));
        assert!(r.is_err());
        assert!(largest < 1 << 20, "{kind:?}: allocated {largest} bytes");
    }
    // The largest data blob the format allows, claimed by a small frame: refused once the
    // frame ends, having allocated at most the claim.
    let e = PackEntry {
        hash: Hash::of(payload),
        kind: BlobKind::Data,
        offset: 0,
        stored_len: stored.len() as u32,
        raw_len: max_raw_len(BlobKind::Data) as u32,
        compressed: true,
    };
    let (r, largest) = largest_alloc(|| open_blob(&e, &stored, "p"));
    assert!(r.is_err());
    assert!(largest <= max_raw_len(BlobKind::Data));
    // An index object whose frame claims 2^64 - 1 bytes.
    let idx = zstd_frame_claiming(u64::MAX, payload);
    let (r, largest) = largest_alloc(|| IndexFile::decode(&idx, "i"));
    assert!(r.is_err());
    assert!(
        largest <= index_alloc(idx.len()),
        "index: allocated {largest} bytes"
    );
    // A decompression bomb: 64 MiB of zeros in a few KiB. Its body is refused past the
    // bound, not decompressed whole.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let (r, largest) = largest_alloc(|| IndexFile::decode(&bomb, "i"));
    assert!(r.is_err());
    assert!(
        largest <= index_alloc(bomb.len()),
        "bomb: allocated {largest} bytes"
    );
    // postcard length fields at u32::MAX and u64::MAX, in every structured object.
    for huge in [
        vec![0xff, 0xff, 0xff, 0xff, 0x0f],
        vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    ] {
        for kind in [
            ObjKind::Tree,
            ObjKind::Segment,
            ObjKind::PackTrailer,
            ObjKind::Index,
        ] {
            let mut b = MAGIC.to_vec();
            b.extend([kind as u8, FORMAT_VERSION]);
            b.extend(&huge);
            b.extend([0u8; 64]);
            tree_decode(&b);
            segment_decode(&b);
            index_decode(&zstd::bulk::compress(&b, 1).unwrap());
            let mut pack = b.clone();
            pack.extend((b.len() as u32).to_le_bytes());
            pack.extend(b"OWPK");
            trailer_decode(&pack);
        }
    }
    // A pack trailer length of u32::MAX.
    let (_n, mut pack, _e) = build_pack(&[(BlobKind::Data, b"x".to_vec())]);
    let n = pack.len();
    pack[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(read_trailer(&pack, "p").is_err());
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn deeply_nested_json_is_refused() {
    // serde_json stops at 128 levels: no stack overflow (an abort, not a panic).
    let mut b = br#"{"format":1,"sqlite":{"a":"#.to_vec();
    b.extend(std::iter::repeat_n(b'[', 1 << 20));
    assert!(decode_record(&b, "ws", 1).is_err());
    let mut c = br#"{"format":"#.to_vec();
    c.extend(std::iter::repeat_n(b'[', 1 << 20));
    assert!(decode_config(&c, "u").is_err());
}

#[test]
fn configs_refused_and_accepted() {
    let ok = StoreConfig::default();
    let json = |c: &StoreConfig| serde_json::to_vec_pretty(c).unwrap();
    assert_eq!(
        decode_config(&json(&ok), "u").unwrap().chunk_max,
        ok.chunk_max
    );
    for bad in [
        StoreConfig {
            chunk_max: u32::MAX,
            ..ok.clone()
        },
        StoreConfig {
            chunk_max: 0,
            ..ok.clone()
        },
        StoreConfig {
            chunk_min: 0,
            ..ok.clone()
        },
        StoreConfig {
            chunk_avg: ok.chunk_max * 2,
            ..ok.clone()
        },
        StoreConfig {
            chunk_min: ok.chunk_avg * 2,
            ..ok.clone()
        },
        StoreConfig {
            chunk_avg: ok.chunk_avg + 1,
            ..ok.clone()
        },
        StoreConfig {
            zstd_level: 1000,
            ..ok.clone()
        },
    ] {
        assert!(decode_config(&json(&bad), "u").is_err(), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The repository's own read path: index entries pointing anywhere in a real pack

fn repo_with_pack() -> (
    tempfile::TempDir,
    tokio::runtime::Runtime,
    Arc<Repo>,
    Hash,
    Vec<PackEntry>,
) {
    let dir = tempfile::tempdir().unwrap();
    let (rt, repo) = chunkstore::testdata::file_repo(dir.path());
    let store = repo.store.clone();
    let raw = [
        (BlobKind::Data, vec![0u8; 10_000]),
        (BlobKind::Tree, Tree::default().encode()),
        (BlobKind::Segment, chunkstore::testdata::noise(5_000, 3)),
    ];
    let (name, bytes, entries) = build_pack(&raw);
    rt.block_on(store.put(&chunkstore::pack::pack_key(&name), bytes.into()))
        .unwrap();
    repo.ensure_index().unwrap();
    repo.add_to_index(name, &entries);
    (dir, rt, repo, name, entries)
}

#[test]
fn repo_reads_real_entries() {
    let (_dir, _rt, repo, _name, entries) = repo_with_pack();
    for e in &entries {
        let raw = repo.read_blob(&e.hash, "x").unwrap();
        assert_eq!(raw.len(), e.raw_len as usize);
    }
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn repo_read_blob_hostile_entry(hostile in pack_entry(), pick in any::<Index>(),
                                    which in 0usize..6, field in length_field()) {
        thread_local! {
            static REPO: (tempfile::TempDir, tokio::runtime::Runtime, Arc<Repo>, Hash, Vec<PackEntry>) = repo_with_pack();
        }
        REPO.with(|(_dir, _rt, repo, name, entries)| {
            let mut e = *pick.get(entries);
            let huge = u32::from_le_bytes(field[..4].try_into().unwrap());
            match which {
                0 => e.raw_len = huge,
                1 => e.stored_len = huge,
                2 => e.offset = huge,
                3 => e.kind = hostile.kind,
                4 => { e.offset = huge; e.stored_len = huge; }
                _ => e = PackEntry { hash: e.hash, ..hostile },
            }
            // A fresh hash, so earlier cases' entries (first one wins) do not shadow it.
            e.hash = hostile.hash;
            repo.add_to_index(*name, &[e]);
            let (_r, largest) = largest_alloc(|| repo.read_blob(&e.hash, "x"));
            let bound = (e.raw_len as usize).min(max_raw_len(e.kind)) + (1 << 20);
            assert!(largest <= bound, "{e:?}: allocated {largest} bytes");
        });
    }
}
