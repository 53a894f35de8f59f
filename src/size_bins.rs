//! Free ranges by size, for best fit: the smallest range at least `len`
//! long (ties: the lowest address) in a few word operations.
//!
//! Ranges fall into bins by length the way TLSF bins them: eight bins per
//! power of two, so a bin spans at most an eighth of its lengths. Each bin
//! keeps its `(len, start)` pairs sorted, and a bitmap says which bins hold
//! any: the best fit is the first pair at or after `(len, 0)` in `len`'s bin,
//! else the first pair of the next non-empty bin (a bit scan). This is exact
//! best fit, the same answer as one ordered set over all ranges, but a bin
//! holds few ranges, so the sorted `Vec`s stay short and the common cases
//! cost a binary search over a handful of entries instead of a B-tree
//! descent (measured in benches/hit_path.rs, `bestfit` rows).

/// Bins per power of two: 2^SUB_BITS.
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
/// One bin per length below `SUBS`, then `SUBS` per power of two.
const BINS: usize = (usize::BITS as usize) * SUBS;
const WORDS: usize = BINS / 64;

/// The bin of a range of `len` bytes (`len > 0`).
#[inline]
fn bin(len: usize) -> usize {
    debug_assert!(len > 0);
    let log = len.ilog2();
    if log < SUB_BITS {
        return len;
    }
    let sub = (len >> (log - SUB_BITS)) & (SUBS - 1);
    log as usize * SUBS + sub
}

/// `(len, start)` pairs in bins. See the module documentation.
#[derive(Debug)]
pub(crate) struct SizeBins {
    bins: Vec<Vec<(usize, usize)>>,
    /// Bit `b` set: bin `b` is not empty.
    occupied: [u64; WORDS],
}

impl Default for SizeBins {
    fn default() -> Self {
        Self {
            bins: (0..BINS).map(|_| Vec::new()).collect(),
            occupied: [0; WORDS],
        }
    }
}

impl SizeBins {
    pub(crate) fn insert(&mut self, len: usize, start: usize) {
        let b = bin(len);
        let entries = &mut self.bins[b];
        let at = entries.partition_point(|&entry| entry < (len, start));
        entries.insert(at, (len, start));
        self.occupied[b / 64] |= 1 << (b % 64);
    }

    pub(crate) fn remove(&mut self, len: usize, start: usize) {
        let b = bin(len);
        let entries = &mut self.bins[b];
        if let Ok(at) = entries.binary_search(&(len, start)) {
            entries.remove(at);
        } else {
            debug_assert!(false, "no free range ({len}, {start:#x})");
        }
        if entries.is_empty() {
            self.occupied[b / 64] &= !(1 << (b % 64));
        }
    }

    /// The first `(len, start)` in size order, at or after `(len, 0)`, for
    /// which `fits` holds.
    #[inline]
    pub(crate) fn find(
        &self,
        len: usize,
        mut fits: impl FnMut(usize, usize) -> bool,
    ) -> Option<(usize, usize)> {
        let first = bin(len);
        let entries = &self.bins[first];
        let from = entries.partition_point(|&(l, _)| l < len);
        if let Some(&found) = entries[from..].iter().find(|&&(l, s)| fits(l, s)) {
            return Some(found);
        }
        let mut b = first + 1;
        while b < BINS {
            let word = self.occupied[b / 64] >> (b % 64);
            if word == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += word.trailing_zeros() as usize;
            if let Some(&found) = self.bins[b].iter().find(|&&(l, s)| fits(l, s)) {
                return Some(found);
            }
            b += 1;
        }
        None
    }

    /// Every `(len, start)`, largest first. Visits only the bins the bitmap
    /// marks: `stats()` and the budget walk every range through here, and a
    /// walk of all 512 bins cost more than the ranges themselves (most of
    /// the best-fit tests' time under Miri, where `stats()` runs after each
    /// step).
    pub(crate) fn largest_first(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let occupied_bins = (0..WORDS).rev().flat_map(move |w| {
            let mut word = self.occupied[w];
            std::iter::from_fn(move || {
                (word != 0).then(|| {
                    let top = u64::BITS - 1 - word.leading_zeros();
                    word &= !(1 << top);
                    w * 64 + top as usize
                })
            })
        });
        occupied_bins.flat_map(|b| self.bins[b].iter().rev().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_grow_with_length_and_split_each_power_of_two_in_eight() {
        let mut previous = 0;
        for len in 1..5000 {
            let b = bin(len);
            assert!(b >= previous, "bins never go down");
            previous = b;
        }
        assert_eq!(bin(1024), bin(1024 + 127));
        assert_ne!(bin(1024), bin(1024 + 128));
        assert!(bin(usize::MAX) < BINS);
    }

    #[test]
    fn find_answers_like_an_ordered_set() {
        let mut bins = SizeBins::default();
        let mut set = std::collections::BTreeSet::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        // Miri runs it at a tenth of the steps.
        let steps = if cfg!(miri) { 300 } else { 4000 };
        for step in 0..steps {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = ((state % 50_000) as usize + 1) * 64;
            let start = step << 20;
            bins.insert(len, start);
            set.insert((len, start));
            if step % 3 == 0 {
                let &(l, s) = set.iter().nth((state % set.len() as u64) as usize).unwrap();
                set.remove(&(l, s));
                bins.remove(l, s);
            }
            let want = ((state >> 20) % 60_000) as usize * 64 + 1;
            let expected = set.range((want, 0)..).next().copied();
            assert_eq!(bins.find(want, |_, _| true), expected);
        }
        let all: Vec<_> = bins.largest_first().collect();
        let expected: Vec<_> = set.iter().rev().copied().collect();
        assert_eq!(all, expected);
    }
}
