//! Bodies between the client and an instance: the request body as the gateway holds it
//! between tries, marked so that a failed try can tell the client's errors from the
//! instance's; and the instance's response body, which keeps its instance slot until done.
//!
//! Either one, dropped before its end (the client went away), is finished in a task of its
//! own so the pooled connection to the instance survives: an HTTP/1.1 connection whose
//! exchange is cut midway cannot be reused, and a client resetting streams in a loop would
//! otherwise make the gateway open one new connection per reset.

use std::error::Error;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header;
use hyper::http::request::Parts;
use tokio::time::Instant;

use super::clients::{AnswerBody, Outcome, Sent, TryError};
use super::h1::body::Upgraded;
use super::head::Head;
use super::GatewayError;
use crate::server::RequestBody;
use crate::upstream::InstanceSlot;
use crate::wire::{HeadLines, RawLines};

/// Most bytes of an abandoned answer read to keep its connection; a longer one is cut.
const DRAIN_LIMIT: usize = 1 << 20;

/// Body of a request to an instance: buffered (replayable) or streamed from the client.
pub type UpstreamBody = Either<Full<Bytes>, ClientBody>;

/// Limits on request bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Bodies up to this size (by Content-Length) are buffered so a retry can resend them.
    pub max_replay: usize,
    /// Larger bodies get 413.
    pub max: u64,
}

/// What went wrong with the client's own body.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("request body larger than server.max_body_bytes")]
    TooLarge,
    #[error("request body broken: {0}")]
    Broken(Box<dyn Error + Send + Sync>),
}

/// A request body streamed from the client; its errors become [`ClientBodyError`]s.
pub struct ClientBody {
    inner: Limited<RequestBody>,
    ended: Arc<AtomicBool>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.ended.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) if error.is::<LengthLimitError>() => {
                Poll::Ready(Some(Err(ClientBodyError::TooLarge)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(ClientBodyError::Broken(error)))),
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as the gateway holds it between tries.
pub enum HeldBody {
    /// Empty or buffered: can be sent any number of times.
    Replayable(Bytes),
    /// Streamed from the client (cut at `server.max_body_bytes`): can be sent once.
    Streaming {
        body: Option<ClientBody>,
        ended: Arc<AtomicBool>,
    },
}

impl HeldBody {
    /// Buffers a body small enough to replay (by its Content-Length); streams the rest.
    pub async fn hold(
        parts: &Parts,
        body: RequestBody,
        limits: BodyLimits,
        deadline: Instant,
    ) -> Result<HeldBody, GatewayError> {
        if body.is_end_stream() {
            return Ok(HeldBody::Replayable(Bytes::new()));
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limits.max) {
            return Err(GatewayError::PayloadTooLarge);
        }
        match declared {
            Some(length) if length <= limits.max_replay as u64 => {
                let collected = tokio::time::timeout_at(
                    deadline,
                    Limited::new(body, limits.max_replay).collect(),
                )
                .await
                .map_err(|_| GatewayError::RequestBodyTimeout)?
                .map_err(|_| GatewayError::BadRequestBody)?;
                Ok(HeldBody::Replayable(collected.to_bytes()))
            }
            _ => {
                let ended = Arc::new(AtomicBool::new(false));
                let limit = usize::try_from(limits.max).unwrap_or(usize::MAX);
                let body = ClientBody {
                    inner: Limited::new(body, limit),
                    ended: ended.clone(),
                };
                Ok(HeldBody::Streaming {
                    body: Some(body),
                    ended,
                })
            }
        }
    }

    pub fn is_replayable(&self) -> bool {
        matches!(self, HeldBody::Replayable(_))
    }

    /// The body for the next try, or `None` if a streamed body was already sent.
    pub fn take(&mut self) -> Option<UpstreamBody> {
        match self {
            HeldBody::Replayable(bytes) => Some(Either::Left(Full::new(bytes.clone()))),
            HeldBody::Streaming { body, .. } => body.take().map(Either::Right),
        }
    }

    /// Whether the client has yet to send the rest of its body: a deadline passed meanwhile
    /// is the client's stall (408), not the instance's.
    pub fn client_still_sending(&self) -> bool {
        match self {
            HeldBody::Replayable(_) => false,
            HeldBody::Streaming { ended, .. } => !ended.load(Ordering::Relaxed),
        }
    }
}

/// The client's own part in a failed try, if its body is what failed.
pub fn client_body_fault(error: &(dyn Error + 'static)) -> Option<GatewayError> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(body) = error.downcast_ref::<ClientBodyError>() {
            return Some(match body {
                ClientBodyError::TooLarge => GatewayError::PayloadTooLarge,
                ClientBodyError::Broken(_) => GatewayError::BadRequestBody,
            });
        }
        cause = error.source();
    }
    None
}

