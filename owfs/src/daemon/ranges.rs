//! Sets of byte ranges: which parts of a file are local, written since the last cut, or saved
//! for the committer.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint, non-adjacent half-open ranges, keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(s, e)| *s..*e)
    }

    pub fn to_vec(&self) -> Vec<Range<u64>> {
        self.iter().collect()
    }

    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Absorb every range starting inside [start, end].
        let inside: Vec<(u64, u64)> = self.map.range(start..=end).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in inside {
            self.map.remove(&s);
            end = end.max(e);
        }
        self.map.insert(start, end);
    }

    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut touched: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.map.range(..start).next_back() {
            if e > start {
                touched.push((s, e));
            }
        }
        touched.extend(self.map.range(start..end).map(|(s, e)| (*s, *e)));
        for (s, e) in touched {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, start);
            }
            if e > end {
                self.map.insert(end, e);
            }
        }
    }

    /// The parts of `[start, end)` not in the set.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = start;
        if let Some((_, &e)) = self.map.range(..=start).next_back() {
            pos = pos.max(e);
        }
        for (&s, &e) in self.map.range(start..end) {
            if s > pos {
                out.push(pos..s);
            }
            pos = pos.max(e);
        }
        if pos < end {
            out.push(pos..end);
        }
        out
    }

    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= end || self.gaps(start, end).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..40), 0..60)) {
            let mut set = RangeSet::default();
            let mut model = [false; 256];
            for (add, s, len) in ops {
                let e = s + len;
                if add { set.insert(s, e) } else { set.remove(s, e) }
                for b in &mut model[s as usize..e as usize] { *b = add; }
                // Canonical form: disjoint and non-adjacent.
                let v = set.to_vec();
                for w in v.windows(2) { prop_assert!(w[0].end < w[1].start); }
                for r in &v { prop_assert!(r.start < r.end); }
            }
            for i in 0..256u64 {
                prop_assert_eq!(set.covers(i, i + 1), model[i as usize]);
            }
            let gaps = set.gaps(10, 150);
            for i in 10..150u64 {
                let in_gap = gaps.iter().any(|g| g.contains(&i));
                prop_assert_eq!(in_gap, !model[i as usize]);
            }
        }
    }
}
