//! Splits (`services[].split`): a share of requests goes to the instances carrying a split's
//! tags (the canary case: 5% to `canary`), the rest to the instances in no split. Each share
//! has its own balancer over its own instances. An empty share falls back to the rest, and
//! an empty rest to the whole table.

use super::{AnyBalancer, BalanceSettings, Candidates};
use crate::upstream::Instance;

/// Shares are drawn in hundredths of a percent.
pub const BASIS_POINTS: u32 = 10_000;

/// Some of a table's instances and the balancer over them.
#[derive(Debug)]
pub struct Pool {
    /// Table indexes; `None`: the whole table.
    members: Option<Box<[usize]>>,
    pub balancer: AnyBalancer,
}

impl Pool {
    fn new(
        settings: &BalanceSettings,
        instances: &[Instance],
        members: Option<Vec<usize>>,
    ) -> Self {
        let members = members.map(Vec::into_boxed_slice);
        let candidates = Candidates::new(instances, members.as_deref());
        Self {
            balancer: AnyBalancer::build(settings.balance, &candidates),
            members,
        }
    }

    #[inline]
    pub fn candidates<'a>(&'a self, instances: &'a [Instance]) -> Candidates<'a> {
        Candidates::new(instances, self.members.as_deref())
    }
}

/// The pools of one table: the main one (the rest, or the whole table) and the splits.
#[derive(Debug)]
pub struct Pools {
    main: Pool,
    /// Each split's upper bound of the draw (cumulative basis points) and its pool; `None`
    /// when no instance carries its tags.
    splits: Box<[(u32, Option<Pool>)]>,
}

impl Pools {
    pub fn new(settings: &BalanceSettings, instances: &[Instance]) -> Self {
        if settings.splits.is_empty() {
            return Self {
                main: Pool::new(settings, instances, None),
                splits: Box::new([]),
            };
        }
        // An instance belongs to the first split whose tags it carries.
        let owner: Vec<Option<usize>> = instances
            .iter()
            .map(|i| settings.splits.iter().position(|s| i.has_tags(&s.tags)))
            .collect();
        let members_of = |split: Option<usize>| -> Vec<usize> {
            (0..instances.len())
                .filter(|&i| owner[i] == split)
                .collect()
        };
        let rest = members_of(None);
        let main = Pool::new(settings, instances, (!rest.is_empty()).then_some(rest));
        let mut bound = 0;
        let splits = (0..settings.splits.len())
            .map(|n| {
                bound += settings.splits[n].basis_points;
                let members = members_of(Some(n));
                let pool =
                    (!members.is_empty()).then(|| Pool::new(settings, instances, Some(members)));
                (bound, pool)
            })
            .collect();
        Self { main, splits }
    }

    /// The pool for one request: without splits, no draw at all.
    #[inline]
    pub fn choose(&self) -> &Pool {
        if self.splits.is_empty() {
            return &self.main;
        }
        let draw = fastrand::u32(..BASIS_POINTS);
        self.splits
            .iter()
            .find(|(bound, _)| draw < *bound)
            .and_then(|(_, pool)| pool.as_ref())
            .unwrap_or(&self.main)
    }

    /// Carries balancer state (round-robin cursors) over from the previous table's pools.
    pub fn carry_over(&self, previous: &Pools) {
        self.main.balancer.carry_over(&previous.main.balancer);
        for ((_, pool), (_, old)) in self.splits.iter().zip(previous.splits.iter()) {
            if let (Some(pool), Some(old)) = (pool, old) {
                pool.balancer.carry_over(&old.balancer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Balance, SplitConfig};

    fn tagged(tags: &[&[&str]]) -> Vec<Instance> {
        tags.iter()
            .enumerate()
            .map(|(n, t)| {
                let tags = t.iter().map(|s| s.to_string()).collect();
                Instance::new(format!("i{n}"), "h".into(), 80, tags, BTreeMap::new()).unwrap()
            })
            .collect()
    }

    fn canary_settings(basis_points: u32) -> BalanceSettings {
        BalanceSettings {
            balance: Balance::RoundRobin,
            splits: vec![SplitConfig {
                tags: vec!["canary".into()],
                basis_points,
            }],
        }
    }

    fn pick(pools: &Pools, instances: &[Instance]) -> usize {
        let pool = pools.choose();
        let candidates = pool.candidates(instances);
        candidates.index(pool.balancer.next(&candidates, None, 0))
    }

    #[test]
    fn five_percent_within_a_point_over_10000() {
        let instances = tagged(&[&["v1"], &["v1"], &["canary"], &["v1"]]);
        let pools = Pools::new(&canary_settings(500), &instances);
        let canary = (0..10_000)
            .filter(|_| pick(&pools, &instances) == 2)
            .count();
        assert!((400..=600).contains(&canary), "{canary} of 10,000");
    }

    #[test]
    fn an_empty_share_falls_back_to_the_rest_and_an_empty_rest_to_all() {
        let instances = tagged(&[&["v1"], &["v1"]]);
        let pools = Pools::new(&canary_settings(5000), &instances);
        assert!((0..1000).all(|_| pick(&pools, &instances) < 2));
        let all_canary = tagged(&[&["canary"], &["canary"]]);
        let pools = Pools::new(&canary_settings(500), &all_canary);
        let mut hits = [0; 2];
        for _ in 0..1000 {
            hits[pick(&pools, &all_canary)] += 1;
        }
        assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
    }
}
