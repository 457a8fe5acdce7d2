//! An incremental Server-Sent Events parser (the WHATWG `text/event-stream` rules) for streamed
//! completions: bytes arrive in arbitrary reads, so an event may be split across reads or several
//! may share one; lines end in `\n`, `\r\n` or `\r`; several `data:` lines join with `\n`; a blank
//! line dispatches. Owns framing only: what a payload means (`[DONE]`, an error object, a content
//! chunk) is the client's business.

use bytes::{Bytes, BytesMut};

/// One dispatched event. `data` is the joined `data:` field; `event` the `event:` field, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<Bytes>,
    pub data: Bytes,
}

impl SseEvent {
    /// `data: [DONE]`, OpenAI's end-of-stream sentinel.
    pub fn is_done(&self) -> bool {
        self.data.trim_ascii() == b"[DONE]"
    }

    /// An error event: either `event: error`, or a payload that is a JSON object whose first key
    /// is `"error"` (OpenAI's and vLLM's mid-stream error envelope).
    pub fn is_error(&self) -> bool {
        if self.event.as_deref() == Some(b"error") {
            return true;
        }
        let d = self.data.trim_ascii_start();
        d.strip_prefix(b"{")
            .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"\"error\""))
    }
}

/// Parser state: unconsumed bytes and the event being assembled.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
    event: Option<Bytes>,
    // The common case is one `data:` line per event: it is kept as a zero-copy slice, and only a
    // second line makes a joined copy.
    data: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event, or `None` until more bytes arrive.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = memchr::memchr2(b'\n', b'\r', &self.buf)?;
            let term_len = if self.buf[end] == b'\r' {
                match self.buf.get(end + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    // A trailing `\r` may be the first half of `\r\n`: wait for the next read so
                    // the `\n` is not mistaken for a blank line.
                    None => return None,
                }
            } else {
                1
            };
            let line = self.buf.split_to(end).freeze();
            let _ = self.buf.split_to(term_len);
            if let Some(ev) = self.line(line) {
                return Some(ev);
            }
        }
    }

    /// End of stream: the last line and event, if the server closed without the final blank
    /// line. The standard discards such an event, but a load generator that dropped a server's
    /// last chunk would misreport its output, so it is dispatched.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.buf.is_empty() {
            let mut line = self.buf.split().freeze();
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            if let Some(ev) = self.line(line) {
                return Some(ev);
            }
        }
        self.dispatch()
    }

    /// Handles one line without its terminator; returns an event when the line was blank.
    fn line(&mut self, line: Bytes) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None; // comment (keep-alive)
        }
        let (name, value) = match memchr::memchr(b':', &line) {
            Some(i) => {
                let skip = if line.get(i + 1) == Some(&b' ') { 2 } else { 1 };
                (line.slice(..i), line.slice(i + skip..))
            }
            None => (line.clone(), Bytes::new()),
        };
        match &name[..] {
            b"data" => self.add_data(value),
            b"event" => self.event = Some(value),
            _ => {} // id, retry and unknown fields do not affect a load test
        }
        None
    }

    fn add_data(&mut self, value: Bytes) {
        if let Some(joined) = &mut self.joined {
            joined.extend_from_slice(b"\n");
            joined.extend_from_slice(&value);
        } else if let Some(first) = self.data.take() {
            let mut joined = BytesMut::with_capacity(first.len() + 1 + value.len());
            joined.extend_from_slice(&first);
            joined.extend_from_slice(b"\n");
            joined.extend_from_slice(&value);
            self.joined = Some(joined);
        } else {
            self.data = Some(value);
        }
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        let data = match (self.joined.take(), self.data.take()) {
            (Some(j), _) => j.freeze(),
            (None, Some(d)) => d,
            // An event with no data field is not dispatched (per the standard).
            (None, None) => return None,
        };
        Some(SseEvent { event, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<SseEvent> {
        std::iter::from_fn(|| p.next_event()).collect()
    }

    fn data(evs: &[SseEvent]) -> Vec<&[u8]> {
        evs.iter().map(|e| &e.data[..]).collect()
    }

    #[test]
    fn one_read_many_events() {
        let mut p = SseParser::new();
        p.push(b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n");
        let evs = all(&mut p);
        assert_eq!(data(&evs), vec![&b"{\"a\":1}"[..], b"{\"a\":2}", b"[DONE]"]);
        assert!(!evs[0].is_done() && evs[2].is_done());
    }

    #[test]
    fn frames_split_at_every_byte() {
        let stream =
            b"data: {\"x\":\"hello\"}\r\n\r\n: keep-alive\n\ndata:no-space\n\ndata: [DONE]\n\n";
        // Feed one byte at a time: every boundary, including inside `\r\n`, is exercised.
        let mut p = SseParser::new();
        let mut evs = Vec::new();
        for b in stream.iter() {
            p.push(std::slice::from_ref(b));
            evs.extend(all(&mut p));
        }
        assert_eq!(
            data(&evs),
            vec![&b"{\"x\":\"hello\"}"[..], b"no-space", b"[DONE]"]
        );
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn split_in_two_reads_anywhere() {
        let stream: &[u8] =
            b"data: first\n\nevent: error\ndata: {\"error\":{}}\n\ndata: [DONE]\n\n";
        for cut in 0..=stream.len() {
            let mut p = SseParser::new();
            p.push(&stream[..cut]);
            let mut evs = all(&mut p);
            p.push(&stream[cut..]);
            evs.extend(all(&mut p));
            assert_eq!(
                data(&evs),
                vec![&b"first"[..], b"{\"error\":{}}", b"[DONE]"],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn multi_line_data_joins_with_newline() {
        let mut p = SseParser::new();
        p.push(b"data: line one\ndata: line two\ndata:\ndata: four\n\n");
        let evs = all(&mut p);
        assert_eq!(data(&evs), vec![&b"line one\nline two\n\nfour"[..]]);
    }

    #[test]
    fn bare_cr_line_endings() {
        let mut p = SseParser::new();
        p.push(b"data: a\rdata: b\r\rdata: c\r");
        assert_eq!(data(&all(&mut p)), vec![&b"a\nb"[..]]);
        // The last `\r` could still become `\r\n`: only the end of the stream settles it.
        p.push(b"\r");
        assert_eq!(data(&all(&mut p)), Vec::<&[u8]>::new());
        assert_eq!(p.finish().map(|e| e.data), Some(Bytes::from_static(b"c")));
    }

    #[test]
    fn error_events() {
        let mut p = SseParser::new();
        p.push(b"data: {\"error\": {\"message\": \"boom\", \"code\": 500}}\n\n");
        p.push(b"event: error\ndata: overloaded\n\n");
        p.push(b"data: {\"choices\":[{\"text\":\"{\\\"error\\\"\"}]}\n\n");
        let evs = all(&mut p);
        assert_eq!(evs.len(), 3);
        assert!(evs[0].is_error());
        assert!(evs[1].is_error());
        assert_eq!(evs[1].event.as_deref(), Some(&b"error"[..]));
        assert!(
            !evs[2].is_error(),
            "an error-looking string inside content is not an error"
        );
    }

    #[test]
    fn unterminated_last_event_is_dispatched_at_finish() {
        let mut p = SseParser::new();
        p.push(b"data: [DONE]");
        assert_eq!(p.next_event(), None);
        assert!(p.finish().is_some_and(|e| e.is_done()));
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        let mut p = SseParser::new();
        p.push(b"event: ping\n\nid: 7\nretry: 10\n\n");
        assert!(all(&mut p).is_empty());
    }
}
