//! The retry budget of one service, as in Linkerd: each request deposits `budget_percent` of
//! a retry, time deposits `budget_min_per_second`, a retry takes one. A crash that fails every
//! in-flight request at once is retried (bursts up to the cap); a sustained overload is not
//! multiplied.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::instance::now_ms;
use crate::config::RetryConfig;

/// Thousandths of a retry, the unit of the budget.
pub(crate) const MILLI: i64 = 1000;

/// What the budget takes from the service's retry settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSettings {
    pub percent: u32,
    pub min_per_second: u32,
}

impl BudgetSettings {
    pub fn from_retry(retry: &RetryConfig) -> Self {
        Self {
            percent: retry.budget_percent,
            min_per_second: retry.budget_min_per_second,
        }
    }

    /// The most the budget holds: ten seconds of the minimum rate, and at least 100 retries,
    /// so a burst of failures (an instance crashing mid-request) is covered.
    fn cap(&self) -> i64 {
        (i64::from(self.min_per_second) * 10).max(100) * MILLI
    }
}

/// What `elapsed_ms` earns at `per_second` retries per second, in thousandths of a retry
/// (per_second retries per 1000 ms = per_second thousandths per ms).
pub(crate) fn time_refill(elapsed_ms: u64, per_second: u32) -> i64 {
    i64::try_from(elapsed_ms)
        .unwrap_or(i64::MAX / 4)
        .saturating_mul(i64::from(per_second))
}

/// Tokens in thousandths of a retry; lock-free.
#[derive(Debug)]
pub struct RetryBudget {
    settings: BudgetSettings,
    pub(crate) tokens: AtomicI64,
    pub(crate) refilled_ms: AtomicU64,
}

impl RetryBudget {
    /// A full budget.
    pub fn new(settings: BudgetSettings) -> Self {
        Self {
            tokens: AtomicI64::new(settings.cap()),
            refilled_ms: AtomicU64::new(now_ms()),
            settings,
        }
    }

    /// Credits the budget with one request (`percent` of a retry).
    pub fn deposit(&self) {
        let cap = self.settings.cap();
        // Load first: at the cap (the common case when nothing fails) no write is needed.
        if self.tokens.load(Ordering::Relaxed) < cap {
            self.tokens.fetch_add(
                i64::from(self.settings.percent) * MILLI / 100,
                Ordering::Relaxed,
            );
        }
    }

    /// Takes one retry; `false` when the budget is spent.
    pub fn try_take(&self) -> bool {
        let cap = self.settings.cap();
        let now = now_ms();
        let elapsed = now.saturating_sub(self.refilled_ms.swap(now, Ordering::Relaxed));
        let refill = time_refill(elapsed, self.settings.min_per_second).min(cap);
        if refill > 0 {
            let before = self.tokens.fetch_add(refill, Ordering::Relaxed);
            if before + refill > cap {
                self.tokens.fetch_min(cap, Ordering::Relaxed);
            }
        }
        self.tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                (tokens >= MILLI).then_some(tokens - MILLI)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_bursts_and_holds_the_rate() {
        let budget = RetryBudget::new(BudgetSettings {
            percent: 20,
            min_per_second: 10,
        });
        // A full budget covers a burst of 100 retries (an instance dying mid-request)...
        let burst = (0..150).filter(|_| budget.try_take()).count();
        assert!((100..=102).contains(&burst), "{burst}");
        // ...then retries are earned: 20% of requests (50 requests buy 10 retries).
        budget.refilled_ms.store(now_ms(), Ordering::Relaxed);
        for _ in 0..50 {
            budget.deposit();
        }
        let earned = (0..20).filter(|_| budget.try_take()).count();
        assert!((10..=11).contains(&earned), "{earned}");
        // Spent: no more until requests or time earn some.
        budget.tokens.store(0, Ordering::Relaxed);
        budget.refilled_ms.store(now_ms(), Ordering::Relaxed);
        assert!(!budget.try_take());
        // Time earns min_per_second: 10/s is 5 retries in half a second.
        assert_eq!(time_refill(500, 10), 5 * MILLI);
        assert_eq!(time_refill(u64::MAX, 10), i64::MAX, "saturates");
    }
}
