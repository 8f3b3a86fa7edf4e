//! One service instance as discovery reported it, and its passive health: consecutive
//! failures, ejection, and the requests in flight to it (the connection budget that
//! `least_request` also reads).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hyper::http::uri::Authority;
use tokio::sync::Notify;

/// Milliseconds on a process-wide monotonic clock (never 0, so 0 can mean "unset").
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Passive health of one instance, learned from the gateway's own tries. Shared by every
/// table that lists the instance, so a Consul update does not forgive an ejection.
#[derive(Debug, Default)]
pub struct InstanceHealth {
    pub(crate) consecutive_failures: AtomicU32,
    /// `now_ms()` until which the instance gets no traffic; 0 when not ejected.
    pub(crate) ejected_until_ms: AtomicU64,
    pub(crate) ejections: AtomicU32,
    /// Requests in flight to the instance (over HTTP/1.1: its connections in use).
    in_flight: AtomicUsize,
    /// Requests waiting for a slot, and their wake-up.
    waiting: AtomicUsize,
    released: Notify,
}

impl InstanceHealth {
    /// `now` is computed only when an ejection is on record: the common case reads one atomic.
    pub(crate) fn is_ejected(&self, now: &mut Option<u64>) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && *now.get_or_insert_with(now_ms) < until
    }

    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }
}

/// One request's hold on an instance's connection budget; released on drop.
#[derive(Debug)]
pub struct InstanceSlot(Arc<InstanceHealth>);

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.released.notify_one();
        }
    }
}

/// One healthy service instance, as discovery reported it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Consul's service ID, unique per agent; tables are sorted by it.
    pub id: String,
    /// `Service.Address`, or `Node.Address` when the service left it empty.
    pub address: String,
    pub port: u16,
    /// `address:port` (bracketed for IPv6), pre-built so requests do not format it.
    pub authority: Authority,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// Relative share of traffic (Consul's `Service.Weights.Passing`); at least 1.
    pub weight: u32,
    pub health: Arc<InstanceHealth>,
}

/// Equal when discovery says the same thing; passive health is not part of identity.
impl PartialEq for Instance {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.authority == other.authority
            && self.tags == other.tags
            && self.meta == other.meta
            && self.weight == other.weight
    }
}

impl Eq for Instance {}

/// Why an [`Instance`] could not be built from discovery data.
#[derive(Debug, thiserror::Error)]
#[error("instance {id:?}: {address:?}:{port} is not a valid host:port")]
pub struct InvalidInstance {
    pub id: String,
    pub address: String,
    pub port: u16,
}

impl Instance {
    /// An instance of weight 1.
    pub fn new(
        id: String,
        address: String,
        port: u16,
        tags: Vec<String>,
        meta: BTreeMap<String, String>,
    ) -> Result<Self, InvalidInstance> {
        let text = if address.contains(':') && !address.starts_with('[') {
            format!("[{address}]:{port}")
        } else {
            format!("{address}:{port}")
        };
        match text.parse::<Authority>() {
            Ok(authority) if port != 0 && !address.is_empty() => Ok(Self {
                id,
                address,
                port,
                authority,
                tags,
                meta,
                weight: 1,
                health: Arc::default(),
            }),
            _ => Err(InvalidInstance { id, address, port }),
        }
    }

    /// The same instance with `weight` (0 counts as 1: an instance in the table gets traffic).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Whether the instance carries every one of `tags`.
    pub fn has_tags(&self, tags: &[String]) -> bool {
        tags.iter().all(|t| self.tags.contains(t))
    }

    /// A slot among the instance's `limit` in-flight requests, waiting up to `wait` for one
    /// to free up (`upstream.max_connections_per_instance`): a flood of requests, or of
    /// client resets, cannot open unbounded connections to one instance.
    pub async fn acquire(&self, limit: usize, wait: Duration) -> Option<InstanceSlot> {
        if let Some(slot) = self.try_acquire(limit) {
            return Some(slot);
        }
        let health = &self.health;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let released = health.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            health.waiting.fetch_add(1, Ordering::SeqCst);
            let slot = match self.try_acquire(limit) {
                Some(slot) => Some(slot),
                None => tokio::time::timeout_at(deadline, released)
                    .await
                    .ok()
                    .and(None),
            };
            health.waiting.fetch_sub(1, Ordering::SeqCst);
            if slot.is_some() || tokio::time::Instant::now() >= deadline {
                return slot.or_else(|| self.try_acquire(limit));
            }
        }
    }

    fn try_acquire(&self, limit: usize) -> Option<InstanceSlot> {
        let health = &self.health;
        if health.in_flight.fetch_add(1, Ordering::SeqCst) < limit {
            return Some(InstanceSlot(health.clone()));
        }
        health.in_flight.fetch_sub(1, Ordering::SeqCst);
        None
    }

    /// Requests in flight to this instance now.
    pub fn in_flight(&self) -> usize {
        self.health.in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_authority_is_bracketed() {
        let i = Instance::new("a".into(), "::1".into(), 80, vec![], BTreeMap::new()).unwrap();
        assert_eq!(i.authority.as_str(), "[::1]:80");
        assert!(Instance::new("b".into(), "".into(), 80, vec![], BTreeMap::new()).is_err());
        assert!(Instance::new("c".into(), "h".into(), 0, vec![], BTreeMap::new()).is_err());
    }

    #[test]
    fn weight_is_part_of_identity_and_at_least_one() {
        let a = Instance::new("a".into(), "h".into(), 80, vec![], BTreeMap::new()).unwrap();
        assert_eq!(a.weight, 1);
        assert_eq!(a.clone().with_weight(0).weight, 1);
        assert_ne!(a, a.clone().with_weight(3));
    }
}
