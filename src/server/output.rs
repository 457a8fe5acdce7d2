//! Turns a request's engine events into what the client sees: per choice, incremental text
//! (UTF-8 safe), stop strings applied (the stop text is never sent, text that may begin one is
//! held back), logprobs with token text, and usage. Shared by both endpoints and by streaming
//! and non-streaming responses.
//!
//! It is also where a request's metrics are taken, because it is where tokens reach the
//! client: TTFT and every inter-token gap as tokens arrive (a few `Instant`s per choice, no
//! allocation per token), the request's intervals when a choice ends, and a client disconnect
//! when it is dropped with choices still running.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, SelectAll, StreamExt};
use futures_util::Stream;

use super::admission::QueuePermit;
use super::error::ApiError;
use super::protocol::{CompletionTokensDetails, PromptTokensDetails, Usage};
use crate::engine::{
    ChoiceStopper, EngineEvent, FinishReason, PromptLogprob, RequestStream, Timings,
};
use crate::metrics::{FinishedRequest, Metrics, RequestMetrics};
use crate::reasoning::{Phase, ReasoningPlan, ThinkTracker, TokenRole};
use crate::tokenizer::{IncrementalDetokenizer, StopStrings, Tokenizer};

/// A token as a response names it: its id, its text alone, and its own bytes (which for a
/// token ending inside a UTF-8 character are not its text's).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenShown {
    pub id: u32,
    pub text: String,
    pub bytes: Vec<u8>,
}

impl TokenShown {
    pub fn of(tokenizer: &Tokenizer, id: u32) -> Self {
        Self {
            id,
            text: tokenizer.decode(&[id], false).unwrap_or_default(),
            bytes: tokenizer.token_bytes(id),
        }
    }
}

/// One token's logprob information: a generated token, or a prompt token when scored.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: TokenShown,
    /// `None` only for a prompt's first token (nothing predicts it).
    pub logprob: Option<f32>,
    /// Its rank in the row that scored it (1: the most likely); prompt tokens only.
    pub rank: Option<u32>,
    /// Characters of the choice's generated text (of the prompt's text, for a prompt token)
    /// before this token's own: skipped special tokens add none.
    pub offset: usize,
    /// The row's most likely tokens, best first (ties: lower id first).
    pub top: Vec<(TokenShown, f32)>,
}

/// Which part of a choice's output a text belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextPart {
    /// Inside `<think>…</think>` (only with a reasoning plan).
    Reasoning,
    Content,
}

#[derive(Debug)]
pub enum OutputEvent {
    /// New text (possibly empty when only logprobs arrived) for choice `index`.
    Text {
        index: usize,
        part: TextPart,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: &'static str,
    },
    /// Prompt `prompt`'s tokens, each scored (the first has no logprob), before any text of
    /// its choices; only when the request scores its prompt.
    Prompt {
        prompt: usize,
        tokens: Vec<TokenLogprob>,
    },
}

/// Per-request output settings.
pub struct OutputOptions {
    pub stops: Vec<String>,
    pub skip_special_tokens: bool,
    pub logprobs: bool,
    /// Choices per prompt (`n`).
    pub n: usize,
    pub metrics: Arc<Metrics>,
    /// When the request reached the server.
    pub arrival: Instant,
    /// Split each choice into reasoning and content (chat with a reasoning parser on).
    pub reasoning: Option<ReasoningPlan>,
    /// Per prompt, the text a scored prompt's offsets count in (completions' echo: the
    /// prompt as sent); none: the prompt's detokenized text.
    pub prompt_texts: Vec<String>,
}

/// One prompt of the request as the engine got it.
#[derive(Clone, Copy, Debug)]
pub struct PromptShape {
    pub tokens: usize,
    pub max_tokens: usize,
}

