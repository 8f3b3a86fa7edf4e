//! The discovery status of one service: when discovery last answered, at which index, and
//! since when it has been failing. `/readyz`, `/routes` and the staleness gauge read it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::instance::now_ms;

#[derive(Debug)]
pub struct SyncStatus {
    created: Instant,
    /// Milliseconds since `created` of the last successful discovery answer, plus one;
    /// zero means never.
    last_sync_ms: AtomicU64,
    /// The discovery index (Consul's `X-Consul-Index`) of the current table.
    index: AtomicU64,
    /// `now_ms()` of the first discovery error since the last success; 0 while healthy.
    failing_since_ms: AtomicU64,
}

impl Default for SyncStatus {
    fn default() -> Self {
        Self {
            created: Instant::now(),
            last_sync_ms: AtomicU64::new(0),
            index: AtomicU64::new(0),
            failing_since_ms: AtomicU64::new(0),
        }
    }
}

impl SyncStatus {
    /// A failed discovery query (the table is left as it is).
    pub fn record_error(&self) {
        let _ = self.failing_since_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Discovery answered (a change detector, in catalog mode) without a new table.
    /// Returns whether that counts as a sync (the service had synced before).
    pub fn record_contact(&self) -> bool {
        self.failing_since_ms.store(0, Ordering::Relaxed);
        let synced = self.is_synced();
        if synced {
            self.touch();
        }
        synced
    }

    /// A successful discovery answer at `index`.
    pub fn record_sync(&self, index: u64) {
        self.failing_since_ms.store(0, Ordering::Relaxed);
        self.touch();
        self.index.store(index, Ordering::Relaxed);
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_sync_ms.store(elapsed + 1, Ordering::Relaxed);
    }

    /// How long discovery has been failing without a success in between; `None` while fine.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.failing_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(now_ms().saturating_sub(since))),
        }
    }

    /// Whether the table is too stale to call the gateway ready.
    pub fn is_stale(&self, limit: Duration) -> bool {
        self.failing_for().is_some_and(|age| age > limit)
    }

    /// Whether discovery has answered at least once.
    pub fn is_synced(&self) -> bool {
        self.last_sync_ms.load(Ordering::Relaxed) != 0
    }

    /// Time since the last successful discovery answer; `None` before the first.
    pub fn sync_age(&self) -> Option<Duration> {
        match self.last_sync_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.created
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }

    pub fn index(&self) -> u64 {
        self.index.load(Ordering::Relaxed)
    }
}
