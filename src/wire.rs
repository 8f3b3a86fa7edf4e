//! Numbers as HTTP/1.1 writes them, appended to an output buffer without formatting
//! machinery or allocation: decimal lengths (`content-length`) and hex chunk sizes.

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
