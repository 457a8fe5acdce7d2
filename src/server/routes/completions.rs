//! `POST /v1/completions`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::stream;

use crate::server::constrain::{self, compiled_or_400, grammar_job};
use crate::server::error::ApiError;
use crate::server::fields::{self, Endpoint};
use crate::server::output::{OutputEvent, OutputOptions, Outputs, PromptShape, TokenLogprob};
use crate::server::protocol::{
    CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse,
    Prompt, PromptLogprobs, Usage,
};
use crate::server::request_log::{RequestId, RequestLogger};
use crate::server::scores::{completion_logprobs, vllm_prompt_logprobs};
use crate::server::state::{unix_now, AppState};
use crate::server::{json, sse, validate};
use crate::structured::Gate;

/// OpenAI's default for the completions endpoint.
const DEFAULT_MAX_TOKENS: u32 = 16;

pub enum PromptIn {
    Text(String),
    Ids(Vec<u32>),
}

impl PromptIn {
    /// The prompts of a request's `prompt` field, one to 64 of them.
    pub fn all(prompt: Prompt) -> Result<Vec<PromptIn>, ApiError> {
        let prompts: Vec<PromptIn> = match prompt {
            Prompt::Text(s) => vec![PromptIn::Text(s)],
            Prompt::Texts(v) => v.into_iter().map(PromptIn::Text).collect(),
            Prompt::Tokens(t) => vec![PromptIn::Ids(t)],
            Prompt::TokenLists(l) => l.into_iter().map(PromptIn::Ids).collect(),
        };
        if prompts.is_empty() || prompts.len() > 64 {
            return Err(ApiError::invalid(
                "prompt must hold between 1 and 64 prompts",
                Some("prompt"),
            ));
        }
        Ok(prompts)
    }
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    request_id: Option<Extension<RequestId>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let arrival = Instant::now();
    let id = st.next_id("cmpl");
    let log = st.request_log.for_request(request_id.map(|Extension(r)| r));
    match handle(st, body, arrival, id.clone(), log.clone()).await {
        Ok(r) => r,
        Err(e) => {
            log.rejected(&id, &e);
            e.into_response()
        }
    }
}

