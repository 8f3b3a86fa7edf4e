//! A deadline timer each client connection keeps between its requests, lent to one request
//! at a time for its tries' deadline.
//!
//! Why: a fresh tokio `Sleep` per request was filed in the time driver's wheel on its first
//! poll and taken out again when dropped, each under the driver's lock: ~900 instructions per
//! proxied GET (callgrind, fat LTO; `timeout_at`, its `Sleep`, the wheel's bookkeeping). A
//! kept `Sleep` reset to a later deadline only moves its expiry forward (one compare-and-swap;
//! when the old slot comes round, the wheel files it again at the new one), and a request's
//! deadline is later than the previous request's on the same connection whenever the route's
//! timeout is the same. A request that finds the timer lent (HTTP/2 streams in parallel)
//! gets a new one, kept in its turn if the slot is empty when it is done.
//!
//! A kept timer still fires at its last deadline when no request has reset it since: it wakes
//! the task that last polled it once, for nothing (a spurious wake-up futures allow).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Where a connection keeps its deadline timer between requests.
#[derive(Debug, Default)]
pub struct TimerSlot(Mutex<Option<Pin<Box<Sleep>>>>);

impl TimerSlot {
    /// A timer that fires at `deadline`: the kept one when it is free, else a new one.
    pub fn lend(&self, deadline: Instant) -> LentTimer<'_> {
        let sleep = match self.lock().take() {
            Some(mut kept) => {
                kept.as_mut().reset(deadline);
                kept
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        LentTimer {
            slot: self,
            sleep: Some(sleep),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Pin<Box<Sleep>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A timer lent by a [`TimerSlot`]: ready at its deadline, back in the slot when dropped.
#[derive(Debug)]
pub struct LentTimer<'a> {
    slot: &'a TimerSlot,
    /// `Some` until dropped.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Future for LentTimer<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl Drop for LentTimer<'_> {
    fn drop(&mut self) {
        let mut slot = self.slot.lock();
        if slot.is_none() {
            *slot = self.sleep.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Which timer the slot keeps, if any (its address: the same timer or another).
    fn kept(slot: &TimerSlot) -> Option<*const Sleep> {
        slot.lock().as_ref().map(|sleep| &**sleep as *const Sleep)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lent_timer_fires_at_its_deadline_and_the_kept_one_is_reset() {
        let slot = TimerSlot::default();
        let start = Instant::now();
        slot.lend(start + Duration::from_secs(5)).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
        let before = kept(&slot).expect("kept after use");
        let timer = slot.lend(Instant::now() + Duration::from_secs(30));
        assert!(kept(&slot).is_none(), "lent out");
        let lent: *const Sleep = &**timer.sleep.as_ref().unwrap();
        assert_eq!(before, lent, "the kept timer, not a new one");
        timer.await;
        assert_eq!(Instant::now(), start + Duration::from_secs(35));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_moved_later_fires_at_the_new_deadline_only() {
        let slot = TimerSlot::default();
        let start = Instant::now();
        // Polled (so filed in the wheel at +1 s) and given back before its deadline.
        let soon = slot.lend(start + Duration::from_secs(1));
        let cut = tokio::time::timeout_at(start + Duration::from_millis(500), soon).await;
        assert!(cut.is_err());
        let later = slot.lend(start + Duration::from_secs(10));
        let early = tokio::time::timeout_at(start + Duration::from_secs(9), later).await;
        assert!(early.is_err(), "did not fire at the old deadline");
        let later = slot.lend(start + Duration::from_secs(10));
        later.await;
        assert_eq!(Instant::now(), start + Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_request_while_the_timer_is_lent_gets_its_own() {
        let slot = TimerSlot::default();
        let start = Instant::now();
        let first = slot.lend(start + Duration::from_secs(20));
        let second = slot.lend(start + Duration::from_secs(2));
        second.await;
        assert_eq!(Instant::now(), start + Duration::from_secs(2));
        let second = kept(&slot).expect("the second one kept as the slot was empty");
        drop(first);
        assert_eq!(
            kept(&slot),
            Some(second),
            "the first, back when the slot was full, did not replace it"
        );
    }
}
