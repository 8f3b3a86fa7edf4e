//! An instance's answer body, read from its connection as the client's side polls it; the
//! connection goes back to the pool the moment the body's last byte is taken (hyper's server
//! stops polling a body of known length once it has that many bytes, so waiting for the end
//! of the stream would never give it back). A 101's connection is taken whole for the splice.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

use super::codec::{self, Chunked, Decoded, Framing, ResponseHead};
use super::pool::Connection;
use super::stream::Stream;
use super::{reserve, H1Error};
use crate::wire::{RawLines, Rewind};

/// Where the body is in its framing.
#[derive(Debug, Clone, Copy)]
enum State {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Upgrade,
    Done,
}

/// An answer's body on its instance connection.
pub struct ResponseBody {
    /// `None` once the body ended (the connection went back or closed).
    connection: Option<Box<Connection>>,
    state: State,
    keep_alive: bool,
    /// The answer's head holds no hop-by-hop line (left out while parsing).
    hop_free: bool,
    /// The head's lines as they arrived, until the server side takes them.
    lines: Option<RawLines>,
}

impl ResponseBody {
    /// The body after `head` (whose lines it carries when they are raw), on `connection`.
    pub(super) fn new(connection: Box<Connection>, head: &mut ResponseHead) -> Self {
        let state = match head.framing {
            Framing::Empty => State::Length(0),
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::Size),
            Framing::UntilClose => State::UntilClose,
            Framing::Upgrade => State::Upgrade,
        };
        let mut body = Self {
            connection: Some(connection),
            state,
            keep_alive: head.keep_alive,
            hop_free: head.hop_free,
            lines: head.lines.take(),
        };
        if matches!(state, State::Length(0)) {
            body.finish();
        }
        body
    }

    /// Whether the answer's head holds no hop-by-hop line.
    pub fn is_hop_free(&self) -> bool {
        self.hop_free
    }

    /// The head's lines as they arrived, if they were not put in the map.
    pub fn take_lines(&mut self) -> Option<RawLines> {
        self.lines.take()
    }

    /// A 101's connection, with what the instance sent after its head.
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        if !matches!(self.state, State::Upgrade) {
            return None;
        }
        self.state = State::Done;
        let connection = *self.connection.take()?;
        Some(Rewind::new(connection.stream, connection.read_buf.freeze()))
    }

    /// The answer is read: the connection goes back to the pool if it may carry another
    /// exchange and nothing followed the answer, else it closes.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(mut connection) = self.connection.take() {
            if self.keep_alive && connection.read_buf.is_empty() && !connection.stream.has_unread()
            {
                connection.release();
            }
        }
    }

    /// Reads more of the body into the buffer: `Ok(false)` at the instance's close.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, H1Error>> {
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        reserve(&mut connection.read_buf);
        let stream = Pin::new(&mut connection.stream);
        let read = ready!(tokio_util::io::poll_read_buf(
            stream,
            cx,
            &mut connection.read_buf
        ));
        Poll::Ready(match read {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(error) => Err(H1Error::Io(error)),
        })
    }

    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.state = State::Done;
        self.connection = None;
        Poll::Ready(Some(Err(error)))
    }
}

/// The next piece of the body from what is buffered.
fn decode(state: &mut State, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
    Ok(match state {
        State::Length(left) => match codec::take_length(buf, left) {
            Some(data) => Decoded::Data(data),
            None if *left == 0 => Decoded::End,
            None => Decoded::More,
        },
        State::Chunked(chunked) => chunked.decode(buf)?,
        State::UntilClose if !buf.is_empty() => Decoded::Data(buf.split().freeze()),
        State::UntilClose => Decoded::More,
        State::Upgrade | State::Done => Decoded::End,
    })
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(&mut this.state, &mut connection.read_buf) {
                Err(error) => return this.fail(error),
                Ok(Decoded::Data(data)) => {
                    if matches!(this.state, State::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => match ready!(this.poll_read(cx)) {
                    Ok(true) => {}
                    // Closed: the end of a close-delimited body, else an answer cut short.
                    Ok(false) if matches!(this.state, State::UntilClose) => {
                        this.state = State::Done;
                        this.connection = None;
                        return Poll::Ready(None);
                    }
                    Ok(false) => return this.fail(H1Error::Incomplete),
                    Err(error) => return this.fail(error),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0) | State::Upgrade)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(left) => SizeHint::with_exact(left),
            State::Done | State::Upgrade => SizeHint::with_exact(0),
            State::Chunked(_) | State::UntilClose => SizeHint::default(),
        }
    }
}

/// An upgraded connection to an instance: what it sent right after its 101, then the socket.
pub type Upgraded = Rewind<Stream>;
