//! The per-service Consul watch: *blocking queries* on `/v1/health/service/<name>?passing`,
//! which return the moment the healthy set changes (or after `wait`), as a [`Source`].
//!
//! The loop follows Consul's rules for blocking queries: send back `X-Consul-Index`, reset
//! when it goes backwards (and apply the next answer only once a second confirms it, as after
//! an outage: see `Resync`), never send an index below 1 after the first answer, treat an
//! unchanged index as "no change", cut a long-poll that hangs past `wait * 17/16` plus slack,
//! rate-limit the loop with a token bucket, and back off with jitter on errors. It reports
//! what it learned as [`Update`]s (the index is their version); [`follow`] applies them, so
//! errors never touch the table and the last good set keeps serving while Consul is away.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{ConsulClient, Discovery, DiscoveryError, RATE_BURST, RATE_INTERVAL};
use crate::config::{ConsulConfig, ServiceConfig};
use crate::discovery::{follow, Source, SourceError, Update, Updates, WatchFuture};
use crate::upstream::Upstream;

// ---------------------------------------------------------------------------------------------
// Consul's index rules.

/// What an answer's index means for the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexStep {
    /// First answer, or the index moved forward: look at the instances.
    Advanced { next: u64 },
    /// Same index as last time: nothing changed, do not rebuild.
    Unchanged { next: u64 },
    /// The index went backwards (e.g. a Consul server restarted with less state): the next
    /// query starts over from 0 so it does not block on a stale index, and the answer is
    /// applied once a second one confirms it.
    Reset,
}

impl IndexStep {
    /// Applies Consul's rules to `answered`, given the index of the previous query.
    pub fn from_indexes(previous: u64, answered: u64) -> Self {
        if answered < previous {
            IndexStep::Reset
        } else if answered == previous && previous != 0 {
            IndexStep::Unchanged { next: previous }
        } else {
            // Never block on index 0 after the first answer: that would return at once, forever.
            IndexStep::Advanced {
                next: answered.max(1),
            }
        }
    }

    /// The index to send with the next query.
    pub fn next_index(self) -> u64 {
        match self {
            IndexStep::Advanced { next } | IndexStep::Unchanged { next } => next,
            IndexStep::Reset => 0,
        }
    }
}

/// After Consul was unreachable, or its index went backwards, the next answer may come from a
/// server that restarted and is still replaying its log: it knows its leader, but serves an
/// old state (the restart drill saw an empty set for 5 of 51,191 requests). Such an answer is
/// applied only once a second query, made `backoff_base` later, answers the same index; until
/// then the table keeps serving the last good set.
#[derive(Debug, Default)]
struct Resync {
    needed: bool,
    unconfirmed: Option<u64>,
}

impl Resync {
    /// The next answers need a confirmation.
    fn start(&mut self) {
        *self = Resync {
            needed: true,
            unconfirmed: None,
        };
    }

    /// Whether an answer at `answered` may be applied; if not, it awaits a second one.
    fn confirms(&mut self, answered: u64) -> bool {
        if !self.needed || self.unconfirmed == Some(answered) {
            *self = Resync::default();
            return true;
        }
        self.unconfirmed = Some(answered);
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Pacing: token bucket and jittered backoff.

/// Allows `burst` queries at once, then one per `interval`.
#[derive(Debug)]
pub struct TokenBucket {
    burst: u32,
    interval: Duration,
    tokens: u32,
    last_refill: Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            tokens: burst,
            last_refill: Instant::now(),
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&mut self) {
        loop {
            let now = Instant::now();
            let earned = now.duration_since(self.last_refill).as_nanos() / self.interval.as_nanos();
            if earned > 0 {
                let earned = u32::try_from(earned).unwrap_or(u32::MAX);
                self.tokens = self.tokens.saturating_add(earned).min(self.burst);
                self.last_refill += self.interval * earned.min(self.burst);
                if self.tokens == self.burst {
                    self.last_refill = now;
                }
            }
            if self.tokens > 0 {
                self.tokens -= 1;
                return;
            }
            tokio::time::sleep_until(self.last_refill + self.interval).await;
        }
    }
}

/// Exponential backoff with "equal jitter": each delay is half fixed, half random, so many
/// gateways that lost Consul together do not come back in lockstep.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: 0,
        }
    }

    /// The delay before the next try; grows with each call until `reset`.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// The watch loop.

/// Pacing of one watch loop.
#[derive(Debug, Clone, Copy)]
pub struct WatchPacing {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl From<&ConsulConfig> for WatchPacing {
    fn from(config: &ConsulConfig) -> Self {
        Self {
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max,
        }
    }
}

/// The Consul source for services with `source: consul` watched one blocking query each.
pub struct ConsulSource<D = ConsulClient> {
    client: Arc<D>,
    pacing: WatchPacing,
}

impl<D: Discovery> ConsulSource<D> {
    pub fn new(client: Arc<D>, pacing: WatchPacing) -> Self {
        Self { client, pacing }
    }
}

impl<D: Discovery> Source for ConsulSource<D> {
    fn name(&self) -> &'static str {
        "consul"
    }

