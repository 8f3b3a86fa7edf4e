//! A future polled only when it was woken itself: for the rare branch of a `select!` next to
//! a busy one.
//!
//! Why: a connection's task wakes for every read and write of every request, and a
//! `select!` polls all of its branches at each wake. The branches that watch for shutdown
//! and deadlines (two cancellation tokens, each taking a lock per poll, and a timer) cost
//! ~1,300 instructions per proxied GET that way (callgrind), for events that come a few
//! times in a connection's life. Wrapped in [`OnWake`], such a branch is polled through a
//! waker of its own, and skipped (one atomic swap) at the wakes that were not for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Whether the wrapped future was woken, and the task to wake for it.
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `future`, polled on the first poll and then only after one of its own wake-ups.
pub struct OnWake<F> {
    future: F,
    flag: Arc<Flag>,
    /// A waker of `flag`, made once.
    waker: Waker,
}

impl<F: Future + Unpin> OnWake<F> {
    pub fn new(future: F) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Self {
            future,
            flag,
            waker,
        }
    }
}

impl<F: Future + Unpin> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the check: a wake between the two still wakes this task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        let mut own = Context::from_waker(&this.waker);
        Pin::new(&mut this.future).poll(&mut own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, waking through the last waker it got.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn polled_first_and_then_only_after_its_own_wake() {
        let (polls, ready) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let waker = Arc::new(std::sync::Mutex::new(None));
        let probe = Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        };
        let mut on_wake = OnWake::new(probe);
        let task = Arc::new(Flag {
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        assert!(Pin::new(&mut on_wake).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut on_wake).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "the second poll was not its wake"
        );
        ready.store(true, Ordering::SeqCst);
        let inner = waker.lock().unwrap().take().unwrap();
        inner.wake();
        assert!(task.woken.load(Ordering::SeqCst), "its wake wakes the task");
        assert!(Pin::new(&mut on_wake).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
