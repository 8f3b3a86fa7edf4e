//! Header maps reused between requests on one thread: the server's own HTTP/1.1 path takes
//! each request's map from here, and the gateway gives it back once its tries are over
//! (`gateway::head`). A map built fresh costs two allocations and two frees per request
//! (its index and its entries); a cleared one keeps both. [`take`] and [`keep`] serve any
//! such per-thread stash (the gateway's kept head lines too).

use std::cell::RefCell;
use std::thread::LocalKey;

use hyper::header::HeaderMap;

/// Maps kept per thread: one per request in flight on it is enough.
const SPARE_MAPS: usize = 64;
/// A map that grew past this capacity (a request with unusually many lines) is freed rather
/// than kept, so the stash does not hold the largest maps ever seen.
const SPARE_MAX_CAPACITY: usize = 96;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `lines`, from an earlier request when the stash has one.
pub fn header_map(lines: usize) -> HeaderMap {
    match take(&SPARE) {
        Some(mut map) => {
            map.reserve(lines);
            map
        }
        None => HeaderMap::with_capacity(lines),
    }
}

/// Clears `map` and keeps it for a later request, unless the stash is full or the map
/// large.
pub fn give_back(mut map: HeaderMap) {
    if map.capacity() <= SPARE_MAX_CAPACITY {
        map.clear();
        keep(&SPARE, map, SPARE_MAPS);
    }
}

/// The last item put in a per-thread `stash`, if any.
pub fn take<T: 'static>(stash: &'static LocalKey<RefCell<Vec<T>>>) -> Option<T> {
    stash
        .try_with(|spare| spare.borrow_mut().pop())
        .ok()
        .flatten()
}

/// Puts `item` in a per-thread `stash` unless it holds `most` already. During thread
/// teardown the stash is gone and the item is just dropped.
pub fn keep<T: 'static>(stash: &'static LocalKey<RefCell<Vec<T>>>, item: T, most: usize) {
    let _ = stash.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < most {
            spare.push(item);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn a_map_given_back_comes_back_empty_with_its_room() {
        let mut map = header_map(8);
        map.insert("x-a", HeaderValue::from_static("1"));
        let room = map.capacity();
        give_back(map);
        let again = header_map(8);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
    }

    #[test]
    fn a_large_map_is_not_kept() {
        let mut map = HeaderMap::with_capacity(SPARE_MAX_CAPACITY + 1);
        map.insert("x-a", HeaderValue::from_static("1"));
        give_back(map);
        assert!(header_map(1).capacity() <= SPARE_MAX_CAPACITY);
    }
}
