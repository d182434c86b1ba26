//! Exit statuses (docs/EXIT_CODES.md) and the hint printed under each error.

use crate::error::Error;

pub const INTERNAL: i32 = 1;
pub const USAGE: i32 = 2;
pub const NOT_FOUND: i32 = 3;
pub const UNREACHABLE: i32 = 4;
pub const ACCESS_DENIED: i32 = 5;
pub const MISSING_OBJECT: i32 = 6;
pub const CORRUPT: i32 = 7;
pub const FORMAT: i32 = 8;
pub const UNSAFE: i32 = 9;
pub const CONFLICT: i32 = 10;
pub const HELD: i32 = 11;
pub const LEASE_LOST: i32 = 13;
/// The mount's daemon could no longer answer every request and stopped (`Shared::halt`).
pub const STOPPED: i32 = 14;
pub const DRILL_FAILED: i32 = 12;

pub fn code(e: &Error) -> i32 {
    match e {
        Error::Store(e) => store_code(e),
        Error::Lease(e) => match e {
            lease::Error::Held { .. } | lease::Error::Timeout { .. } => HELD,
            lease::Error::Lost { .. } => LEASE_LOST,
            lease::Error::Config(_) => USAGE,
            lease::Error::Store(e) => store_code(e),
        },
        Error::Mounted(_) => HELD,
    }
}

fn store_code(e: &chunkstore::Error) -> i32 {
    use chunkstore::Error;
    match e {
        Error::BadStoreUrl { .. } | Error::BadName { .. } | Error::BadOption { .. } => USAGE,
        Error::UnknownWorkspace(_)
        | Error::UnknownGeneration { .. }
        | Error::NoGenerationAt { .. }
        | Error::UnknownPath { .. } => NOT_FOUND,
        Error::Unreachable { .. } => UNREACHABLE,
        Error::AccessDenied { .. } => ACCESS_DENIED,
        Error::Missing { .. } => MISSING_OBJECT,
        Error::Corrupt { .. } => CORRUPT,
        Error::Format { .. } => FORMAT,
        Error::Unsafe { .. } => UNSAFE,
        Error::Conflict(_) => CONFLICT,
        Error::Io { .. } | Error::Store { .. } => INTERNAL,
    }
}

pub fn hint(e: &Error) -> &'static str {
    const HELD_HINT: &str = "one writer per workspace: unmount it there (`owfs umount` hands it over at once), or mount with --wait or --takeover";
    match e {
        Error::Store(e) => store_hint(e),
        Error::Lease(e) => match e {
            lease::Error::Held { .. } | lease::Error::Timeout { .. } => HELD_HINT,
            lease::Error::Lost { .. } => "another node took the workspace over; writes after the loss were not committed. Remount to continue from the latest generation",
            lease::Error::Config(_) => "see `owfs mount --help` for the lease_* options and how they must relate",
            lease::Error::Store(e) => store_hint(e),
        },
        Error::Mounted(_) => HELD_HINT,
    }
}

fn store_hint(e: &chunkstore::Error) -> &'static str {
    use chunkstore::Error;
    match e {
        Error::BadStoreUrl { .. } => "give --store file:///abs/path or s3://bucket/prefix (or set OWFS_STORE)",
        Error::BadName { .. } => "see `owfs --help` for the forms of names",
        Error::BadOption { .. } => "see `owfs mount --help` for the options and their values",
        Error::UnknownWorkspace(_) => "`owfs workspaces` lists the workspaces of this store; check --store / OWFS_STORE",
        Error::UnknownGeneration { .. } => "`owfs log WS` lists the generations that exist (gc may have removed old ones)",
        Error::NoGenerationAt { .. } => "name a later time, or a generation by number (`owfs log WS` lists them)",
        Error::UnknownPath { .. } => "`owfs ls WS[@N] DIR` lists what is there",
        Error::Unreachable { .. } => {
            "check the network, the bucket name and AWS_ENDPOINT_URL; transient errors were already retried"
        }
        Error::AccessDenied { .. } => "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the store directory's permissions)",
        Error::Missing { .. } => {
            "the store lost an object this generation needs: run `owfs drill WS` to list every damaged path; older generations may be intact"
        }
        Error::Corrupt { .. } => {
            "stored data failed verification: run `owfs drill WS` to list every damaged path; nothing was written from it"
        }
        Error::Format { .. } => "this store was written by a different owfs format version",
        Error::Unsafe { .. } => "the manifest is malicious or damaged; nothing outside the target was touched",
        Error::Conflict(_) => "nothing was lost; read the message and run the command again",
        Error::Io { .. } => "check the local path and its permissions",
        Error::Store { .. } => "the store answered with an unexpected error; try again, or check the store's logs",
    }
}
