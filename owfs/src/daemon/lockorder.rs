//! The daemon's lock order, checked at run time in every build (a broken order is a deadlock
//! waiting for the wrong moment, so it is cheaper to find it at once, with its name, than as
//! a hung mount). Locks are taken in this order and never the other way round:
//!
//! 1. `Shared::gate` (RwLock): every mutation holds it shared, the cut exclusively.
//! 2. `Shared::table` (the inode table).
//! 3. a file's `FileData::st` (its bytes' state); several files may be held at once.
//!
//! Each thread counts the locks it holds per rank; taking a lock while holding one of a
//! later rank (or the gate or the table a second time) panics, naming both. The cost is a
//! thread-local update per lock.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rank {
    Gate = 0,
    Table = 1,
    File = 2,
}

const RANKS: [Rank; 3] = [Rank::Gate, Rank::Table, Rank::File];

thread_local! {
    static HELD: Cell<[u32; 3]> = const { Cell::new([0; 3]) };
}

fn acquire(r: Rank) {
    HELD.with(|h| {
        let mut held = h.get();
        for later in RANKS.iter().filter(|l| **l as usize > r as usize) {
            assert!(
                held[*later as usize] == 0,
                "owfs bug: lock order: {r:?} taken while holding {later:?}"
            );
        }
        assert!(
            r == Rank::File || held[r as usize] == 0,
            "owfs bug: lock order: {r:?} taken twice by one thread"
        );
        held[r as usize] += 1;
        h.set(held);
    });
}

fn release(r: Rank) {
    HELD.with(|h| {
        let mut held = h.get();
        held[r as usize] -= 1;
        h.set(held);
    });
}

/// A mutex of a given rank.
pub struct Ordered<T> {
    rank: Rank,
    inner: Mutex<T>,
}

impl<T> Ordered<T> {
    pub const fn new(rank: Rank, v: T) -> Ordered<T> {
        Ordered {
            rank,
            inner: Mutex::new(v),
        }
    }

    pub fn lock(&self) -> OrderedGuard<'_, T> {
        acquire(self.rank);
        OrderedGuard {
            rank: self.rank,
            guard: self.inner.lock(),
        }
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }
}

pub struct OrderedGuard<'a, T> {
    rank: Rank,
    guard: MutexGuard<'a, T>,
}

impl<'a, T> OrderedGuard<'a, T> {
    /// The underlying guard, for a condition variable's wait (which gives the lock up and
    /// takes it back; the thread takes no other lock meanwhile).
    pub fn inner(&mut self) -> &mut MutexGuard<'a, T> {
        &mut self.guard
    }
}

impl<T> Deref for OrderedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for OrderedGuard<'_, T> {
    fn drop(&mut self) {
        release(self.rank);
    }
}

/// The cut gate: rank `Gate`, shared or exclusive.
pub struct Gate(RwLock<()>);

pub struct GateGuard<G>(#[allow(dead_code)] G);

impl<G> Drop for GateGuard<G> {
    fn drop(&mut self) {
        release(Rank::Gate);
    }
}

impl Gate {
    pub const fn new() -> Gate {
        Gate(RwLock::new(()))
    }

    pub fn read(&self) -> GateGuard<RwLockReadGuard<'_, ()>> {
        acquire(Rank::Gate);
        GateGuard(self.0.read())
    }

    pub fn write(&self) -> GateGuard<RwLockWriteGuard<'_, ()>> {
        acquire(Rank::Gate);
        GateGuard(self.0.write())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_in_order_pass_and_out_of_order_panic() {
        let gate = Gate::new();
        let table = Ordered::new(Rank::Table, 0u32);
        let (f1, f2) = (Ordered::new(Rank::File, 1u8), Ordered::new(Rank::File, 2u8));
        {
            let _g = gate.read();
            let _t = table.lock();
            let _a = f1.lock();
            let _b = f2.lock();
        }
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let _a = f1.lock();
                let _t = table.lock();
            })
            .join()
        });
        let msg = *r
            .expect_err("table after a file")
            .downcast::<String>()
            .unwrap();
        assert!(msg.contains("Table taken while holding File"), "{msg}");
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let _t = table.lock();
                let _g = gate.write();
            })
            .join()
        });
        assert!(r.is_err(), "the gate after the table");
        // This thread's counts were left balanced by the guards above.
        let _g = gate.write();
        let _t = table.lock();
    }
}
