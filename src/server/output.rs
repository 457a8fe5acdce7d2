//! Turns a request's engine events into what the client sees: per choice, incremental text
//! (UTF-8 safe), stop strings applied (the stop text is never sent, text that may begin one is
//! held back), logprobs with token text, and usage. Shared by both endpoints and by streaming
//! and non-streaming responses.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, SelectAll, StreamExt};
use futures_util::Stream;

use super::admission::QueuePermit;
use super::error::ApiError;
use super::protocol::{PromptTokensDetails, Usage};
use crate::engine::{ChoiceStopper, EngineEvent, FinishReason, RequestStream, Timings};
use crate::tokenizer::{IncrementalDetokenizer, StopStrings, Tokenizer};

/// One generated token's logprob information, with token text.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug)]
pub enum OutputEvent {
    /// New text (possibly empty when only logprobs arrived) for choice `index`.
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: &'static str,
    },
}

/// Per-request output settings.
pub struct OutputOptions {
    pub stops: Vec<String>,
    pub skip_special_tokens: bool,
    pub logprobs: bool,
    /// Choices per prompt (`n`).
    pub n: usize,
}

struct ChoiceState {
    detok: IncrementalDetokenizer,
    stops: StopStrings,
    logprobs: Vec<TokenLogprob>,
    finished: bool,
    prompt: usize,
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
    permit: Option<QueuePermit>,
    pub usage: Usage,
    pub times: RequestTimes,
    /// Finish reasons as the engine reported them (stop strings count as `stop`).
    pub finish_reasons: Vec<FinishReason>,
}

impl Outputs {
    /// `streams[p]` carries the `n` choices of prompt `p`; choice `p * n + c` is its index.
    pub fn new(
        streams: Vec<RequestStream>,
        prompt_lens: &[usize],
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
        let choices = (0..prompt_lens.len() * opts.n)
            .map(|i| ChoiceState {
                detok: tokenizer.detokenizer(opts.skip_special_tokens),
                stops: StopStrings::new(opts.stops.clone()),
                logprobs: Vec::new(),
                finished: false,
                prompt: i / opts.n,
            })
            .collect::<Vec<_>>();
        let prompt_tokens: usize = prompt_lens.iter().map(|l| l * opts.n).sum();
        Self {
            events,
            stoppers,
            unfinished: choices.len(),
            choices,
            tokenizer,
            n: opts.n,
            want_logprobs: opts.logprobs,
            pending: VecDeque::new(),
            permit: Some(permit),
            usage: Usage {
                prompt_tokens,
                completion_tokens: 0,
                total_tokens: prompt_tokens,
                prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 0 }),
            },
            times: RequestTimes::default(),
            finish_reasons: Vec::new(),
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
                return Some(Err(ApiError::overloaded(
                    "the engine stopped before the request finished",
                )));
            };
            if let Err(e) = self.handle(prompt, ev) {
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
            } => {
                let now = Instant::now();
                self.times.first_token.get_or_insert(now);
                self.times.last_token = Some(now);
                self.permit = None; // running now: no longer counts as queued
                let index = prompt * self.n + choice;
                let want_logprobs = self.want_logprobs;
                let tokenizer = self.tokenizer.clone();
                let Some(c) = self.choices.get_mut(index) else {
                    return Ok(());
                };
                if c.finished {
                    return Ok(());
                }
                self.usage.completion_tokens += 1;
                self.usage.total_tokens += 1;
                if want_logprobs {
                    if let Some(lp) = logprobs {
                        let text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
                        c.logprobs.push(TokenLogprob {
                            token: text(token),
                            logprob: lp.logprob,
                            top: lp.top.iter().map(|&(id, l)| (text(id), l)).collect(),
                        });
                    }
                }
                let delta = c
                    .detok
                    .push(token)
                    .map_err(|e| ApiError::internal(e.to_string(), "detokenize"))?;
                let outcome = c.stops.push(delta.as_deref().unwrap_or(""));
                let logprobs = std::mem::take(&mut c.logprobs);
                if !outcome.emit.is_empty() || !logprobs.is_empty() {
                    self.pending.push_back(OutputEvent::Text {
                        index,
                        text: outcome.emit,
                        logprobs,
                    });
                }
                if outcome.stopped.is_some() {
                    c.finished = true;
                    self.unfinished -= 1;
                    self.finish_reasons.push(FinishReason::Stop);
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
                let index = prompt * self.n + choice;
                if let Some(d) = self.usage.prompt_tokens_details.as_mut() {
                    d.cached_tokens += cached_prompt_tokens;
                }
                self.times.engine = Some(timings);
                let Some(c) = self.choices.get_mut(index) else {
                    return Ok(());
                };
                if c.finished {
                    return Ok(());
                }
                if stop_token.is_some() {
                    self.usage.completion_tokens += 1; // counted, not shown
                    self.usage.total_tokens += 1;
                }
                c.finished = true;
                self.unfinished -= 1;
                self.finish_reasons.push(reason);
                let tail = c
                    .detok
                    .finish()
                    .map_err(|e| ApiError::internal(e.to_string(), "detokenize"))?;
                let mut outcome = c.stops.push(tail.as_deref().unwrap_or(""));
                let stopped = outcome.stopped.is_some();
                if !stopped {
                    outcome.emit.push_str(&c.stops.finish());
                }
                if !outcome.emit.is_empty() {
                    self.pending.push_back(OutputEvent::Text {
                        index,
                        text: outcome.emit,
                        logprobs: Vec::new(),
                    });
                }
                let reason = if stopped { "stop" } else { reason.as_str() };
                self.pending
                    .push_back(OutputEvent::Finished { index, reason });
            }
            EngineEvent::Error { message } => {
                return Err(ApiError::internal(message, "engine"));
            }
        }
        Ok(())
    }
}