async fn handle(
    st: Arc<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    arrival: Instant,
    id: String,
    log: RequestLogger,
) -> Result<Response, ApiError> {
    let body = json::body(body)?;
    let req: CompletionRequest = json::parse(&body)?;
    st.check_model(req.model.as_deref())?;
    fields::check(&req.other, Endpoint::Completions)?;
    let requested = constrain::output_grammar(&req.other)?;
    let echo = req.echo.unwrap_or(false);
    let n = req.sampling.n.unwrap_or(1);
    let best_of = req.best_of.unwrap_or(n);
    if req.best_of.is_some() && (best_of < n || best_of > validate::MAX_N) {
        return Err(ApiError::invalid(
            format!(
                "best_of must be between n ({n}) and {}, got {best_of}",
                validate::MAX_N
            ),
            Some("best_of"),
        ));
    }
    let stream = req.sampling.stream.unwrap_or(false);
    if stream && best_of != n {
        return Err(ApiError::invalid(
            "best_of must equal n when streaming (the best are known only at the end)",
            Some("best_of"),
        ));
    }
    let shown = Shown {
        logprobs: req.logprobs,
        echo,
        prompt_logprobs: req.prompt_logprobs,
    };
    // Ranking by cumulative logprob needs every token's logprob, shown or not.
    let engine_logprobs = if best_of > n {
        Some(req.logprobs.unwrap_or(0))
    } else {
        req.logprobs
    };
    // The engine runs best_of choices; n only picks how many come back.
    let mut req = req;
    req.sampling.n = Some(best_of);
    let prepared = validate::prepare(
        &req.sampling,
        Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        validate::Scores {
            logprobs: engine_logprobs,
            prompt_logprobs: shown.prompt_scores(),
            prompt_only: echo,
        },
        st.vocab_size,
        &st.sampling_defaults,
    )
    .map_err(|mut e| {
        if best_of != n && e.param.as_deref() == Some("n") {
            e.param = Some("best_of".into());
        }
        e
    })?;
    let prompts = PromptIn::all(req.prompt)?;
    let add_special = req.add_special_tokens.unwrap_or(true);
    let tokenizer = st.tokenizer.clone();
    let text_bytes: usize = prompts
        .iter()
        .map(|p| match p {
            PromptIn::Text(s) => s.len(),
            PromptIn::Ids(ids) => ids.len() * 4,
        })
        .sum();
    let (key, work) = grammar_job(&st, requested.as_ref());
    let text_bytes = text_bytes + work;
    // A matcher per choice of every prompt, copied here rather than on the engine thread.
    let choices = prepared.n * prompts.len();
    // Plain greedy choices ask the grammar one token at a time: they share its lexer.
    let greedy = prepared.params.is_plain_greedy();
    let grammars = st.grammars.clone();
    let field = requested.as_ref().map(|r| r.field.clone());
    let grammar = requested.zip(key);
    let (encoded, compiled) = st
        .preprocess
        .run_sized(text_bytes, move || {
            // Compiled here, before admission and off the engine thread (a cache hit usually).
            let compiled = grammar.map(|(r, key)| {
                let c = grammars.compile_keyed(key, &r.spec, r.kind)?;
                let starts = c.starts(choices, greedy);
                Ok((c, starts))
            });
            let encoded = prompts
                .into_iter()
                .map(|p| match p {
                    PromptIn::Text(s) => {
                        let ids = tokenizer.encode(&s, add_special)?;
                        Ok((ids, if echo { s } else { String::new() }))
                    }
                    PromptIn::Ids(ids) => {
                        let text = if echo {
                            tokenizer.decode(&ids, false)?
                        } else {
                            String::new()
                        };
                        Ok((ids, text))
                    }
                })
                .collect::<Result<Vec<_>, crate::tokenizer::TokenizerError>>();
            (encoded, compiled)
        })
        .await?;
    let encoded = encoded.map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    let mut compiled = compiled_or_400(compiled, field.as_deref())?;
    let prompt_tokens: usize = encoded.iter().map(|(ids, _)| ids.len()).sum();
    let permit = st.admission.try_admit(prompt_tokens * prepared.n)?;
    let mut streams = Vec::with_capacity(encoded.len());
    let mut echoes = Vec::with_capacity(encoded.len());
    let mut shapes = Vec::with_capacity(encoded.len());
    for (ids, text) in encoded {
        let mut r = prepared.engine_request(Arc::from(ids), true, st.max_model_len, arrival);
        r.constraint = compiled.as_mut().map(|(c, starts)| {
            let rest = starts.split_off(prepared.n.min(starts.len()));
            let mine = std::mem::replace(starts, rest);
            c.factory(mine, Gate::Open, Some(st.metrics.grammar().mask.clone()))
        });
        shapes.push(PromptShape {
            tokens: r.prompt_ids.len(),
            max_tokens: r.stop.max_tokens,
        });
        streams.push(
            st.engine
                .submit(r)
                .map_err(|e| ApiError::from_submit(e, "prompt"))?,
        );
        echoes.push(text);
    }
    let outputs = Outputs::new(
        streams,
        &shapes,
        st.tokenizer.clone(),
        OutputOptions {
            stops: prepared.stop_strings.clone(),
            skip_special_tokens: prepared.skip_special_tokens,
            logprobs: engine_logprobs.is_some(),
            n: best_of as usize,
            metrics: st.metrics.clone(),
            arrival,
            // Completions are raw text: the reasoning stays in it.
            reasoning: None,
            // An echoed prompt's offsets count in the text echoed.
            prompt_texts: if echo { echoes.clone() } else { Vec::new() },
        },
        permit,
    );
    let reply = Reply {
        st,
        log,
        id,
        created: unix_now(),
        arrival,
        shown,
        echoes,
        per_prompt: best_of as usize,
    };
    if prepared.stream {
        Ok(stream_response(
            reply,
            outputs,
            prepared.include_usage,
            prepared.continuous_usage,
        ))
    } else {
        reply.collect(outputs, n as usize).await
    }
}

/// What the request asked to see besides the text.
#[derive(Clone, Copy, Debug)]
struct Shown {
    logprobs: Option<u32>,
    echo: bool,
    prompt_logprobs: Option<u32>,
}

impl Shown {
    /// The prompt's logprobs are shown with the echoed prompt.
    fn echoes_scores(self) -> bool {
        self.echo && self.logprobs.is_some()
    }

    /// How many top logprobs each prompt position needs, when the prompt is scored.
    fn prompt_scores(self) -> Option<u32> {
        let echoed = self.echoes_scores().then_some(self.logprobs).flatten();
        echoed.max(self.prompt_logprobs)
    }
}

