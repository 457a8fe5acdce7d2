//! The `<think>`/`</think>` state machine over token ids.

/// The ids that open and close a thought.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinkTokens {
    pub start: u32,
    pub end: u32,
}

/// Where a choice's output stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Inside a thought: tokens are reasoning.
    Thinking,
    /// The thought is over (or never began): tokens are the answer.
    Answering,
}

/// Where one output token belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRole {
    Reasoning,
    Content,
    /// `<think>` or `</think>` where it opens or closes the thought: shown in neither part.
    Marker,
}

/// Follows one choice's output token by token.
#[derive(Clone, Copy, Debug)]
pub struct ThinkTracker {
    tokens: ThinkTokens,
    phase: Phase,
    reasoning_tokens: usize,
}

impl ThinkTracker {
    pub fn new(tokens: ThinkTokens, start: Phase) -> Self {
        Self {
            tokens,
            phase: start,
            reasoning_tokens: 0,
        }
    }

    /// The phase the output starts in: inside a thought when the prompt's last marker is
    /// `<think>` (the template forced it), answering when it is `</think>`. A prompt with
    /// neither starts inside a thought too, as vLLM's `deepseek_r1` parser assumes: R1
    /// students think first, and older templates leave writing `<think>` to the model.
    pub fn phase_after(tokens: ThinkTokens, prompt: &[u32]) -> Phase {
        match prompt
            .iter()
            .rev()
            .find(|&&t| t == tokens.start || t == tokens.end)
        {
            Some(&t) if t == tokens.end => Phase::Answering,
            _ => Phase::Thinking,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Reasoning tokens so far, the markers not counted (vLLM's count).
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    /// Classifies the next output token. Once the answer has begun, everything is answer,
    /// markers included: a model quoting `</think>` in its answer shows it.
    pub fn push(&mut self, token: u32) -> TokenRole {
        match self.phase {
            Phase::Answering => TokenRole::Content,
            Phase::Thinking if token == self.tokens.end => {
                self.phase = Phase::Answering;
                TokenRole::Marker
            }
            // The model writing `<think>` itself (or again): the thought goes on.
            Phase::Thinking if token == self.tokens.start => TokenRole::Marker,
            Phase::Thinking => {
                self.reasoning_tokens += 1;
                TokenRole::Reasoning
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ThinkTokens = ThinkTokens { start: 10, end: 11 };

    #[test]
    fn the_prompt_decides_where_the_output_starts() {
        assert_eq!(
            ThinkTracker::phase_after(T, &[1, 2, 10, 5]),
            Phase::Thinking
        );
        assert_eq!(
            ThinkTracker::phase_after(T, &[10, 5, 11, 6]),
            Phase::Answering
        );
        assert_eq!(ThinkTracker::phase_after(T, &[10, 11, 10]), Phase::Thinking);
        assert_eq!(ThinkTracker::phase_after(T, &[1, 2]), Phase::Thinking);
    }

    #[test]
    fn reasoning_ends_at_the_first_end_marker_and_markers_are_not_counted() {
        let mut t = ThinkTracker::new(T, Phase::Thinking);
        let roles: Vec<_> = [10, 1, 2, 11, 3, 11, 10]
            .iter()
            .map(|&x| t.push(x))
            .collect();
        use TokenRole::*;
        assert_eq!(
            roles,
            [Marker, Reasoning, Reasoning, Marker, Content, Content, Content]
        );
        assert_eq!(t.reasoning_tokens(), 2);
        assert_eq!(t.phase(), Phase::Answering);
    }

    #[test]
    fn an_answering_start_shows_everything() {
        let mut t = ThinkTracker::new(T, Phase::Answering);
        assert_eq!(t.push(10), TokenRole::Content);
        assert_eq!(t.push(1), TokenRole::Content);
        assert_eq!(t.reasoning_tokens(), 0);
    }
}
