//! Round robin: one atomic add per pick. With unequal weights, a precomputed cycle of nginx's
//! smooth weighted round robin: exact over each cycle (weights 3:1 give 3 of every 4 picks)
//! and interleaved (a, b, a, a rather than a, a, a, b), read with the same single atomic add.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{reduced_weights, Balancer, Candidates};

/// The work to build a cycle is its length times the candidate count; weights are scaled
/// down proportionally (each at least 1) so this stays bounded for large tables.
const MAX_CYCLE_WORK: usize = 4_000_000;
/// The longest cycle kept, whatever the table size.
const MAX_CYCLE: usize = 65_536;

#[derive(Debug, Default)]
pub struct RoundRobin {
    /// The only mutable part, and only through one atomic add.
    next: AtomicUsize,
    /// Positions in smooth weighted order; `None` when all weights are equal.
    cycle: Option<Box<[u32]>>,
    /// The turn's remainder by the candidate count (or the cycle's length).
    turns: FastMod,
}

/// `a % d` for 32-bit `a` by two multiplications instead of a division (Lemire, Kaser and
/// Kurz, "Faster Remainder by Direct Computation", 2019). A 64-bit `div` is 25-40 cycles, the
/// larger part of a round-robin pick; the divisor is fixed for a table's life, so its
/// multiplier is computed once, when the table is built. The cursor is taken modulo 2^32
/// first: the order skips once every 4 billion picks.
#[derive(Debug, Clone, Copy, Default)]
struct FastMod {
    divisor: u64,
    multiplier: u64,
}

impl FastMod {
    fn new(divisor: usize) -> Self {
        let divisor = divisor.clamp(1, u32::MAX as usize) as u64;
        Self {
            divisor,
            multiplier: (u64::MAX / divisor).wrapping_add(1),
        }
    }

    #[inline]
    fn rem(self, turn: usize) -> usize {
        let low = self.multiplier.wrapping_mul(turn as u32 as u64);
        ((u128::from(low) * u128::from(self.divisor)) >> 64) as usize
    }
}

impl Balancer for RoundRobin {
    fn build(candidates: &Candidates<'_>) -> Self {
        let weights = reduced_weights(candidates);
        let cycle = match weights.iter().all(|&w| w == 1) {
            true => None,
            false => Some(smooth_cycle(&bounded(weights))),
        };
        let turns = FastMod::new(cycle.as_ref().map_or(candidates.len(), |c| c.len()));
        Self {
            next: AtomicUsize::new(0),
            cycle,
            turns,
        }
    }

    #[inline]
    fn next(&self, _candidates: &Candidates<'_>, _key: Option<u64>, _attempt: usize) -> usize {
        let turn = self.turns.rem(self.next.fetch_add(1, Ordering::Relaxed));
        match &self.cycle {
            None => turn,
            Some(cycle) => cycle[turn] as usize,
        }
    }

    /// The cursor carries over so a table change does not send the next request to the
    /// first instance of every replica at once.
    fn carry_over(&self, previous: &Self) {
        self.next
            .store(previous.next.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Weights scaled so their sum (the cycle) fits the bounds; each stays at least 1.
fn bounded(weights: Vec<u32>) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let limit = (MAX_CYCLE_WORK / weights.len().max(1)).clamp(weights.len(), MAX_CYCLE) as u64;
    if total <= limit {
        return weights;
    }
    weights
        .into_iter()
        .map(|w| ((u64::from(w) * limit / total) as u32).max(1))
        .collect()
}

/// nginx's smooth weighted round robin, run for one cycle (the sum of the weights): each
/// turn every candidate gains its weight, the highest (first on ties) is chosen and loses
/// the total.
fn smooth_cycle(weights: &[u32]) -> Box<[u32]> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::weighted;

    fn counts(weights: &[u32], picks: usize) -> Vec<usize> {
        let instances = weighted(weights);
        let candidates = Candidates::new(&instances, None);
        let rr = RoundRobin::build(&candidates);
        let mut hits = vec![0; weights.len()];
        for _ in 0..picks {
            hits[rr.next(&candidates, None, 0)] += 1;
        }
        hits
    }

    #[test]
    fn equal_weights_need_no_cycle_and_are_exactly_fair() {
        let instances = weighted(&[2, 2, 2]);
        assert!(RoundRobin::build(&Candidates::new(&instances, None))
            .cycle
            .is_none());
        assert_eq!(counts(&[1, 1, 1], 300), vec![100, 100, 100]);
    }

    #[test]
    fn weights_are_exact_over_a_cycle_and_smooth() {
        assert_eq!(counts(&[3, 1], 4000), vec![3000, 1000]);
        assert_eq!(counts(&[5, 1, 1], 7 * 100), vec![500, 100, 100]);
        // nginx's example: weights 5, 1, 1 give a a b a c a a, not a a a a a b c.
        assert_eq!(&*smooth_cycle(&[5, 1, 1]), &[0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn fast_remainder_equals_the_division() {
        for divisor in [1usize, 2, 3, 7, 10, 100, 999, 1000, 65_536, 4_000_000] {
            let fast = FastMod::new(divisor);
            let turns = (0..5_000).chain([u32::MAX as usize - 3, u32::MAX as usize]);
            for turn in turns.chain((0..64).map(|s| 1usize << (s % 32))) {
                assert_eq!(
                    fast.rem(turn),
                    (turn as u32 as usize) % divisor,
                    "{turn} % {divisor}"
                );
            }
        }
    }

    #[test]
    fn large_weights_are_scaled_not_dropped() {
        let weights: Vec<u32> = (0..1000).map(|n| 1000 + n).collect();
        let scaled = bounded(weights);
        let total: u32 = scaled.iter().sum();
        assert!(total as usize <= MAX_CYCLE_WORK / 1000 + 1000, "{total}");
        assert!(scaled.iter().all(|&w| w >= 1));
    }
}
