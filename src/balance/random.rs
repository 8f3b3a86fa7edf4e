//! Random: a uniform draw, or with unequal weights a draw over cumulative weights (a binary
//! search, no allocation).

use super::{reduced_weights, Balancer, Candidates};

#[derive(Debug, Default)]
pub struct Random {
    /// Running sums of the weights; `None` when all weights are equal.
    cumulative: Option<Box<[u64]>>,
}

impl Balancer for Random {
    fn build(candidates: &Candidates<'_>) -> Self {
        let weights = reduced_weights(candidates);
        if weights.iter().all(|&w| w == 1) {
            return Self { cumulative: None };
        }
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        Self {
            cumulative: Some(cumulative),
        }
    }

    #[inline]
    fn next(&self, candidates: &Candidates<'_>, _key: Option<u64>, _attempt: usize) -> usize {
        match &self.cumulative {
            None => fastrand::usize(..candidates.len()),
            Some(cumulative) => {
                let total = cumulative[cumulative.len() - 1];
                let draw = fastrand::u64(..total);
                cumulative.partition_point(|&sum| sum <= draw)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::weighted;

    #[test]
    fn weights_three_to_one_give_three_quarters() {
        let instances = weighted(&[3, 1]);
        let candidates = Candidates::new(&instances, None);
        let random = Random::build(&candidates);
        let picks = 40_000;
        let first = (0..picks)
            .filter(|_| random.next(&candidates, None, 0) == 0)
            .count();
        let share = first as f64 / picks as f64;
        assert!((0.74..=0.76).contains(&share), "{share}");
    }

    #[test]
    fn uniform_uses_every_instance() {
        let instances = weighted(&[1, 1, 1]);
        let candidates = Candidates::new(&instances, None);
        let random = Random::build(&candidates);
        let mut hits = [0usize; 3];
        for _ in 0..300 {
            hits[random.next(&candidates, None, 0)] += 1;
        }
        assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
    }
}