    fn watch(self: Arc<Self>, service: ServiceConfig, updates: Updates) -> WatchFuture {
        Box::pin(async move {
            let client = self.client.clone();
            watch_loop(&*client, &service, self.pacing, &updates).await
        })
    }
}

/// Keeps `upstream`'s table in step with `discovery` until `shutdown` is cancelled: the
/// Consul source, followed.
pub async fn watch_service<D: Discovery>(
    discovery: Arc<D>,
    upstream: Arc<Upstream>,
    pacing: WatchPacing,
    shutdown: CancellationToken,
) {
    follow(
        Arc::new(ConsulSource::new(discovery, pacing)),
        upstream,
        shutdown,
    )
    .await
}

/// The blocking-query loop of one service; returns when nobody follows it any more.
async fn watch_loop<D: Discovery>(
    discovery: &D,
    service: &ServiceConfig,
    pacing: WatchPacing,
    updates: &Updates,
) {
    let name = service.name.as_str();
    let mut index = 0u64;
    let mut bucket = TokenBucket::new(RATE_BURST, RATE_INTERVAL);
    let mut backoff = Backoff::new(pacing.backoff_base, pacing.backoff_max);
    let mut resync = Resync::default();
    loop {
        bucket.acquire().await;
        let update = match discovery.fetch(service, index).await {
            Ok(answer) => {
                if backoff.failures > 0 {
                    info!(service = %name, index = answer.index, "Consul watch resumed");
                }
                backoff.reset();
                let step = IndexStep::from_indexes(index, answer.index);
                if step == IndexStep::Reset {
                    info!(service = %name, previous = index, answered = answer.index, "Consul index went backwards; resetting");
                    resync.start();
                }
                if !resync.confirms(answer.index) {
                    debug!(service = %name, index = answer.index, "first answer after a resync; asking again to confirm it");
                    index = 0;
                    if !updates.wait(pacing.backoff_base).await {
                        return;
                    }
                    continue;
                }
                let unchanged = step == (IndexStep::Unchanged { next: index });
                index = step.next_index();
                match unchanged {
                    true => Update::Unchanged,
                    false => Update::Instances {
                        instances: answer.instances,
                        version: answer.index,
                        observed: Instant::now(),
                    },
                }
            }
            Err(error) => {
                // Resync with a non-blocking query: blocking on the old index would leave a
                // Consul that came back unchanged unconfirmed (and us stale) for a whole `wait`.
                index = 0;
                resync.start();
                let delay = backoff.next_delay();
                debug!(service = %name, retry_in = ?delay, "Consul query failed; backing off");
                let hung = matches!(error, DiscoveryError::Hung(_));
                let failed = Update::Failed(source_error(error, hung));
                if !updates.send_then_wait(failed, delay).await {
                    return;
                }
                continue;
            }
        };
        if !updates.send(update).await {
            return;
        }
    }
}

/// A Consul error as the seam's error; `hung` counts it in `switchyard_consul_hung_queries_total`.
fn source_error(error: DiscoveryError, hung: bool) -> SourceError {
    let error = SourceError::new("consul", error);
    match hung {
        true => error.hung(),
        false => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_answer_advances_and_never_below_one() {
        assert_eq!(
            IndexStep::from_indexes(0, 42),
            IndexStep::Advanced { next: 42 }
        );
        // An index of 0 from Consul must not be sent back: it would never block.
        assert_eq!(
            IndexStep::from_indexes(0, 0),
            IndexStep::Advanced { next: 1 }
        );
        assert_eq!(IndexStep::from_indexes(0, 0).next_index(), 1);
    }

    #[test]
    fn unchanged_index_means_no_change() {
        assert_eq!(
            IndexStep::from_indexes(42, 42),
            IndexStep::Unchanged { next: 42 }
        );
    }

    #[test]
    fn backwards_index_resets() {
        assert_eq!(IndexStep::from_indexes(42, 7), IndexStep::Reset);
        assert_eq!(IndexStep::from_indexes(42, 7).next_index(), 0);
        // After a reset, the next answer is taken as a first answer.
        assert_eq!(
            IndexStep::from_indexes(0, 7),
            IndexStep::Advanced { next: 7 }
        );
    }

    #[test]
    fn after_a_resync_an_answer_needs_a_second_at_the_same_index() {
        let mut resync = Resync::default();
        assert!(resync.confirms(7), "no resync: applied at once");
        resync.start();
        assert!(!resync.confirms(5), "the first answer after a resync waits");
        assert!(!resync.confirms(9), "a different index starts over");
        assert!(resync.confirms(9), "the same index twice is applied");
        assert!(resync.confirms(10), "and the watch is back to normal");
    }

    #[test]
    fn forward_index_advances() {
        assert_eq!(
            IndexStep::from_indexes(42, 43),
            IndexStep::Advanced { next: 43 }
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_burst_then_paces() {
        let mut bucket = TokenBucket::new(3, Duration::from_millis(100));
        let start = Instant::now();
        for _ in 0..3 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "burst is immediate");
        for _ in 0..5 {
            bucket.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(600), "{elapsed:?}");
    }
}