struct ChoiceState {
    detok: IncrementalDetokenizer,
    stops: StopStrings,
    /// Where its tokens belong, with a reasoning plan.
    think: Option<ThinkTracker>,
    /// The end of its thought was forced by the budget.
    cut_off: bool,
    logprobs: Vec<TokenLogprob>,
    finished: bool,
    prompt: usize,
    shape: PromptShape,
    /// Tokens generated so far, a final EOS/stop token included.
    tokens: usize,
    /// Characters its detokenizer has produced (before stop strings hold any back).
    text_chars: usize,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    first_scheduled: Option<Instant>,
}

impl ChoiceState {
    /// The part its next text belongs to.
    fn part(&self) -> TextPart {
        match self.think.map(|t| t.phase()) {
            Some(Phase::Thinking) => TextPart::Reasoning,
            _ => TextPart::Content,
        }
    }

    /// Everything its detokenizer and stop-string matcher still hold, as text, and whether
    /// a stop string matched in it.
    fn flush_text(&mut self) -> Result<(String, bool), ApiError> {
        let tail = self
            .detok
            .finish()
            .map_err(|e| ApiError::internal(e.to_string(), "detokenize"))?;
        let mut outcome = self.stops.push(tail.as_deref().unwrap_or(""));
        let stopped = outcome.stopped.is_some();
        if !stopped {
            outcome.emit.push_str(&self.stops.finish());
        }
        Ok((outcome.emit, stopped))
    }

    /// Adds its reasoning tokens to the usage and the metrics, once, when it ends.
    fn count_reasoning(&self, usage: &mut Usage, m: &RequestMetrics) {
        if let Some(t) = &self.think {
            if let Some(d) = usage.completion_tokens_details.as_mut() {
                d.reasoning_tokens += t.reasoning_tokens();
            }
            m.reasoning(t.reasoning_tokens(), self.cut_off);
        }
    }

    /// A token of this choice reached the server (about to be sent): TTFT for the first,
    /// the gap since the previous one otherwise.
    fn token_arrived(&mut self, now: Instant, arrival: Instant, m: &RequestMetrics) {
        match self.last_token {
            None => m.first_token(now.saturating_duration_since(arrival)),
            Some(prev) => m.inter_token(now.saturating_duration_since(prev)),
        }
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        self.tokens += 1;
    }

    /// vLLM's intervals for this choice, ended at `now`. A choice always has a token by the
    /// time it ends normally; the fallbacks only keep the figures sane if it had none.
    fn intervals(
        &self,
        now: Instant,
        arrival: Instant,
        admitted: Instant,
        n: usize,
    ) -> FinishedRequest {
        let first = self.first_token.unwrap_or(now);
        let last = self.last_token.unwrap_or(now);
        let scheduled = self.first_scheduled.unwrap_or(first);
        FinishedRequest {
            e2e: now.saturating_duration_since(arrival),
            queue: scheduled.saturating_duration_since(admitted),
            prefill: first.saturating_duration_since(scheduled),
            decode: last.saturating_duration_since(first),
            inference: last.saturating_duration_since(scheduled),
            prompt_tokens: self.shape.tokens,
            generation_tokens: self.tokens,
            max_tokens: self.shape.max_tokens,
            n,
        }
    }
}

type Events = SelectAll<std::pin::Pin<Box<dyn Stream<Item = (usize, EngineEvent)> + Send>>>;

/// When the request's milestones happened, for logs and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTimes {
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub engine: Option<Timings>,
}

pub struct Outputs {
    events: Events,
    stoppers: Vec<ChoiceStopper>,
    choices: Vec<ChoiceState>,
    tokenizer: Arc<Tokenizer>,
    n: usize,
    want_logprobs: bool,
    pending: VecDeque<OutputEvent>,
    unfinished: usize,
    stop_list: Vec<String>,
    skip_special_tokens: bool,
    permit: Option<QueuePermit>,
    metrics: Arc<Metrics>,
    arrival: Instant,
    admitted: Instant,
    /// Ended by an error of ours, not by the client going away.
    failed: bool,
    pub usage: Usage,
    pub times: RequestTimes,
    /// Finish reasons as the engine reported them (stop strings count as `stop`).
    pub finish_reasons: Vec<FinishReason>,
    /// Per prompt: its cached tokens are in the usage (counted once, from its first choice).
    cached_counted: Vec<bool>,
    prompt_texts: Vec<String>,
}

