//! An instance's header lines handed on as the bytes they arrived in: runs of whole lines
//! ([`RawLines`]) cut out of the parsed head, which the server's own HTTP/1.1 path copies
//! into the client's answer as they are, instead of a `HeaderMap` built line by line at one
//! end and walked at the other (~3,000 instructions per answer of five lines, callgrind).
//! hyper's server (HTTP/2 clients, and HTTP/1.1 connections it was handed) takes a map: for
//! those [`RawLines::append_to`] builds it.
//!
//! The bytes were validated by httparse (names are tokens, values hold no CR, LF or other
//! control byte but HTAB), the same rules `HeaderName` and `HeaderValue` apply.

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

/// Most runs of adjacent lines kept; a head cut into more (many hop-by-hop lines between
/// the others) goes through a `HeaderMap` instead.
const MAX_RUNS: usize = 4;

/// Runs of header lines in a head: each from a line's name to a later line's value end, the
/// lines in between separated by exactly CRLF.
#[derive(Debug)]
pub struct RawLines {
    head: Bytes,
    runs: [(u32, u32); MAX_RUNS],
    count: u8,
    /// A `Content-Length` line is among them.
    pub has_length: bool,
    /// A `Date` line is among them.
    pub has_date: bool,
}

/// Collects the runs of the lines kept from a head.
#[derive(Debug, Default)]
pub struct RunsBuilder {
    runs: [(u32, u32); MAX_RUNS],
    count: usize,
    overflow: bool,
}

impl RunsBuilder {
    /// Adds the line whose name starts at `start` and whose value ends at `end` in `head`.
    #[inline]
    pub fn keep(&mut self, head: &[u8], start: u32, end: u32) {
        if start > end || end as usize > head.len() {
            self.overflow = true; // not httparse's slices of `head`: take the map's way
            return;
        }
        if let Some(last) = self.count.checked_sub(1).map(|i| &mut self.runs[i]) {
            let gap = last.1 as usize..start as usize;
            if head.get(gap) == Some(b"\r\n".as_slice()) {
                last.1 = end;
                return;
            }
        }
        if self.count == MAX_RUNS {
            self.overflow = true;
            return;
        }
        self.runs[self.count] = (start, end);
        self.count += 1;
    }

    /// The runs over `head`, unless there were more than `MAX_RUNS` (4).
    pub fn finish(self, head: Bytes, has_length: bool, has_date: bool) -> Option<RawLines> {
        (!self.overflow).then_some(RawLines {
            head,
            runs: self.runs,
            count: self.count as u8,
            has_length,
            has_date,
        })
    }
}

impl RawLines {
    fn runs(&self) -> impl Iterator<Item = &[u8]> {
        let head = &self.head;
        self.runs[..self.count as usize]
            .iter()
            .map(move |&(start, end)| &head[start as usize..end as usize])
    }

    /// Appends the lines, each ending in CRLF.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for run in self.runs() {
            out.extend_from_slice(run);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Appends the lines to `headers` (values share the head's bytes). Lines end at LF
    /// with a CR before it: httparse let neither into a name or value.
    pub fn append_to(&self, headers: &mut HeaderMap) {
        for run in self.runs() {
            for line in run.split(|&b| b == b'\n') {
                self.append_line(headers, line.strip_suffix(b"\r").unwrap_or(line));
            }
        }
    }

    fn append_line(&self, headers: &mut HeaderMap, line: &[u8]) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let Ok(name) = HeaderName::from_bytes(&line[..colon]) else {
            return; // httparse took it as a token: not reached
        };
        let value = line[colon + 1..].trim_ascii_start();
        if let Ok(value) = HeaderValue::from_maybe_shared(self.head.slice_ref(value)) {
            headers.append(name, value);
        }
    }
}

/// A response body that may carry its head's lines as [`RawLines`] (taken once, by whoever
/// writes the head).
pub trait HeadLines {
    fn take_lines(&mut self) -> Option<RawLines> {
        None
    }
}

impl HeadLines for http_body_util::Full<Bytes> {}

impl<L: HeadLines, R: HeadLines> HeadLines for http_body_util::Either<L, R> {
    fn take_lines(&mut self) -> Option<RawLines> {
        match self {
            http_body_util::Either::Left(body) => body.take_lines(),
            http_body_util::Either::Right(body) => body.take_lines(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept lines of `head` (name start, value end), as the codec would note them.
    fn lines_of(head: &'static [u8], keep: &[&str]) -> Option<RawLines> {
        let mut runs = RunsBuilder::default();
        let mut lines = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut lines);
        response.parse(head).unwrap();
        let base = head.as_ptr() as usize;
        for line in response.headers.iter() {
            if keep.iter().any(|k| k.eq_ignore_ascii_case(line.name)) {
                let start = (line.name.as_ptr() as usize - base) as u32;
                let end = (line.value.as_ptr() as usize - base + line.value.len()) as u32;
                runs.keep(head, start, end);
            }
        }
        runs.finish(Bytes::from_static(head), false, false)
    }

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nServer: x\r\nDate: d\r\nConnection: keep-alive\r\n\
        X-A: 1  \r\nX-B:\t2\r\nKeep-Alive: 5\r\nX-C: 3\r\n\r\n";

    #[test]
    fn adjacent_lines_are_one_run_and_skipped_ones_split_them() {
        let lines = lines_of(HEAD, &["server", "date", "x-a", "x-b", "x-c"]).unwrap();
        assert_eq!(lines.runs().count(), 4, "a trailing space ends a run too");
        let mut out = Vec::new();
        lines.write_to(&mut out);
        assert_eq!(
            out,
            b"Server: x\r\nDate: d\r\nX-A: 1\r\nX-B:\t2\r\nX-C: 3\r\n"
        );
    }

    #[test]
    fn more_runs_than_room_give_none() {
        let head = b"HTTP/1.1 200 OK\r\nA: 1\r\nK: 0\r\nB: 2\r\nK: 0\r\nC: 3\r\nK: 0\r\nD: 4\r\n\
            K: 0\r\nE: 5\r\n\r\n";
        assert!(lines_of(head, &["a", "b", "c", "d"]).is_some());
        assert!(lines_of(head, &["a", "b", "c", "d", "e"]).is_none());
    }

    #[test]
    fn the_map_built_from_the_runs_holds_every_kept_line() {
        let lines = lines_of(HEAD, &["server", "date", "x-a", "x-b", "x-c"]).unwrap();
        let mut headers = HeaderMap::new();
        lines.append_to(&mut headers);
        let all: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        let want = [
            ("server", "x"),
            ("date", "d"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ];
        assert_eq!(all, want);
    }
}
