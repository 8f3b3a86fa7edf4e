//! Least request: the power of two choices (Envoy's LEAST_REQUEST, Linkerd's P2C). Two
//! distinct candidates are drawn at random and the one with fewer requests in flight (per
//! unit of weight) wins. A slow instance piles up requests in flight and so loses most
//! draws; unlike "least of all", every gateway replica does not rush to the same instance.

use super::{Balancer, Candidates};

#[derive(Debug, Default)]
pub struct LeastRequest {
    /// Whether weights differ (then in-flight counts are compared per unit of weight).
    weighted: bool,
}

impl Balancer for LeastRequest {
    fn build(candidates: &Candidates<'_>) -> Self {
        let mut weights = candidates.weights();
        let first = weights.next();
        Self {
            weighted: weights.any(|w| Some(w) != first),
        }
    }

    /// Not inlined: keeps `pick` small enough for the round-robin path to inline.
    #[inline(never)]
    fn next(&self, candidates: &Candidates<'_>, _key: Option<u64>, _attempt: usize) -> usize {
        let count = candidates.len();
        if count == 1 {
            return 0;
        }
        let a = fastrand::usize(..count);
        let mut b = fastrand::usize(..count - 1);
        if b >= a {
            b += 1;
        }
        let (first, second) = (candidates.get(a), candidates.get(b));
        let (load_a, load_b) = (first.in_flight() as u64, second.in_flight() as u64);
        let a_wins = match self.weighted {
            false => load_a <= load_b,
            // (in_flight + 1) / weight, cross-multiplied.
            true => {
                (load_a + 1) * u64::from(second.weight) <= (load_b + 1) * u64::from(first.weight)
            }
        };
        if a_wins {
            a
        } else {
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balance::testing::weighted;

    #[tokio::test]
    async fn busy_instances_lose_their_draws() {
        let instances = weighted(&[1, 1, 1]);
        let candidates = Candidates::new(&instances, None);
        let balancer = LeastRequest::build(&candidates);
        // Instance 0 holds 10 requests in flight, the others none.
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(instances[0].acquire(100, Duration::ZERO).await.unwrap());
        }
        let picks = 3000;
        let busy = (0..picks)
            .filter(|_| balancer.next(&candidates, None, 0) == 0)
            .count();
        // It wins only when both draws are... never: two distinct candidates, one is idle.
        assert_eq!(busy, 0);
        drop(held);
        let idle = (0..picks)
            .filter(|_| balancer.next(&candidates, None, 0) == 0)
            .count();
        assert!(idle > 600, "{idle}: an idle instance gets its share again");
    }
}