impl Outputs {
    /// `streams[p]` carries the `n` choices of prompt `p`; choice `p * n + c` is its index.
    pub fn new(
        streams: Vec<RequestStream>,
        prompts: &[PromptShape],
        tokenizer: Arc<Tokenizer>,
        opts: OutputOptions,
        permit: QueuePermit,
    ) -> Self {
        let stoppers = streams.iter().map(|s| s.choice_stopper()).collect();
        let mut events: Events = SelectAll::new();
        for (p, s) in streams.into_iter().enumerate() {
            let st = stream::unfold(s, move |mut s| async move {
                s.recv().await.map(|ev| ((p, ev), s))
            });
            events.push(Box::pin(st));
        }
        let choices = (0..prompts.len() * opts.n)
            .map(|i| ChoiceState {
                detok: tokenizer.detokenizer(opts.skip_special_tokens),
                stops: StopStrings::new(opts.stops.clone()),
                think: opts.reasoning.as_ref().map(ReasoningPlan::tracker),
                cut_off: false,
                logprobs: Vec::new(),
                finished: false,
                prompt: i / opts.n,
                shape: prompts[i / opts.n],
                tokens: 0,
                text_chars: 0,
                first_token: None,
                last_token: None,
                first_scheduled: None,
            })
            .collect::<Vec<_>>();
        // OpenAI counts each prompt once, however many choices share it.
        let prompt_tokens: usize = prompts.iter().map(|p| p.tokens).sum();
        Self {
            events,
            stoppers,
            unfinished: choices.len(),
            choices,
            tokenizer,
            n: opts.n,
            want_logprobs: opts.logprobs,
            pending: VecDeque::new(),
            stop_list: opts.stops,
            skip_special_tokens: opts.skip_special_tokens,
            admitted: permit.admitted(),
            permit: Some(permit),
            metrics: opts.metrics,
            arrival: opts.arrival,
            failed: false,
            usage: Usage {
                prompt_tokens,
                completion_tokens: 0,
                total_tokens: prompt_tokens,
                prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 0 }),
                completion_tokens_details: opts
                    .reasoning
                    .is_some()
                    .then_some(CompletionTokensDetails::default()),
            },
            times: RequestTimes::default(),
            finish_reasons: Vec::new(),
            cached_counted: vec![false; prompts.len()],
            prompt_texts: opts.prompt_texts,
        }
    }

    pub fn num_choices(&self) -> usize {
        self.choices.len()
    }

    /// The next thing to tell the client; `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<Result<OutputEvent, ApiError>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Ok(ev));
            }
            if self.unfinished == 0 {
                return None;
            }
            let Some((prompt, ev)) = self.events.next().await else {
                self.failed = true;
                return Some(Err(ApiError::overloaded(
                    "the engine stopped before the request finished",
                )));
            };
            if let Err(e) = self.handle(prompt, ev) {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }

    fn handle(&mut self, prompt: usize, ev: EngineEvent) -> Result<(), ApiError> {
        match ev {
            EngineEvent::Token {
                choice,
                token,
                logprobs,
                first_scheduled,
                at,
                forced,
                cached_prompt_tokens,
            } => {
                if choice == 0 {
                    self.count_cached(prompt, cached_prompt_tokens);
                }
                // Timed when sampled: with `Delivery::AtFinish` tokens arrive together at the
                // end, and TTFT and the gaps must still be the engine's.
                let now = at;
                self.times.first_token.get_or_insert(now);
                self.times.last_token = Some(now);
                self.permit = None; // running now: no longer counts as queued
                let index = prompt * self.n + choice;
                let want_logprobs = self.want_logprobs;
                let tokenizer = &self.tokenizer;
                let Some(c) = self.choices.get_mut(index) else {
                    return Ok(());
                };
                if c.finished {
                    return Ok(());
                }
                if c.first_scheduled.is_none() {
                    c.first_scheduled = first_scheduled;
                }
                c.token_arrived(now, self.arrival, self.metrics.requests());
                self.usage.completion_tokens += 1;
                self.usage.total_tokens += 1;
                if want_logprobs {
                    if let Some(lp) = logprobs {
                        c.logprobs.push(TokenLogprob {
                            token: TokenShown::of(tokenizer, token),
                            logprob: Some(lp.logprob),
                            rank: None,
                            offset: c.text_chars,
                            top: lp
                                .top
                                .iter()
                                .map(|&(id, l)| (TokenShown::of(tokenizer, id), l))
                                .collect(),
                        });
                    }
                }
                let was = c.part();
                let role = c
                    .think
                    .as_mut()
                    .map_or(TokenRole::Content, |t| t.push(token));
                let mut stopped = false;
                if role == TokenRole::Marker {
                    if was == TextPart::Reasoning && c.part() == TextPart::Content {
                        // The thought is over: what its text still holds is reasoning, and
                        // the answer starts with fresh text state.
                        c.cut_off = forced;
                        let (tail, hit) = c.flush_text()?;
                        stopped = hit;
                        if !tail.is_empty() {
                            self.pending.push_back(OutputEvent::Text {
                                index,
                                part: TextPart::Reasoning,
                                text: tail,
                                logprobs: Vec::new(),
                            });
                        }
                        c.detok = tokenizer.detokenizer(self.skip_special_tokens);
                        c.stops = StopStrings::new(self.stop_list.clone());
                    }
                    let logprobs = std::mem::take(&mut c.logprobs);
                    if !logprobs.is_empty() {
                        self.pending.push_back(OutputEvent::Text {
                            index,
                            part: was,
                            text: String::new(),
                            logprobs,
                        });
                    }
                } else {
                    let delta = c
                        .detok
                        .push(token)
                        .map_err(|e| ApiError::internal(e.to_string(), "detokenize"))?;
                    c.text_chars += delta.as_deref().map_or(0, |d| d.chars().count());
                    let outcome = c.stops.push(delta.as_deref().unwrap_or(""));
                    let logprobs = std::mem::take(&mut c.logprobs);
                    if !outcome.emit.is_empty() || !logprobs.is_empty() {
                        self.pending.push_back(OutputEvent::Text {
                            index,
                            part: c.part(),
                            text: outcome.emit,
                            logprobs,
                        });
                    }
                    stopped = outcome.stopped.is_some();
                }
                if stopped {
                    c.finished = true;
                    self.unfinished -= 1;
                    self.finish_reasons.push(FinishReason::Stop);
                    self.metrics.requests().finished(&c.intervals(
                        Instant::now(),
                        self.arrival,
                        self.admitted,
                        self.n,
                    ));
                    c.count_reasoning(&mut self.usage, self.metrics.requests());
                    if let Some(s) = self.stoppers.get(c.prompt) {
                        s.finish_choice(choice);
                    }
                    self.pending.push_back(OutputEvent::Finished {
                        index,
                        reason: "stop",
                    });
                }
            }
            EngineEvent::Finished {
                choice,
                reason,
                stop_token,
                cached_prompt_tokens,
                timings,
                ..
            } => {
                let now = Instant::now();
                let index = prompt * self.n + choice;
                if choice == 0 {
                    self.count_cached(prompt, cached_prompt_tokens);
                }
                self.times.engine = Some(timings);
                let Some(c) = self.choices.get_mut(index) else {
                    return Ok(());
                };
                if c.finished {
                    return Ok(());
                }
                if c.first_scheduled.is_none() {
                    c.first_scheduled = timings.first_scheduled;
                }
                if stop_token.is_some() {
                    self.usage.completion_tokens += 1; // counted, not shown
                    self.usage.total_tokens += 1;
                    // A token generated like any other (vLLM counts it in TTFT and ITL too).
                    c.token_arrived(now, self.arrival, self.metrics.requests());
                }
                c.finished = true;
                self.unfinished -= 1;
                self.finish_reasons.push(reason);
                self.metrics.requests().finished(&c.intervals(
                    now,
                    self.arrival,
                    self.admitted,
                    self.n,
                ));
                c.count_reasoning(&mut self.usage, self.metrics.requests());
                let (text, stopped) = c.flush_text()?;
                if !text.is_empty() {
                    self.pending.push_back(OutputEvent::Text {
                        index,
                        part: c.part(),
                        text,
                        logprobs: Vec::new(),
                    });
                }
                let reason = if stopped { "stop" } else { reason.as_str() };
                self.pending
                    .push_back(OutputEvent::Finished { index, reason });
            }
            EngineEvent::PromptLogprobs { first, scored } => {
                self.pending.push_back(OutputEvent::Prompt {
                    prompt,
                    tokens: self.prompt_tokens(prompt, first, &scored)?,
                });
            }
            EngineEvent::Error { message } => {
                return Err(ApiError::internal(message, "engine"));
            }
        }
        Ok(())
    }
}

