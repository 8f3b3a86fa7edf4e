//! Per-client-address state, shared by every connection from one address: how many
//! connections it holds (capped, as nginx's `limit_conn` and HAProxy's `src_conn_cur` do) and
//! how many requests it abandons before their answer (the HTTP/2 rapid-reset pattern of
//! CVE-2023-44487), throttled with a token bucket.
//!
//! The map is locked only when a connection opens or closes and when a request is abandoned;
//! a request in flight reads one atomic of its client ([`Client::is_throttled`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a client that spent its reset budget is refused.
const THROTTLE_FOR: Duration = Duration::from_secs(1);
/// The reset budget holds this many seconds of `reset_rate`, so a burst (a browser leaving a
/// page with requests in flight) is never throttled.
const RESET_BURST_SECONDS: u32 = 2;

/// What one client address may do.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Connections held open at once; 0: no limit.
    pub max_connections: usize,
    /// Requests abandoned per second before the client is throttled; 0: no limit.
    pub reset_rate: u32,
}

/// Every client address with a connection open.
pub struct Clients {
    limits: ClientLimits,
    map: Mutex<HashMap<IpAddr, Arc<Client>>>,
}

/// One client address.
pub struct Client {
    /// Connections open; changed only under the map's lock.
    connections: Mutex<usize>,
    /// Set while the client is refused for abandoning too many requests.
    throttled: AtomicBool,
    resets: Mutex<ResetBudget>,
    reset_rate: u32,
}

struct ResetBudget {
    tokens: f64,
    refilled: Instant,
    throttled_until: Option<Instant>,
}

/// A connection's hold on its client's share; released on drop.
pub struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
    pub client: Arc<Client>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stay consistent whatever panicked while holding the lock.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Clients {
    pub fn new(limits: ClientLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            map: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one connection slot for `ip`; `None` when it already holds its share.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut map = lock(&self.map);
        let client = map
            .entry(ip)
            .or_insert_with(|| Arc::new(Client::new(self.limits.reset_rate)))
            .clone();
        let mut connections = lock(&client.connections);
        if self.limits.max_connections != 0 && *connections >= self.limits.max_connections {
            return None;
        }
        *connections += 1;
        drop(connections);
        Some(ClientSlot {
            clients: self.clone(),
            ip,
            client,
        })
    }

    /// Client addresses with a connection open.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.clients.map);
        let mut connections = lock(&self.client.connections);
        *connections = connections.saturating_sub(1);
        if *connections == 0 {
            map.remove(&self.ip);
        }
    }
}

impl Client {
    fn new(reset_rate: u32) -> Self {
        Self {
            connections: Mutex::new(0),
            throttled: AtomicBool::new(false),
            resets: Mutex::new(ResetBudget {
                tokens: f64::from(reset_rate.saturating_mul(RESET_BURST_SECONDS)),
                refilled: Instant::now(),
                throttled_until: None,
            }),
            reset_rate,
        }
    }

    /// Whether this client's requests are refused right now. One atomic load unless it is.
    pub fn is_throttled(&self) -> bool {
        if !self.throttled.load(Ordering::Relaxed) {
            return false;
        }
        let mut budget = lock(&self.resets);
        match budget.throttled_until {
            Some(until) if Instant::now() < until => true,
            _ => {
                budget.throttled_until = None;
                self.throttled.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    /// The client abandoned a request before its answer. Returns whether that spent its
    /// budget (the client is throttled from now on, for a second).
    pub fn record_reset(&self) -> bool {
        if self.reset_rate == 0 {
            return false;
        }
        let mut budget = lock(&self.resets);
        let now = Instant::now();
        let rate = f64::from(self.reset_rate);
        let elapsed = now.duration_since(budget.refilled).as_secs_f64();
        budget.tokens = (budget.tokens + elapsed * rate).min(rate * f64::from(RESET_BURST_SECONDS));
        budget.refilled = now;
        if budget.tokens >= 1.0 {
            budget.tokens -= 1.0;
            return false;
        }
        budget.throttled_until = Some(now + THROTTLE_FOR);
        self.throttled.store(true, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn connections_per_address_are_capped_and_released() {
        let clients = Clients::new(ClientLimits {
            max_connections: 2,
            reset_rate: 0,
        });
        let a = clients.admit(IP).expect("first");
        let _b = clients.admit(IP).expect("second");
        assert!(clients.admit(IP).is_none(), "third is over the cap");
        let other = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));
        assert!(clients.admit(other).is_some(), "other addresses unaffected");
        drop(a);
        assert!(
            clients.admit(IP).is_some(),
            "a closed connection frees a slot"
        );
    }

    #[test]
    fn the_map_forgets_addresses_without_connections() {
        let clients = Clients::new(ClientLimits {
            max_connections: 0,
            reset_rate: 0,
        });
        let slot = clients.admit(IP).unwrap();
        assert_eq!(clients.len(), 1);
        drop(slot);
        assert!(clients.is_empty());
    }

    #[test]
    fn resets_beyond_the_budget_throttle_the_client() {
        let clients = Clients::new(ClientLimits {
            max_connections: 0,
            reset_rate: 5,
        });
        let slot = clients.admit(IP).unwrap();
        let client = &slot.client;
        // The burst: two seconds' worth.
        for _ in 0..10 {
            assert!(!client.record_reset());
        }
        assert!(!client.is_throttled());
        assert!(
            client.record_reset(),
            "the 11th reset at once spends the budget"
        );
        assert!(client.is_throttled());
    }
}
