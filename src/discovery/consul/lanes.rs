//! HTTP/2 lanes to Consul's HTTPS listener: many blocking queries on one connection.
//!
//! Consul's HTTPS listener speaks HTTP/2 (ALPN `h2`; Go's server allows 250 streams per
//! connection, `SETTINGS_MAX_CONCURRENT_STREAMS`, seen on 1.8.7). Over HTTP/1.1 every waiting
//! blocking query holds a connection, so `consul.max_connections` (and the agent's
//! `limits.http_max_conns_per_client`, 200 by default) caps how many services get a query of
//! their own; over HTTP/2 a connection carries many. A lane is one HTTP client, whose pool
//! keeps one HTTP/2 connection per Consul address; each lane carries at most
//! [`STREAMS_PER_LANE`] queries at once (well under Go's 250, so a query never waits in the
//! connection's queue behind long-polls), a query goes to the least busy lane, and a new lane
//! opens only when every lane is full, up to `consul.max_connections` lanes.
//!
//! Every `https://` GET goes through the lanes; the connection budget counts 100 queries per
//! connection only once [`super::ConsulClient::negotiate_http2`] saw Consul answer over
//! HTTP/2 (at startup, or on a later ask when it did not answer then). An HTTPS endpoint
//! that answers HTTP/1.1 (a proxy in front of Consul, say) gets one connection per query in
//! flight from each lane's pool, within the budget as it was; before the answer, a Consul
//! that speaks HTTP/2 still never gets more than 100 queries on one connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderMap;

use super::DiscoveryError;

/// Most queries one lane (one connection) carries at once: RFC 9113 asks servers to allow at
/// least 100 concurrent streams, and Consul allows 250.
pub const STREAMS_PER_LANE: usize = 100;

/// HTTP/2 pings on a lane with queries in flight: a Consul that vanished without closing the
/// connection (a frozen process, a dropped route) fails every query of the lane within
/// interval + timeout, instead of at the long-poll's own watchdog (`wait` × 17/16 + 5 s).
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What a lane's HTTP client is built from (the same headers and TLS as the other calls).
pub struct LaneSettings {
    pub headers: HeaderMap,
    pub tls: rustls::ClientConfig,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Most lanes (`consul.max_connections`).
    pub max_lanes: usize,
}

/// The lanes opened so far, and whether Consul is known to answer over HTTP/2.
pub struct Lanes {
    settings: LaneSettings,
    lanes: Mutex<Vec<Arc<Lane>>>,
    http2: AtomicBool,
}

struct Lane {
    client: reqwest::Client,
    in_flight: AtomicUsize,
}

/// A query's place on a lane, given back when dropped (after its answer was read).
pub struct Ticket {
    lane: Arc<Lane>,
}

impl Ticket {
    pub fn client(&self) -> &reqwest::Client {
        &self.lane.client
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.lane.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lanes {
    pub fn new(settings: LaneSettings) -> Self {
        Self {
            settings,
            lanes: Mutex::new(Vec::new()),
            http2: AtomicBool::new(false),
        }
    }

    /// Consul answered over HTTP/2: new lanes speak it from the start, and the lanes opened
    /// before are retired (queries in flight finish on theirs, which close once the last is
    /// done).
    pub fn speak_http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Whether Consul is known to answer over HTTP/2.
    pub fn http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// A place for one query: on the least busy lane, or on a new one when every lane is full
    /// (and there may be more); past `max_lanes` full lanes, on the least busy anyway.
    /// Once Consul is known to answer over HTTP/2, a new lane speaks it from the start. Only
    /// then does its pool open one connection for the queries that arrive while it connects;
    /// before ALPN has told, each of them opens its own (seen: the test's agent, limited to
    /// 12 connections, refused a registration while 260 first queries connected).
    pub fn take(&self) -> Result<Ticket, DiscoveryError> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let least = lanes
            .iter()
            .min_by_key(|lane| lane.in_flight.load(Ordering::Relaxed));
        let lane = match least {
            Some(lane)
                if lane.in_flight.load(Ordering::Relaxed) < STREAMS_PER_LANE
                    || lanes.len() >= self.settings.max_lanes.max(1) =>
            {
                lane.clone()
            }
            _ => {
                let lane = Arc::new(Lane {
                    client: self.client(self.http2())?,
                    in_flight: AtomicUsize::new(0),
                });
                lanes.push(lane.clone());
                lane
            }
        };
        lane.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket { lane })
    }

    /// Lanes opened so far.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn client(&self, http2: bool) -> Result<reqwest::Client, DiscoveryError> {
        let settings = &self.settings;
        let builder = reqwest::Client::builder();
        let builder = match http2 {
            true => builder.http2_prior_knowledge(),
            false => builder,
        };
        builder
            .default_headers(settings.headers.clone())
            .tls_backend_preconfigured(settings.tls.clone())
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(settings.idle_timeout)
            .http2_keep_alive_interval(PING_INTERVAL)
            .http2_keep_alive_timeout(PING_TIMEOUT)
            .http2_keep_alive_while_idle(false)
            .build()
            .map_err(DiscoveryError::Transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(max_lanes: usize) -> Lanes {
        crate::tls::install_default_provider();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Lanes::new(LaneSettings {
            headers: HeaderMap::new(),
            tls,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_lanes,
        })
    }

    #[test]
    fn a_lane_opens_only_when_every_lane_is_full_and_queries_go_to_the_least_busy() {
        let lanes = lanes(3);
        let mut tickets: Vec<Ticket> = (0..STREAMS_PER_LANE)
            .map(|_| lanes.take().unwrap())
            .collect();
        assert_eq!(lanes.len(), 1);
        tickets.push(lanes.take().unwrap());
        assert_eq!(lanes.len(), 2);
        // The second lane carries one query: the next ones go there, not to the full first.
        let next = lanes.take().unwrap();
        assert!(Arc::ptr_eq(&next.lane, &tickets[STREAMS_PER_LANE].lane));
        // One query given back on the first lane leaves it at 99, still busier than the
        // second (2): the next goes to the second too, and no lane opens.
        tickets.swap_remove(0);
        let again = lanes.take().unwrap();
        assert!(Arc::ptr_eq(&again.lane, &next.lane));
        assert_eq!(lanes.len(), 2);
    }

    #[test]
    fn past_the_most_lanes_queries_share_the_least_busy() {
        let lanes = lanes(2);
        let tickets: Vec<Ticket> = (0..2 * STREAMS_PER_LANE + 5)
            .map(|_| lanes.take().unwrap())
            .collect();
        assert_eq!(lanes.len(), 2);
        let busy: Vec<usize> = lanes
            .lanes
            .lock()
            .unwrap()
            .iter()
            .map(|lane| lane.in_flight.load(Ordering::Relaxed))
            .collect();
        assert_eq!(busy.iter().sum::<usize>(), tickets.len());
        assert!(busy.iter().all(|&n| n <= STREAMS_PER_LANE + 3), "{busy:?}");
        drop(tickets);
        let idle = lanes
            .lanes
            .lock()
            .unwrap()
            .iter()
            .all(|l| l.in_flight.load(Ordering::Relaxed) == 0);
        assert!(idle, "every ticket dropped gives its place back");
    }
}