impl Outputs {
    /// Prompt `prompt`'s cached tokens, once: its other choices share the first one's blocks,
    /// and its first choice reports them on its first token (a choice a stop string ends
    /// gets no `Finished`) or, having none, on its `Finished`.
    fn count_cached(&mut self, prompt: usize, cached: usize) {
        if let Some(done) = self.cached_counted.get_mut(prompt) {
            if !*done {
                *done = true;
                if let Some(d) = self.usage.prompt_tokens_details.as_mut() {
                    d.cached_tokens += cached;
                }
            }
        }
    }

    /// A scored prompt as the client sees it, with each token's offset in characters of the
    /// prompt's text: the text the client sent where there is one (a token found there
    /// advances past itself; a special token it does not hold, e.g. an added BOS, advances
    /// nothing), else the ids' text with special tokens kept.
    fn prompt_tokens(
        &self,
        prompt: usize,
        first: u32,
        scored: &[PromptLogprob],
    ) -> Result<Vec<TokenLogprob>, ApiError> {
        let tk = &self.tokenizer;
        let target = self.prompt_texts.get(prompt).map(String::as_str);
        let mut detok = tk.detokenizer(false);
        let mut chars = 0;
        // Where `target` is read up to, in bytes.
        let mut at = 0;
        let mut out = Vec::with_capacity(scored.len() + 1);
        let ids = std::iter::once((first, None)).chain(scored.iter().map(|p| (p.token, Some(p))));
        for (id, p) in ids {
            out.push(TokenLogprob {
                token: TokenShown::of(tk, id),
                logprob: p.map(|p| p.logprob),
                rank: p.map(|p| p.rank),
                offset: chars,
                top: p.map_or_else(Vec::new, |p| {
                    p.top
                        .iter()
                        .map(|&(id, l)| (TokenShown::of(tk, id), l))
                        .collect()
                }),
            });
            let delta = detok
                .push(id)
                .map_err(|e| ApiError::internal(e.to_string(), "detokenize"))?;
            let piece = delta.as_deref().unwrap_or("");
            let Some(text) = target else {
                chars += piece.chars().count();
                continue;
            };
            let rest = text.get(at..).unwrap_or("");
            if rest.starts_with(piece) {
                at += piece.len();
                chars += piece.chars().count();
            } else if tk.decode(&[id], true).map_or(true, |t| t.is_empty()) {
                // A special token the sent text does not hold: it takes no room.
            } else {
                // The text differs from the ids' (a normalizer): keep counting the pieces.
                let n = piece.chars().count();
                at += rest.chars().take(n).map(char::len_utf8).sum::<usize>();
                chars += n;
            }
        }
        Ok(out)
    }
}

impl Drop for Outputs {
    /// Dropped with choices still running and no error of ours: the client went away (the
    /// engine sees the closed channels at its next step and counts the choices as aborted).
    fn drop(&mut self) {
        if self.unfinished > 0 && !self.failed {
            self.metrics.requests().client_disconnected();
        }
    }
}
