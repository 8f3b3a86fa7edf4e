//! A [`ServiceTable`]: an immutable snapshot of one service's healthy instances plus its
//! balancer state, and [`Tried`], the instances one request already tried.

use crate::balance::{BalanceSettings, Pools};

use super::instance::Instance;

/// Instances already tried by one request, so a retry can prefer another. Inline (no heap);
/// beyond its capacity it forgets the oldest, which only weakens that preference.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried {
    slots: [usize; Tried::CAPACITY],
    len: usize,
}

impl Tried {
    const CAPACITY: usize = 8;

    pub fn insert(&mut self, index: usize) {
        self.slots[self.len % Self::CAPACITY] = index;
        self.len += 1;
    }

    pub fn contains(&self, index: usize) -> bool {
        self.slots[..self.len.min(Self::CAPACITY)].contains(&index)
    }
}

/// An immutable snapshot of one service's healthy instances plus balancer state.
#[derive(Debug)]
pub struct ServiceTable {
    pub(crate) instances: Box<[Instance]>,
    pools: Pools,
}

impl ServiceTable {
    /// Builds a table; instances are sorted by ID so equal sets compare equal.
    pub fn new(mut instances: Vec<Instance>, settings: &BalanceSettings) -> Self {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        let pools = Pools::new(settings, &instances);
        Self {
            instances: instances.into_boxed_slice(),
            pools,
        }
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Carries balancer state (round-robin cursors) over from the table this one replaces.
    pub fn carry_over(&self, previous: &ServiceTable) {
        self.pools.carry_over(&previous.pools);
    }

    /// How many instances are ejected right now.
    pub fn ejected_count(&self) -> usize {
        let mut now = None;
        self.instances
            .iter()
            .filter(|i| i.health.is_ejected(&mut now))
            .count()
    }

    /// Draws beyond this fall back to a scan, bounding `pick` on large tables.
    const MAX_DRAWS: usize = 8;

    /// Picks an instance for a request with hash `key` (`None` unless the balancer is
    /// `hash`): one neither tried by this request nor ejected if there is one, else an
    /// ejected one not tried, else any. Returns its index in this table.
    #[inline]
    pub fn pick(&self, tried: &Tried, key: Option<u64>) -> Option<(usize, &Instance)> {
        let count = self.instances.len();
        if count == 0 {
            return None;
        }
        let pool = self.pools.choose();
        let candidates = pool.candidates(&self.instances);
        let mut now = None;
        // Fresh draws first, so the turns of a skipped instance spread evenly over the others
        // instead of all landing on its neighbour.
        let mut start = None;
        for attempt in 0..candidates.len().min(Self::MAX_DRAWS) {
            let i = candidates.index(pool.balancer.next(&candidates, key, attempt));
            start.get_or_insert(i);
            if !tried.contains(i) && !self.instances[i].health.is_ejected(&mut now) {
                return Some((i, &self.instances[i]));
            }
        }
        let start = start.unwrap_or(0);
        self.scan(start, tried, &mut now)
    }

    /// The first instance from `start` on that is neither tried nor ejected, else an ejected
    /// one not tried, else `start`. Rare (every draw was tried or ejected): kept out of line.
    #[cold]
    #[inline(never)]
    fn scan(
        &self,
        start: usize,
        tried: &Tried,
        now: &mut Option<u64>,
    ) -> Option<(usize, &Instance)> {
        let count = self.instances.len();
        let mut ejected_fallback = None;
        for offset in 0..count {
            let i = (start + offset) % count;
            if tried.contains(i) {
                continue;
            }
            if self.instances[i].health.is_ejected(now) {
                ejected_fallback.get_or_insert(i);
                continue;
            }
            return Some((i, &self.instances[i]));
        }
        let index = ejected_fallback.unwrap_or(start);
        Some((index, &self.instances[index]))
    }
}
