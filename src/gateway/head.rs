//! The outgoing request head, kept for every try of a request.
//!
//! The first try takes the head itself. The gateway's HTTP/1.1 client gives it back when the
//! try ends, so a retry sends the same head again: nothing is copied for retries that never
//! happen. hyper-util's client (h2c, `h2`) keeps the head it is given; when another try may
//! follow there (more than one attempt and a body that can be sent twice, e.g. every GET),
//! the head's lines are first kept as a flat list, and a later try rebuilds a head from it.
//! The lists come from a small per-thread stash that finished requests refill. A head kept
//! to the end gives its header map back to its thread's stash (`wire::spare`) for the next
//! request's head. Before the head came back, every GET copied its lines for a retry it
//! rarely made: ~800 of the ~25,900 instructions per proxied GET (callgrind, fat LTO); the
//! head's way back costs ~250 of them again (moves of the parts), a net 547.

use std::cell::RefCell;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Uri, Version};

use crate::wire::spare;

/// Kept lists per thread: one per request in flight on it is enough; beyond this many,
/// lists are freed.
const SPARE_LISTS: usize = 64;
/// A list that grew past this many lines (a request with unusually many headers) is freed
/// rather than kept, so the stash does not hold the largest lists ever seen.
const SPARE_MAX_LINES: usize = 64;

type Lines = Vec<(HeaderName, HeaderValue)>;

thread_local! {
    static SPARE: RefCell<Vec<Lines>> = const { RefCell::new(Vec::new()) };
}

/// The request head as it goes to every instance.
pub struct Head {
    /// Until a try takes it (and after the try gives it back).
    parts: Option<Parts>,
    /// Whether the first try's head is copied: a retry may follow, and the client may keep
    /// the head.
    copies: bool,
    /// What a later try rebuilds the head from.
    kept: Option<Kept>,
}

/// A head's method, target, version and header lines (in order, repeats kept).
struct Kept {
    method: Method,
    uri: Uri,
    version: Version,
    lines: Lines,
}

impl Head {
    pub fn new(parts: Parts, copies: bool) -> Self {
        Self {
            parts: Some(parts),
            copies,
            kept: None,
        }
    }

    /// The head for one try; `None` only if a try after the last asks (a bug), or one
    /// after a try that kept a head that was not copied.
    pub fn for_try(&mut self, is_last: bool) -> Option<Parts> {
        if let Some(parts) = self.parts.take() {
            if self.copies && !is_last {
                self.kept = Some(Kept::of(&parts));
            }
            return Some(parts);
        }
        let kept = self.kept.as_ref()?;
        let parts = kept.rebuild();
        if is_last {
            self.kept = None;
        }
        Some(parts)
    }

    /// The head a try's client gave back, for the next try.
    pub fn put_back(&mut self, parts: Parts) {
        self.parts = Some(parts);
    }
}

impl Drop for Head {
    /// The header map and a kept list go back to their stashes for a later request.
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            spare::give_back(parts.headers);
        }
        if let Some(kept) = self.kept.take() {
            give_back(kept.lines);
        }
    }
}

impl Kept {
    fn of(parts: &Parts) -> Self {
        let mut lines = spare_list();
        lines.extend(parts.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            lines,
        }
    }

    /// A head for a retry (allocates, as a retry is the rare path).
    fn rebuild(&self) -> Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        parts.headers = HeaderMap::with_capacity(self.lines.len());
        for (name, value) in &self.lines {
            parts.headers.append(name.clone(), value.clone());
        }
        parts
    }
}

/// An empty list, with room from an earlier request when the stash has one.
fn spare_list() -> Lines {
    spare::take(&SPARE).unwrap_or_default()
}

/// Clears `lines` and keeps the list for a later request, unless the stash is full or the
/// list large.
fn give_back(mut lines: Lines) {
    if lines.capacity() <= SPARE_MAX_LINES {
        lines.clear();
        spare::keep(&SPARE, lines, SPARE_LISTS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderValue, ACCEPT, COOKIE, HOST};

    fn parts() -> Parts {
        let request = Request::builder()
            .method("GET")
            .uri("/a?b")
            .header(HOST, "example.test")
            .header(COOKIE, "a=1")
            .header(COOKIE, "b=2")
            .header(ACCEPT, "*/*")
            .body(())
            .unwrap();
        request.into_parts().0
    }

    #[test]
    fn every_try_gets_the_head_with_every_line() {
        let mut head = Head::new(parts(), true);
        for is_last in [false, false, true] {
            let copy = head.for_try(is_last).expect("a head for each try");
            assert_eq!(copy.uri, "/a?b");
            assert_eq!(copy.method, Method::GET);
            let cookies: Vec<_> = copy.headers.get_all(COOKIE).iter().collect();
            assert_eq!(cookies, ["a=1", "b=2"]);
            assert_eq!(copy.headers.len(), 4);
        }
        assert!(head.for_try(false).is_none(), "no try after the last");
    }

    #[test]
    fn a_head_given_back_goes_to_the_next_try_uncopied() {
        let mut head = Head::new(parts(), false);
        let mut first = head.for_try(false).expect("the first try's head");
        first
            .headers
            .insert("x-first-try", HeaderValue::from_static("1"));
        head.put_back(first);
        let second = head.for_try(true).expect("the head given back");
        assert_eq!(second.uri, "/a?b");
        assert_eq!(second.headers.get_all(COOKIE).iter().count(), 2);
        assert!(
            second.headers.contains_key("x-first-try"),
            "the very head the first try gave back, not a copy made before it"
        );
        assert!(head.for_try(true).is_none(), "taken again, not given back");
    }

    #[test]
    fn a_head_kept_to_the_end_gives_its_map_back_to_the_stash() {
        // Each test runs on a thread of its own: its stash starts empty.
        let mut head = Head::new(parts(), false);
        let parts = head.for_try(false).unwrap();
        let room = parts.headers.capacity();
        assert!(room > 0);
        head.put_back(parts);
        drop(head);
        let map = spare::header_map(0);
        assert!(map.is_empty());
        assert_eq!(map.capacity(), room, "the head's own map, cleared");
    }

    #[test]
    fn a_head_without_copies_is_taken_once() {
        let mut head = Head::new(parts(), false);
        assert!(head.for_try(false).is_some());
        assert!(head.for_try(true).is_none());
    }

    #[test]
    fn a_kept_list_refills_the_stash_and_the_next_request_starts_empty() {
        SPARE.with(|spare| spare.borrow_mut().clear());
        let mut head = Head::new(parts(), true);
        head.for_try(false);
        drop(head);
        assert_eq!(SPARE.with(|spare| spare.borrow().len()), 1);
        let mut head = Head::new(parts(), true);
        head.for_try(false);
        assert_eq!(
            SPARE.with(|spare| spare.borrow().len()),
            0,
            "the next request took it"
        );
        let retry = head.for_try(true).unwrap();
        assert_eq!(
            retry.headers.len(),
            4,
            "nothing of the earlier request is left in it"
        );
    }
}
