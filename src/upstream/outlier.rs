//! Passive outlier detection: an instance that fails `consecutive_failures` tries in a row is
//! ejected for a while (longer each time), never more than `max_ejected_percent` of a table.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::instance::{now_ms, Instance};
use super::table::ServiceTable;
use crate::config::OutlierConfig;

/// What one failed try came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted; not (or already) ejected.
    Counted,
    /// Would be ejected, but that would eject too many of the table: kept.
    LimitReached { ejected: usize, total: usize },
    /// Ejected for this long.
    Ejected { failures: u32, duration: Duration },
}

/// The detector of one service: its settings only; the state lives in each instance's
/// shared health, so it survives table changes.
#[derive(Debug, Clone)]
pub struct OutlierDetector {
    settings: OutlierConfig,
}

impl OutlierDetector {
    pub fn new(settings: OutlierConfig) -> Self {
        Self { settings }
    }

    /// A try on `instance` got an answer that was not a 5xx.
    pub fn record_success(&self, instance: &Instance) {
        // Read first: a store on every success would bounce the cache line between cores.
        let failures = &instance.health.consecutive_failures;
        if failures.load(Ordering::Relaxed) != 0 {
            failures.store(0, Ordering::Relaxed);
        }
    }

    /// A try on `instance` failed (connect error, lost connection or 5xx). Ejects it after
    /// `consecutive_failures` in a row, unless that would eject more than
    /// `max_ejected_percent` of `table`.
    pub fn record_failure(&self, table: &ServiceTable, instance: &Instance) -> Verdict {
        let settings = &self.settings;
        if settings.consecutive_failures == 0 {
            return Verdict::Counted;
        }
        let health = &instance.health;
        let failures = health.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < settings.consecutive_failures || health.ejected_for().is_some() {
            return Verdict::Counted;
        }
        let total = table.instances().len();
        let ejected = table.ejected_count();
        if (ejected + 1) * 100 > total * settings.max_ejected_percent as usize {
            return Verdict::LimitReached { ejected, total };
        }
        let ejections = health.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = settings
            .base_ejection_time
            .saturating_mul(ejections)
            .min(settings.max_ejection_time);
        let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 2);
        health
            .ejected_until_ms
            .store(now_ms() + duration_ms, Ordering::Relaxed);
        health.consecutive_failures.store(0, Ordering::Relaxed);
        Verdict::Ejected { failures, duration }
    }
}
