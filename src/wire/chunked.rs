//! The chunked transfer coding's reader (RFC 9112 §7.1): a state machine over the bytes as
//! they arrive, taking each chunk's data off the buffer. Shared by the client to instances
//! (`gateway::h1`, an answer's body streamed on) and the Consul client
//! (`discovery::consul::http1`, a whole answer read), so both read chunks by the same rules.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line (with extensions) and all trailer lines together.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

/// A chunked body that breaks the coding's rules (a bad size line or chunk end, a line or
/// the trailers too long).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

/// What the chunked decoder got out of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The last chunk and the trailers (dropped) are read.
    End,
    /// More bytes are needed.
    More,
}

/// The chunked transfer coding's reader (RFC 9112 §7.1), a state machine over the bytes as
/// they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

impl Chunked {
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&line)?;
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = left.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *self = match left - n {
                        0 => Chunked::DataEnd,
                        left => Chunked::Data(left),
                    };
                    return Ok(Decoded::Data(data));
                }
                Chunked::DataEnd => {
                    // The CRLF after a chunk's data (a bare LF accepted).
                    let ending = match buf.first() {
                        None => return Ok(Decoded::More),
                        Some(b'\n') => 1,
                        Some(b'\r') if buf.len() < 2 => return Ok(Decoded::More),
                        Some(b'\r') if buf[1] == b'\n' => 2,
                        Some(_) => return Err(ChunkError),
                    };
                    buf.advance(ending);
                    *self = Chunked::Size;
                }
                Chunked::Trailers(read) => {
                    let Some(line) = take_line(buf, MAX_TRAILERS - read)? else {
                        return Ok(Decoded::More);
                    };
                    if line.is_empty() {
                        *self = Chunked::Done;
                        return Ok(Decoded::End);
                    }
                    *self = Chunked::Trailers(read + line.len() + 2);
                }
                Chunked::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// The next line off `buf` without its CRLF (a bare LF is accepted, as hyper and nginx do);
/// `None` until it is complete; an error once `limit` bytes pass without one.
fn take_line(buf: &mut BytesMut, limit: usize) -> Result<Option<BytesMut>, ChunkError> {
    let Some(end) = buf.iter().take(limit + 1).position(|&b| b == b'\n') else {
        return match buf.len() > limit {
            true => Err(ChunkError),
            false => Ok(None),
        };
    };
    let mut line = buf.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Ok(Some(line))
}

/// A chunk-size line's size: hex digits, then optional extensions after `;` (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    let rest = rest.trim_ascii_start();
    if digits.is_empty() || digits.len() > 15 || !(rest.is_empty() || rest[0] == b';') {
        return Err(ChunkError);
    }
    Ok(digits.iter().fold(0u64, |n, &d| {
        n << 4 | u64::from((d as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 1..wire.len() {
            let mut decoder = Chunked::Size;
            let mut buf = BytesMut::new();
            let mut body = Vec::new();
            let mut ended = false;
            for piece in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(piece);
                loop {
                    match decoder.decode(&mut buf).unwrap() {
                        Decoded::Data(data) => body.extend_from_slice(&data),
                        Decoded::End => {
                            ended = true;
                            break;
                        }
                        Decoded::More => break,
                    }
                }
            }
            assert!(ended, "split at {split}");
            assert_eq!(body, b"hello world", "split at {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn bad_chunks_fail() {
        for bad in ["zz\r\n", "5\r\nhelloXX", "1 x\r\n", "10000000000000000\r\n"] {
            let mut decoder = Chunked::Size;
            let mut buf = BytesMut::from(bad);
            let mut result = decoder.decode(&mut buf);
            while let Ok(Decoded::Data(_)) = result {
                result = decoder.decode(&mut buf);
            }
            assert!(matches!(result, Err(ChunkError)), "{bad}: {result:?}");
        }
        let mut endless = BytesMut::from(&[b'1'; MAX_CHUNK_LINE + 2][..]);
        assert!(matches!(
            Chunked::Size.decode(&mut endless),
            Err(ChunkError)
        ));
    }
}
