//! The request body a handler gets: none, for the requests the server's own HTTP/1.1 path
//! ([`h1`](super::h1)) serves (they carry no body), or hyper's for every other request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A client's request body.
#[derive(Debug, Default)]
pub enum RequestBody {
    /// A request without a body (no `Content-Length`, no `Transfer-Encoding`).
    #[default]
    Empty,
    /// A body as hyper reads it (HTTP/2, or an HTTP/1.1 connection hyper serves).
    Hyper(Incoming),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Hyper(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Hyper(body) => body.size_hint(),
        }
    }
}