/// One choice as it is being collected.
#[derive(Default)]
struct ChoiceOut {
    text: String,
    logprobs: CompletionLogprobs,
    prompt_logprobs: Option<PromptLogprobs>,
    finish_reason: Option<&'static str>,
    /// Sum of its generated tokens' logprobs (for `best_of`).
    cumulative: f64,
}

/// The response being built, for either way of sending it.
struct Reply {
    st: Arc<AppState>,
    log: RequestLogger,
    id: String,
    /// The same in every chunk of a stream.
    created: u64,
    arrival: Instant,
    shown: Shown,
    /// Per prompt, the text echoed (empty without `echo`).
    echoes: Vec<String>,
    /// Choices the engine runs per prompt (`best_of`).
    per_prompt: usize,
}

impl Reply {
    fn echo_of(&self, index: usize) -> &str {
        self.echoes
            .get(index / self.per_prompt)
            .map_or("", String::as_str)
    }

    fn echo_chars(&self, index: usize) -> usize {
        self.echo_of(index).chars().count()
    }

    /// What a scored prompt adds to each of its choices: the echoed tokens' logprobs and
    /// vLLM's `prompt_logprobs`.
    fn prompt_parts(
        &self,
        tokens: &[TokenLogprob],
    ) -> (Option<CompletionLogprobs>, Option<PromptLogprobs>) {
        let echoed = self
            .shown
            .echoes_scores()
            .then(|| completion_logprobs(tokens, self.shown.logprobs.unwrap_or(0) as usize, 0));
        let vllm = self
            .shown
            .prompt_logprobs
            .map(|k| vllm_prompt_logprobs(tokens, k as usize));
        (echoed, vllm)
    }

    async fn collect(self, mut outputs: Outputs, n: usize) -> Result<Response, ApiError> {
        let k = outputs.num_choices();
        let mut choices: Vec<ChoiceOut> = (0..k)
            .map(|i| ChoiceOut {
                text: self.echo_of(i).to_string(),
                ..ChoiceOut::default()
            })
            .collect();
        let top = self.shown.logprobs.unwrap_or(0) as usize;
        while let Some(ev) = outputs.next().await {
            match ev? {
                OutputEvent::Text {
                    index,
                    text,
                    logprobs: lp,
                    ..
                } => {
                    let base = self.echo_chars(index);
                    let c = &mut choices[index];
                    c.cumulative += lp
                        .iter()
                        .filter_map(|e| e.logprob)
                        .map(f64::from)
                        .sum::<f64>();
                    if self.shown.logprobs.is_some() {
                        c.logprobs.extend(completion_logprobs(&lp, top, base));
                    }
                    c.text.push_str(&text);
                }
                OutputEvent::Finished { index, reason } => {
                    choices[index].finish_reason = Some(reason)
                }
                OutputEvent::Prompt { prompt, tokens } => {
                    let (echoed, vllm) = self.prompt_parts(&tokens);
                    let from = prompt * self.per_prompt;
                    for c in choices.iter_mut().skip(from).take(self.per_prompt) {
                        if let Some(e) = &echoed {
                            let generated = std::mem::take(&mut c.logprobs);
                            c.logprobs = e.clone();
                            c.logprobs.extend(generated);
                        }
                        c.prompt_logprobs = vllm.clone();
                    }
                }
            }
        }
        let mut kept = Vec::with_capacity(k / self.per_prompt.max(1) * n);
        let mut rest = choices.into_iter();
        for _ in 0..k / self.per_prompt.max(1) {
            let mut group: Vec<ChoiceOut> = rest.by_ref().take(self.per_prompt).collect();
            if group.len() > n {
                // vLLM's best_of: the highest cumulative logprob first.
                group.sort_by(|a, b| b.cumulative.total_cmp(&a.cumulative));
                group.truncate(n);
            }
            kept.extend(group);
        }
        let choices = kept
            .into_iter()
            .enumerate()
            .map(|(index, c)| CompletionChoice {
                index,
                text: c.text,
                logprobs: self.shown.logprobs.map(|_| c.logprobs),
                finish_reason: c.finish_reason,
                prompt_logprobs: c.prompt_logprobs,
            })
            .collect();
        self.log
            .finished(&self.id, &outputs, self.arrival, &self.st.model_name);
        Ok(json::response(&CompletionResponse {
            id: self.id,
            object: "text_completion",
            created: self.created,
            model: self.st.model_name.clone(),
            choices,
            usage: Some(outputs.usage),
        }))
    }
}

