//! What both HTTP/1.1 sides — the server's own path for plain requests and the client to
//! instances — share at the byte level (and the Consul client, the chunked coding's reader,
//! [`chunked`]): numbers as HTTP/1.1 writes them (decimal lengths, hex
//! chunk sizes, appended without formatting machinery or allocation), where httparse's
//! header lines lie in a head ([`spans_of`]), an instance's lines handed on as they arrived
//! ([`RawLines`]), request header maps reused on a thread ([`spare`]), and a stream with bytes already read put back
//! in front ([`Rewind`]: a connection handed to hyper, an upgraded connection to an instance).

pub mod chunked;
mod lines;
mod rewind;
pub mod spare;

pub use lines::{HeadLines, RawLines, RunsBuilder};
pub use rewind::Rewind;

/// Appends `n` in decimal.
pub fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

/// Appends a chunk's size line: `size` in hex, then CRLF.
pub fn push_chunk_size(buf: &mut Vec<u8>, size: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = size;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
    buf.extend_from_slice(b"\r\n");
}

/// Where a header line's name and value lie in a head: offsets and lengths.
pub type Span = (u32, u32, u32, u32);

/// Fills `spans` with where `lines` (parsed from `buf` by httparse) lie in `buf`, so the
/// head can be frozen into `Bytes` and sliced without copying; how many were filled. The
/// array stays in the caller's frame: returned by value (1.6 KB), it cost a copy per head.
#[inline]
pub fn spans_of(buf: &[u8], lines: &[httparse::Header<'_>], spans: &mut [Span]) -> usize {
    let base = buf.as_ptr() as usize;
    for (span, line) in spans.iter_mut().zip(lines) {
        let name = line.name.as_ptr() as usize - base;
        let value = line.value.as_ptr() as usize - base;
        *span = (
            name as u32,
            line.name.len() as u32,
            value as u32,
            line.value.len() as u32,
        );
    }
    lines.len().min(spans.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_http_reads_them() {
        let mut buf = Vec::new();
        for n in [0, 7, 10, 1234567890, u64::MAX] {
            buf.clear();
            push_decimal(&mut buf, n);
            assert_eq!(buf, n.to_string().as_bytes());
        }
        for n in [0usize, 9, 10, 255, 4096, usize::MAX] {
            buf.clear();
            push_chunk_size(&mut buf, n);
            assert_eq!(buf, format!("{n:x}\r\n").as_bytes());
        }
    }
}
