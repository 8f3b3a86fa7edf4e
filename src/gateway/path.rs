//! Path normalisation before routing (on by default, `server.normalize_path`), as Envoy's
//! `normalize_path` and `merge_slashes` do: `.` and `..` segments are resolved (RFC 3986
//! §5.2.4), percent-encoded dots (`%2e`) count as dots, and repeated slashes are merged. So
//! `/svc/../admin/x`, `/svc/%2e%2e/admin/x` and `//admin//x` all route — and are forwarded —
//! as `/admin/x`, and a prefix rule cannot be side-stepped by spelling. Other percent
//! escapes, `%2f` included, are left as sent.

use std::borrow::Cow;

/// `path` normalised; borrowed (no allocation) when it already is.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_dots(path);
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/') {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(segment),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        normal.push('/');
    }
    Cow::Owned(normal)
}

/// True when nothing in `path` needs normalising: one scan, no allocation.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    for (i, window) in bytes.windows(2).enumerate() {
        match window {
            [b'/', b'/'] => return false,
            [b'%', b'2']
                if bytes
                    .get(i + 2)
                    .is_some_and(|b| b.eq_ignore_ascii_case(&b'e')) =>
            {
                return false
            }
            [b'/', b'.'] => {
                let rest = &bytes[i + 1..];
                if rest == b"."
                    || rest == b".."
                    || rest.starts_with(b"./")
                    || rest.starts_with(b"../")
                {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// `%2e` and `%2E` as `.`; everything else as sent.
fn decode_dots(path: &str) -> Cow<'_, str> {
    if !path.contains("%2e") && !path.contains("%2E") {
        return Cow::Borrowed(path);
    }
    Cow::Owned(path.replace("%2e", ".").replace("%2E", "."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_slashes_are_resolved() {
        for (raw, normal) in [
            ("/svc/../other/x", "/other/x"),
            ("/svc/%2e%2e/other", "/other"),
            ("/svc/%2E%2e/other/", "/other/"),
            ("/svc//x", "/svc/x"),
            ("//x", "/x"),
            ("/a/./b/.", "/a/b/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/", "/"),
            ("", "/"),
            ("/a/..", "/"),
        ] {
            assert_eq!(normalize(raw), normal, "{raw}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/svc/x", "/svc/x/", "/a.b/c..d/.e", "/%2f/x", "/x%20y"] {
            assert!(matches!(normalize(path), Cow::Borrowed(_)), "{path}");
        }
    }
}
