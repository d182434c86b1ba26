//! Hostile store contents (docs/decisions/hostile-store-contents.md): the lease record decoder,
//! given arbitrary bytes or a real record damaged on purpose, returns Ok or Err. It never
//! panics, allocates no more than about its input, and never returns a record the lease code
//! cannot go on from (an epoch with no successor). Unmodified records round-trip.

use lease::{decode, encode, is_free, Holder, LeaseConfig, LeaseRecord, FORMAT};
use proptest::prelude::*;
use proptest::sample::Index;

#[path = "../../chunkstore/tests/support/largest_alloc.rs"]
mod tracking;
use tracking::largest_alloc;

/// Decodes `b` as the lease of `ws`; checks the allocation bound and that an accepted record
/// is one the lease code can use.
fn check(b: &[u8]) {
    let (r, largest) = largest_alloc(|| decode(b, "ws"));
    assert!(
        largest <= b.len() + (64 << 10),
        "decode of {} bytes allocated {largest} bytes",
        b.len()
    );
    if let Ok(rec) = r {
        assert_eq!(rec.format, FORMAT);
        assert_eq!(rec.workspace, "ws");
        assert!(rec.epoch.checked_add(1).is_some());
        let cfg = LeaseConfig::default();
        for wall in [0, rec.expires_ms, u64::MAX] {
            let _ = is_free(&rec, wall, &cfg);
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    /// Overwrite at a position (extending if needed).
    Overwrite(Index, Vec<u8>),
}

/// What damage to JSON looks like: numbers out of range, other types, structure.
fn token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"18446744073709551615".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"4294967296".to_vec()),
        Just(b"null".to_vec()),
        Just(b"\"\\ud800\"".to_vec()),
        Just(b"[[[[[[[[".to_vec()),
        Just(b"{\"".to_vec()),
        Just(b"}".to_vec()),
        Just(vec![0xff, 0xfe]),
        prop::collection::vec(any::<u8>(), 1..16),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), token()).prop_map(|(i, t)| Mutation::Insert(i, t)),
        2 => (any::<Index>(), token()).prop_map(|(i, t)| Mutation::Overwrite(i, t)),
    ]
}

fn damage(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        match m {
            Mutation::Flip(i, x) if !b.is_empty() => {
                let i = i.index(b.len());
                b[i] ^= x;
            }
            Mutation::Truncate(i) if !b.is_empty() => b.truncate(i.index(b.len())),
            Mutation::Insert(i, t) => {
                let i = i.index(b.len() + 1);
                b.splice(i..i, t.iter().copied());
            }
            Mutation::Overwrite(i, t) => {
                let i = i.index(b.len() + 1);
                if b.len() < i + t.len() {
                    b.resize(i + t.len(), b' ');
                }
                b[i..i + t.len()].copy_from_slice(t);
            }
            _ => {}
        }
    }
    b
}

fn record() -> impl Strategy<Value = LeaseRecord> {
    let text = "[a-z0-9. \"\\\\\u{e9}\u{1F600}]{0,16}";
    let times = (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>());
    (
        0..u64::MAX,
        (text, text, any::<u32>()),
        times,
        any::<bool>(),
        text,
    )
        .prop_map(
            |(
                epoch,
                (node, host, pid),
                (acquired_ms, renewed_ms, expires_ms, ttl_ms),
                released,
                nonce,
            )| {
                LeaseRecord {
                    format: FORMAT,
                    workspace: "ws".into(),
                    epoch,
                    holder: Holder { node, host, pid },
                    acquired_ms,
                    renewed_ms,
                    expires_ms,
                    ttl_ms,
                    released,
                    nonce,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes(b in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (0usize..4096, any::<u64>()).prop_map(|(n, seed)| chunkstore::testdata::noise(n, seed)),
    ]) {
        check(&b);
    }

    #[test]
    fn damaged_record(r in record(), ms in prop::collection::vec(mutation(), 1..6)) {
        let enc = encode(&r).to_vec();
        prop_assert_eq!(decode(&enc, "ws").unwrap(), r);
        check(&damage(enc, &ms));
    }
}

#[test]
fn refused_records() {
    let good = LeaseRecord {
        format: FORMAT,
        workspace: "ws".into(),
        epoch: 3,
        holder: Holder {
            node: "n".into(),
            host: "h".into(),
            pid: 1,
        },
        acquired_ms: 1,
        renewed_ms: 2,
        expires_ms: 3,
        ttl_ms: 1,
        released: false,
        nonce: "x".into(),
    };
    assert_eq!(decode(&encode(&good), "ws").unwrap(), good);
    // The epoch the next holder could not follow (acquire takes epoch + 1).
    let last = LeaseRecord {
        epoch: u64::MAX,
        ..good.clone()
    };
    assert!(decode(&encode(&last), "ws").is_err());
    let other = LeaseRecord {
        workspace: "other".into(),
        ..good.clone()
    };
    assert!(decode(&encode(&other), "ws").is_err());
    let newer = LeaseRecord {
        format: FORMAT + 1,
        ..good
    };
    assert!(decode(&encode(&newer), "ws").is_err());
    // Nesting deeper than serde_json's limit (128) is an error, not a stack overflow.
    let mut deep = br#"{"format":1,"holder":"#.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 1 << 20));
    assert!(decode(&deep, "ws").is_err());
    // Long strings allocate what they hold, no more.
    let mut long = br#"{"format":1,"workspace":""#.to_vec();
    long.extend(std::iter::repeat_n(b'a', 1 << 20));
    check(&long);
}
