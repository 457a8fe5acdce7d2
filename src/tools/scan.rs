//! Finding a marker in text that may end partway through it.

/// Where a marker stands in a text.
pub(super) enum Found {
    At(usize),
    /// Not there: `text[..n]` can be no part of one; the rest may be its beginning.
    Before(usize),
}

pub(super) fn find(text: &str, marker: &str) -> Found {
    match text.find(marker) {
        Some(at) => Found::At(at),
        None => Found::Before(text.len() - partial_len(text, marker)),
    }
}

/// The first `marker` in `text` at or after where a search that reached `searched` bytes left
/// off: a held call body is searched once, not once per delta.
pub(super) fn find_from(text: &str, marker: &str, searched: usize) -> Option<usize> {
    let mut from = searched
        .saturating_sub(marker.len().saturating_sub(1))
        .min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    text[from..].find(marker).map(|at| from + at)
}

/// The length of the longest end of `text` that is a proper beginning of `marker`.
fn partial_len(text: &str, marker: &str) -> usize {
    let start = text.len().saturating_sub(marker.len().saturating_sub(1));
    (start..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .find(|&i| marker.starts_with(&text[i..]))
        .map_or(0, |i| text.len() - i)
}
