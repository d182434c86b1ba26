//! chunkstore: the persistent half of owfs. A directory tree becomes a generation in an object
//! store: content-defined chunks (BLAKE3-named, zstd-compressed) in packs, one Merkle tree
//! node per directory, and a generation record published by a conditional write.

pub mod blobcache;
pub mod chunker;
pub mod codec;
pub mod error;
#[cfg(feature = "faults")]
pub mod faulty;
pub mod fetch;
pub mod gc;
pub mod generation;
pub mod hash;
pub mod index;
pub mod layout;
pub mod pack;
pub mod parts;
pub mod prepull;
pub mod private;
pub mod progress;
pub mod publish;
pub mod read;
pub mod rechunk;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod store;
#[cfg(feature = "faults")]
pub mod testdata;
pub mod tree;
pub mod writer;

pub use error::{Error, Result};
pub use generation::GenRecord;
pub use hash::Hash;
pub use repo::Repo;
pub use store::Store;