/// One try's exchange with an instance. Dropped before its answer, it is finished (and the
/// answer drained) in a task of its own, holding its instance slot until then.
pub struct Exchange {
    future: Option<Sent>,
    slot: Option<InstanceSlot>,
    deadline: Instant,
}

impl Exchange {
    pub fn new(future: Sent, slot: InstanceSlot, deadline: Instant) -> Self {
        Self {
            future: Some(future),
            slot: Some(slot),
            deadline,
        }
    }

    /// The answer, or the client error; the slot moves into the answer's body, and the
    /// request's head, when the client gives it back, into `head` for the next try.
    pub async fn send(
        mut self,
        head: &mut Head,
    ) -> Result<hyper::Response<InstanceBody>, TryError> {
        let future = self.future.as_mut().expect("an exchange is sent once");
        let outcome = future.await;
        self.future = None;
        if let Some(parts) = outcome.head {
            head.put_back(parts);
        }
        let response = outcome.answer?;
        let (slot, deadline) = (self.slot.take(), self.deadline);
        Ok(response.map(|body| InstanceBody::new(body, slot, deadline)))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        let (slot, deadline) = (self.slot.take(), self.deadline);
        spawn_detached(async move {
            if let Ok(Outcome {
                answer: Ok(response),
                ..
            }) = tokio::time::timeout_at(deadline, future).await
            {
                // A 101's connection just closes (its body is empty).
                drain(response.into_body(), deadline).await;
            }
            drop(slot);
        });
    }
}

/// An instance's response body on its way to the client; holds the instance slot until done.
/// A pooled connection goes back to its pool when the body's end is read.
pub struct InstanceBody {
    inner: Option<AnswerBody>,
    slot: Option<InstanceSlot>,
    deadline: Instant,
}

impl InstanceBody {
    fn new(inner: AnswerBody, slot: Option<InstanceSlot>, deadline: Instant) -> Self {
        Self {
            inner: Some(inner),
            slot,
            deadline,
        }
    }

    /// The instance slot, for a connection that outlives this body (an upgrade).
    pub fn take_slot(&mut self) -> Option<InstanceSlot> {
        self.slot.take()
    }

    /// Whether the answer's head is known to hold no hop-by-hop line.
    pub fn is_hop_free(&self) -> bool {
        self.inner.as_ref().is_some_and(AnswerBody::is_hop_free)
    }

    /// A 101's connection from the HTTP/1.1 client.
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        self.inner.as_mut().and_then(AnswerBody::take_upgraded)
    }

    /// The body is over: the slot is freed.
    fn finish(&mut self) {
        self.inner = None;
        self.slot = None;
    }
}

impl HeadLines for InstanceBody {
    fn take_lines(&mut self) -> Option<RawLines> {
        self.inner.as_mut()?.take_lines()
    }
}

impl Body for InstanceBody {
    type Data = Bytes;
    type Error = Box<dyn Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for InstanceBody {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if inner.is_end_stream() {
            // Read to its end (hyper's server stops polling once a sized body is complete).
            return;
        }
        let (slot, deadline) = (self.slot.take(), self.deadline);
        spawn_detached(async move {
            drain(inner, deadline).await;
            drop(slot);
        });
    }
}

/// Reads and discards what is left of an answer, within `deadline` and [`DRAIN_LIMIT`]; a
/// pooled connection drained to the answer's end goes back to its pool (the body gives it
/// back itself; one cut short closes).
async fn drain(mut body: AnswerBody, deadline: Instant) {
    let mut read = 0usize;
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > DRAIN_LIMIT {
                return;
            }
        }
    })
    .await;
}

/// Spawns on the current runtime; outside one (process exit) the work is dropped.
fn spawn_detached(task: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    }
}
