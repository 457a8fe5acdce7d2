//! Stop strings over streamed text (OpenAI `stop`): generation ends at the first stop string
//! to appear in the generated text, the stop string itself is not emitted, and text that may
//! still turn out to begin a stop string is held back until that is decided.
//!
//! "First" means the one completed first as the text grows, which is where token-by-token
//! generation halts. It is also the earliest-starting occurrence unless one stop string
//! occurs inside another (with "abcd" and "bc", text "abcd" stops at "bc"). The result
//! depends only on the text, never on how it was cut into deltas.
//!
//! Pure text logic: this module must not know about tokenizers, token ids or the engine. It
//! is char-boundary safe for any UTF-8 and holds back at most the longest stop string's
//! length minus one byte.

/// The stop strings of one choice and the text held back while a match is undecided.
#[derive(Clone, Debug)]
pub struct StopStrings {
    /// As given, so that [`StopOutcome::stopped`] indexes the caller's list; empty ones are
    /// skipped wherever they are read.
    stops: Vec<String>,
    /// Bytes of the longest stop string; 0 when there is none.
    longest: usize,
    held: String,
    stopped: Option<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that can be shown now.
    pub emit: String,
    /// Index (in the list given to [`StopStrings::new`]) of the stop string that matched.
    pub stopped: Option<usize>,
}

