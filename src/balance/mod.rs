//! Balancers: how one request's instance is chosen from a table, one file per algorithm
//! behind one trait (pingora-load-balancing's `selection/` is the model).
//!
//! - [`round_robin`]: in turn; smooth weighted round robin (nginx) when weights differ.
//! - [`random`]: uniform, or weighted by cumulative weights.
//! - [`least_request`]: power of two choices over requests in flight (Envoy LEAST_REQUEST,
//!   Linkerd P2C).
//! - [`hash`]: Maglev consistent hashing of a per-request key (`hash_on`).
//! - [`split`]: shares of traffic to instances by tag (`services[].split`), each share with
//!   its own balancer.
//!
//! A balancer is built off the request path, with its table, from the instances it chooses
//! among ([`Candidates`]). On the request path it answers positions with atomics and
//! arithmetic only: no lock, no allocation.

pub mod hash;
pub mod least_request;
pub mod random;
pub mod round_robin;
pub mod split;

use crate::config::{Balance, ServiceConfig, SplitConfig};
use crate::upstream::Instance;

pub use hash::Maglev;
pub use least_request::LeastRequest;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use split::Pools;

/// What a table's balancing takes from the service's config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BalanceSettings {
    pub balance: Balance,
    pub splits: Vec<SplitConfig>,
}

impl BalanceSettings {
    pub fn from_service(config: &ServiceConfig) -> Self {
        Self {
            balance: config.balance,
            splits: config.split.clone(),
        }
    }
}

/// The instances one balancer chooses among: a whole table, or a subset of it (a split).
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    instances: &'a [Instance],
    /// Indexes into `instances`; `None`: all of them, in order.
    members: Option<&'a [usize]>,
}

impl<'a> Candidates<'a> {
    pub fn new(instances: &'a [Instance], members: Option<&'a [usize]>) -> Self {
        Self { instances, members }
    }

    pub fn len(&self) -> usize {
        self.members.map_or(self.instances.len(), <[usize]>::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table index of the candidate at `position`.
    #[inline]
    pub fn index(&self, position: usize) -> usize {
        self.members.map_or(position, |members| members[position])
    }

    #[inline]
    pub fn get(&self, position: usize) -> &'a Instance {
        &self.instances[self.index(position)]
    }

    pub fn weights(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len()).map(|p| self.get(p).weight)
    }
}

/// One balancing algorithm.
pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// The balancer's state for `candidates` (a cycle, cumulative weights, a lookup table).
    fn build(candidates: &Candidates<'_>) -> Self
    where
        Self: Sized;

    /// The position (in `0..candidates.len()`, never called when empty) of this request's
    /// `attempt`-th draw. `key`: the request's hash key, for balancers that use one. Later
    /// draws are asked for when an earlier one was tried or ejected.
    fn next(&self, candidates: &Candidates<'_>, key: Option<u64>, attempt: usize) -> usize;

    /// Takes over what should survive a table change (a round-robin cursor).
    fn carry_over(&self, _previous: &Self)
    where
        Self: Sized,
    {
    }
}

/// The configured balancer, dispatched without a virtual call.
#[derive(Debug)]
pub enum AnyBalancer {
    RoundRobin(RoundRobin),
    Random(Random),
    LeastRequest(LeastRequest),
    Hash(Maglev),
}

impl AnyBalancer {
    pub fn build(balance: Balance, candidates: &Candidates<'_>) -> Self {
        match balance {
            Balance::RoundRobin => Self::RoundRobin(RoundRobin::build(candidates)),
            Balance::Random => Self::Random(Random::build(candidates)),
            Balance::LeastRequest => Self::LeastRequest(LeastRequest::build(candidates)),
            Balance::Hash => Self::Hash(Maglev::build(candidates)),
        }
    }

    #[inline]
    pub fn next(&self, candidates: &Candidates<'_>, key: Option<u64>, attempt: usize) -> usize {
        match self {
            Self::RoundRobin(b) => b.next(candidates, key, attempt),
            Self::Random(b) => b.next(candidates, key, attempt),
            Self::LeastRequest(b) => b.next(candidates, key, attempt),
            Self::Hash(b) => b.next(candidates, key, attempt),
        }
    }

    pub fn carry_over(&self, previous: &AnyBalancer) {
        if let (Self::RoundRobin(b), Self::RoundRobin(old)) = (self, previous) {
            b.carry_over(old);
        }
    }
}

/// Weights divided by their greatest common divisor (3:3:6 is 1:1:2).
pub(crate) fn reduced_weights(candidates: &Candidates<'_>) -> Vec<u32> {
    let gcd = candidates.weights().fold(0, gcd);
    candidates.weights().map(|w| w / gcd.max(1)).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use crate::upstream::Instance;

    /// Instance `i<n>` on port 9000 + n, weight 1.
    pub fn instance(n: usize) -> Instance {
        Instance::new(
            format!("i{n}"),
            "127.0.0.1".into(),
            9000 + n as u16,
            vec![],
            BTreeMap::new(),
        )
        .unwrap()
    }

    /// Instances `i0`, `i1`... with these weights.
    pub fn weighted(weights: &[u32]) -> Vec<Instance> {
        weights
            .iter()
            .enumerate()
            .map(|(n, &w)| instance(n).with_weight(w))
            .collect()
    }
}
