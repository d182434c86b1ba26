//! Framing of every structured object: magic, kind, format version, then a postcard body.
//! A reader refuses another kind or a newer version with a clear error instead of guessing.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 4] = b"OWFS";
/// Format version of trees, nodes, indexes and pack trailers written by this build. Version 2
/// added part lists (`Content::Parts`, `Content::Node`, inline parts); everything of version 1
/// decodes unchanged, so both are read.
pub const FORMAT_VERSION: u8 = 2;
const OLDEST_READ: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjKind {
    Tree = 1,
    Segment = 2,
    Index = 3,
    PackTrailer = 4,
    Node = 5,
}

pub fn encode<T: Serialize>(kind: ObjKind, value: &T) -> Vec<u8> {
    encode_version(kind, FORMAT_VERSION, value)
}

/// `encode` with another format version than `FORMAT_VERSION` (a kind whose layout moved on
/// alone: index objects).
pub fn encode_version<T: Serialize>(kind: ObjKind, version: u8, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.push(kind as u8);
    out.push(version);
    // Serializing plain data structures into a Vec cannot fail.
    postcard::to_io(value, &mut out).expect("postcard encoding into a Vec");
    out
}

pub fn decode<T: DeserializeOwned>(kind: ObjKind, bytes: &[u8], what: &str) -> Result<T> {
    check_header(kind, bytes, FORMAT_VERSION, what)?;
    decode_body(bytes, what)
}

/// Checks magic, kind and version (at most `newest`); returns the version, so that a kind
/// whose layout changed can decode each version its own way (`decode_body`).
pub fn check_header(kind: ObjKind, bytes: &[u8], newest: u8, what: &str) -> Result<u8> {
    if bytes.len() < 6 || &bytes[..4] != MAGIC {
        return Err(Error::corrupt(format!(
            "{what}: not an owfs object (bad magic)"
        )));
    }
    if bytes[4] != kind as u8 {
        return Err(Error::corrupt(format!(
            "{what}: expected object kind {}, found {}",
            kind as u8, bytes[4]
        )));
    }
    if !(OLDEST_READ..=newest).contains(&bytes[5]) {
        return Err(Error::Format {
            what: format!(
                "{what} has format version {}, this owfs reads versions {OLDEST_READ} to {newest}; use a matching owfs release",
                bytes[5]
            ),
        });
    }
    Ok(bytes[5])
}

/// The value after a header `check_header` accepted.
pub fn decode_body<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(&bytes[6..])
        .map_err(|e| Error::corrupt(format!("{what}: undecodable ({e}); truncated or damaged")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_other_kind_version_and_truncation() {
        let v: Vec<u32> = vec![1, 2, 3];
        let mut bytes = encode(ObjKind::Tree, &v);
        assert_eq!(decode::<Vec<u32>>(ObjKind::Tree, &bytes, "t").unwrap(), v);
        assert!(matches!(
            decode::<Vec<u32>>(ObjKind::Index, &bytes, "t"),
            Err(Error::Corrupt { .. })
        ));
        let short = &bytes[..bytes.len() - 1];
        assert!(matches!(
            decode::<Vec<u32>>(ObjKind::Tree, short, "t"),
            Err(Error::Corrupt { .. })
        ));
        bytes[5] = 99;
        assert!(matches!(
            decode::<Vec<u32>>(ObjKind::Tree, &bytes, "t"),
            Err(Error::Format { .. })
        ));
    }
}