impl StopStrings {
    /// Empty strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            held: String::with_capacity(longest),
            stops,
            longest,
            stopped: None,
        }
    }

    /// True when there is no (non-empty) stop string: every delta passes straight through.
    pub fn is_empty(&self) -> bool {
        self.longest == 0
    }

    /// The stop string at `index` of the list given to [`Self::new`].
    pub fn get(&self, index: usize) -> Option<&str> {
        self.stops.get(index).map(String::as_str)
    }

    /// Which stop string has matched, if any.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Feeds the next decoded delta; returns what may be emitted now and whether a stop
    /// string matched. Once one has, every later push emits nothing and repeats its index.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped.is_some() {
            return StopOutcome {
                emit: String::new(),
                stopped: self.stopped,
            };
        }
        if self.is_empty() {
            return StopOutcome {
                emit: delta.to_owned(),
                stopped: None,
            };
        }
        self.held.push_str(delta);
        if let Some((start, index)) = self.first_match() {
            self.stopped = Some(index);
            let mut emit = std::mem::take(&mut self.held);
            // `start` comes from `str::find`, so it is a char boundary.
            emit.truncate(start);
            return StopOutcome {
                emit,
                stopped: Some(index),
            };
        }
        let keep_from = self.undecided_start();
        let emit = self.held[..keep_from].to_owned();
        self.held.replace_range(..keep_from, "");
        StopOutcome {
            emit,
            stopped: None,
        }
    }

    /// End of generation (length or EOS): the held-back text, which can no longer become a
    /// stop string. Empty after a stop string matched.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The (start, index) of the match that ends first in `held`; on equal ends the earlier
    /// start (less text shown), then the lower index. `held` holds no earlier match: it would
    /// have been found by the push that completed it.
    fn first_match(&self) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None;
        for (index, stop) in self.stops.iter().enumerate() {
            if stop.is_empty() {
                continue;
            }
            // A string's first occurrence is also the one that ends first.
            let Some(start) = self.held.find(stop.as_str()) else {
                continue;
            };
            let end = start + stop.len();
            if best.is_none_or(|(best_end, best_start, _)| (end, start) < (best_end, best_start)) {
                best = Some((end, start, index));
            }
        }
        best.map(|(_, start, index)| (start, index))
    }

    /// Where the longest suffix of `held` that is a proper prefix of some stop string
    /// begins (`held.len()` when there is none). Everything before it is decided: a match
    /// still to come has to start inside that suffix.
    fn undecided_start(&self) -> usize {
        let bytes = self.held.as_bytes();
        let from = bytes.len().saturating_sub(self.longest.saturating_sub(1));
        (from..bytes.len())
            .filter(|&k| self.held.is_char_boundary(k))
            .find(|&k| {
                let tail = &bytes[k..];
                self.stops
                    .iter()
                    .any(|s| s.len() > tail.len() && s.as_bytes().starts_with(tail))
            })
            .unwrap_or(bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()).collect())
    }

    /// Pushes every delta; returns everything emitted (plus `finish` when no stop matched)
    /// and the matched index, checking the hold-back bound after each push.
    fn run(s: &mut StopStrings, deltas: &[&str]) -> (String, Option<usize>) {
        let mut out = String::new();
        for d in deltas {
            let o = s.push(d);
            out.push_str(&o.emit);
            assert!(s.held.len() < s.longest.max(1), "held {:?}", s.held);
            if o.stopped.is_some() {
                assert_eq!(s.finish(), "");
                return (out, o.stopped);
            }
        }
        out.push_str(&s.finish());
        (out, None)
    }

    /// Truncation where token-by-token generation would halt: the first char boundary at
    /// which the text ends with a stop string (the longest of those ending there).
    fn reference_first_end(text: &str, stops: &[String]) -> String {
        for end in (0..=text.len()).filter(|&e| text.is_char_boundary(e)) {
            let prefix = &text[..end];
            if let Some(stop) = stops
                .iter()
                .filter(|s| !s.is_empty() && prefix.ends_with(s.as_str()))
                .max_by_key(|s| s.len())
            {
                return text[..end - stop.len()].to_owned();
            }
        }
        text.to_owned()
    }

    /// The earliest-starting occurrence, by `find`.
    fn reference_find(text: &str, stops: &[String]) -> String {
        let cut = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
            .unwrap_or(text.len());
        text[..cut].to_owned()
    }

    #[test]
    fn match_inside_one_delta() {
        let mut s = stops(&["STOP"]);
        let o = s.push("hello STOP world");
        assert_eq!(o.emit, "hello ");
        assert_eq!(o.stopped, Some(0));
        assert_eq!(
            s.push("more"),
            StopOutcome {
                emit: String::new(),
                stopped: Some(0)
            }
        );
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn match_spanning_several_deltas() {
        let mut s = stops(&["</answer>"]);
        assert_eq!(s.push("42 </").emit, "42 ");
        assert_eq!(s.push("ans").emit, "");
        let o = s.push("wer> trailing");
        assert_eq!(
            o,
            StopOutcome {
                emit: String::new(),
                stopped: Some(0)
            }
        );
    }

    #[test]
    fn rejected_prefix_is_emitted_late_but_whole() {
        let mut s = stops(&["###"]);
        assert_eq!(s.push("a#").emit, "a");
        assert_eq!(s.push("#").emit, "");
        assert_eq!(s.push("b").emit, "##b");
        assert_eq!(s.push("##").emit, "");
        assert_eq!(s.finish(), "##");
        assert_eq!(s.stopped(), None);
    }

    #[test]
    fn earliest_match_wins_across_stop_strings() {
        let mut s = stops(&["world", "lo w", "o"]);
        // "o" ends first (in "hello").
        assert_eq!(
            s.push("hello world"),
            StopOutcome {
                emit: "hell".into(),
                stopped: Some(2)
            }
        );
        // The same text cut differently gives the same answer.
        let mut s = stops(&["world", "lo w", "o"]);
        assert_eq!(
            run(&mut s, &["hel", "l", "o world"]),
            ("hell".into(), Some(2))
        );
        // Equal ends: the one starting earlier; equal strings: the lower index.
        let mut s = stops(&["c", "abc", "abc"]);
        assert_eq!(run(&mut s, &["xab", "cd"]), ("x".into(), Some(1)));
        // A stop inside a longer one stops as soon as it is complete.
        let mut s = stops(&["abcd", "bc"]);
        assert_eq!(run(&mut s, &["abcd"]), ("a".into(), Some(1)));
    }

    #[test]
    fn multibyte_text_and_stops() {
        let mut s = stops(&["停止", "🛑"]);
        assert_eq!(s.push("你好停").emit, "你好");
        assert_eq!(s.push("下").emit, "停下");
        assert_eq!(
            s.push("再见🛑后面"),
            StopOutcome {
                emit: "再见".into(),
                stopped: Some(1)
            }
        );
        // A stop sharing a lead byte with the text's chars must not split them.
        let mut s = stops(&["é!"]);
        assert_eq!(
            run(&mut s, &["cafè", "é", "é", "!x"]),
            ("cafèé".into(), Some(0))
        );
        let mut s = stops(&["😀😀"]);
        assert_eq!(
            run(&mut s, &["a😀", "b😀", "😁"]),
            ("a😀b😀😁".into(), None)
        );
    }

    #[test]
    fn no_stops_or_empty_stops_pass_through() {
        let mut s = stops(&[]);
        assert!(s.is_empty());
        assert_eq!(
            s.push("anything"),
            StopOutcome {
                emit: "anything".into(),
                stopped: None
            }
        );
        let mut s = stops(&["", ""]);
        assert!(s.is_empty());
        assert_eq!(run(&mut s, &["a", "b"]), ("ab".into(), None));
        let mut s = stops(&["", "b"]);
        assert_eq!(run(&mut s, &["a", "bc"]), ("a".into(), Some(1)));
        assert_eq!(s.get(1), Some("b"));
    }

    fn text_strategy(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!['a', 'b', 'c', ' ', 'é', 'è', '中', '文', '😀', '😁']),
            0..max,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    /// `text` cut at the given char indices (sorted, deduplicated, in range).
    fn split(text: &str, mut cuts: Vec<usize>) -> Vec<&str> {
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        cuts.iter_mut().for_each(|c| *c %= bounds.len());
        cuts.sort_unstable();
        cuts.dedup();
        let mut parts = Vec::new();
        let mut last = 0;
        for c in cuts {
            parts.push(&text[last..bounds[c]]);
            last = bounds[c];
        }
        parts.push(&text[last..]);
        parts
    }

    proptest! {
        #[test]
        fn streamed_output_is_text_cut_before_the_first_stop(
            text in text_strategy(40),
            stop_list in prop::collection::vec(text_strategy(4), 0..4),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let deltas = split(&text, cuts);
            prop_assert_eq!(deltas.concat(), text.clone());
            let mut s = StopStrings::new(stop_list.clone());
            let (out, stopped) = run(&mut s, &deltas);
            prop_assert_eq!(&out, &reference_first_end(&text, &stop_list));
            match stopped {
                Some(i) => prop_assert!(text[out.len()..].starts_with(stop_list[i].as_str())),
                None => prop_assert_eq!(&out, &text),
            }
            // Where no stop string sits strictly inside another, that is plain `find`.
            let nested = stop_list.iter().any(|a| stop_list.iter().any(|b| {
                !b.is_empty()
                    && (1..a.len()).any(|p| {
                        a.is_char_boundary(p) && a[p..].starts_with(b.as_str())
                            && p + b.len() < a.len()
                    })
            }));
            if !nested {
                prop_assert_eq!(&out, &reference_find(&text, &stop_list));
            }
        }

        #[test]
        fn without_stops_the_text_passes_unchanged(
            text in text_strategy(40),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut s = StopStrings::new(Vec::new());
            prop_assert_eq!(run(&mut s, &split(&text, cuts)), (text.clone(), None));
        }
    }
}