struct StreamState {
    reply: Reply,
    outputs: Outputs,
    /// Chunks ready to go before the next event is awaited.
    queued: VecDeque<Bytes>,
    /// Choices whose echo has been sent (in order), when the echo does not wait for scores.
    echoed: usize,
    include_usage: bool,
    continuous_usage: bool,
    finished: bool,
}

impl StreamState {
    fn chunk(&self, choice: Option<CompletionChoice>, usage: Option<Option<Usage>>) -> Bytes {
        let c = CompletionChunk {
            id: self.reply.id.clone(),
            object: "text_completion",
            created: self.reply.created,
            model: self.reply.st.model_name.clone(),
            choices: choice.into_iter().collect(),
            usage,
        };
        sse::event(&json::to_string(&c))
    }

    fn choice_chunk(&self, choice: CompletionChoice) -> Bytes {
        let usage = match (self.include_usage, self.continuous_usage) {
            (false, _) => None,
            (true, false) => Some(None),
            (true, true) => Some(Some(self.outputs.usage)),
        };
        self.chunk(Some(choice), usage)
    }

    /// A scored prompt's echo waits for its scores; any other echo goes out first.
    fn echo_waits(&self) -> bool {
        self.reply.shown.prompt_scores().is_some()
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        if let Some(b) = self.queued.pop_front() {
            return Some(b);
        }
        if self.finished {
            return None;
        }
        while !self.echo_waits() && self.echoed < self.outputs.num_choices() {
            let index = self.echoed;
            self.echoed += 1;
            let text = self.reply.echo_of(index).to_string();
            if !text.is_empty() {
                return Some(self.choice_chunk(CompletionChoice {
                    index,
                    text,
                    logprobs: None,
                    finish_reason: None,
                    prompt_logprobs: None,
                }));
            }
        }
        let top = self.reply.shown.logprobs.unwrap_or(0) as usize;
        match self.outputs.next().await {
            Some(Ok(OutputEvent::Text {
                index,
                text,
                logprobs,
                ..
            })) => {
                let lp = (self.reply.shown.logprobs.is_some() && !logprobs.is_empty())
                    .then(|| completion_logprobs(&logprobs, top, self.reply.echo_chars(index)));
                Some(self.choice_chunk(CompletionChoice {
                    index,
                    text,
                    logprobs: lp,
                    finish_reason: None,
                    prompt_logprobs: None,
                }))
            }
            Some(Ok(OutputEvent::Prompt { prompt, tokens })) => {
                let (echoed, vllm) = self.reply.prompt_parts(&tokens);
                let per = self.reply.per_prompt;
                for index in prompt * per..(prompt + 1) * per {
                    let chunk = self.choice_chunk(CompletionChoice {
                        index,
                        text: self.reply.echo_of(index).to_string(),
                        logprobs: echoed.clone(),
                        finish_reason: None,
                        prompt_logprobs: vllm.clone(),
                    });
                    self.queued.push_back(chunk);
                }
                self.queued.pop_front()
            }
            Some(Ok(OutputEvent::Finished { index, reason })) => {
                Some(self.choice_chunk(CompletionChoice {
                    index,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(reason),
                    prompt_logprobs: None,
                }))
            }
            Some(Err(e)) => {
                self.finished = true;
                self.reply.log.rejected(&self.reply.id, &e);
                Some(sse::error_then_done(&e.to_json()))
            }
            None => {
                self.finished = true;
                let r = &self.reply;
                r.log
                    .finished(&r.id, &self.outputs, r.arrival, &r.st.model_name);
                let usage = self
                    .include_usage
                    .then(|| self.chunk(None, Some(Some(self.outputs.usage))));
                Some(sse::finish(usage))
            }
        }
    }
}

fn stream_response(
    reply: Reply,
    outputs: Outputs,
    include_usage: bool,
    continuous_usage: bool,
) -> Response {
    let state = StreamState {
        reply,
        outputs,
        queued: VecDeque::new(),
        echoed: 0,
        include_usage,
        continuous_usage,
        finished: false,
    };
    sse::response(stream::unfold(state, |mut s| async move {
        s.next_bytes().await.map(|b| (b, s))
    }))
}
