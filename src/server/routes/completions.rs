//! `POST /v1/completions`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;

use crate::server::error::ApiError;
use crate::server::output::{OutputEvent, OutputOptions, Outputs, PromptShape, TokenLogprob};
use crate::server::protocol::{
    CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse,
    Prompt,
};
use crate::server::state::{unix_now, AppState};
use crate::server::{json, sse, validate};

/// OpenAI's default for the completions endpoint.
const DEFAULT_MAX_TOKENS: u32 = 16;

enum PromptIn {
    Text(String),
    Ids(Vec<u32>),
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let arrival = Instant::now();
    let id = st.next_id("cmpl");
    let log = st.request_log;
    match handle(st, body, arrival, id.clone()).await {
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
) -> Result<Response, ApiError> {
    let body = json::body(body)?;
    let req: CompletionRequest = json::parse(&body)?;
    st.check_model(req.model.as_deref())?;
    let prepared = validate::prepare(
        &req.sampling,
        Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        req.logprobs,
        st.vocab_size,
        &st.sampling_defaults,
    )?;
    let prompts: Vec<PromptIn> = match req.prompt {
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
    let echo = req.echo.unwrap_or(false);
    let tokenizer = st.tokenizer.clone();
    let text_bytes = prompts
        .iter()
        .map(|p| match p {
            PromptIn::Text(s) => s.len(),
            PromptIn::Ids(ids) => ids.len() * 4,
        })
        .sum();
    let encoded = st
        .preprocess
        .run_sized(text_bytes, move || {
            prompts
                .into_iter()
                .map(|p| match p {
                    PromptIn::Text(s) => {
                        let ids = tokenizer.encode(&s, true)?;
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
                .collect::<Result<Vec<_>, crate::tokenizer::TokenizerError>>()
        })
        .await?
        .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    let prompt_tokens: usize = encoded.iter().map(|(ids, _)| ids.len()).sum();
    let permit = st.admission.try_admit(prompt_tokens * prepared.n)?;
    let mut streams = Vec::with_capacity(encoded.len());
    let mut echoes = Vec::with_capacity(encoded.len());
    let mut shapes = Vec::with_capacity(encoded.len());
    for (ids, text) in encoded {
        let r = prepared.engine_request(Arc::from(ids), true, st.max_model_len, arrival);
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
    let n = prepared.n;
    let outputs = Outputs::new(
        streams,
        &shapes,
        st.tokenizer.clone(),
        OutputOptions {
            stops: prepared.stop_strings.clone(),
            skip_special_tokens: prepared.skip_special_tokens,
            logprobs: req.logprobs.is_some(),
            n,
            metrics: st.metrics.clone(),
            arrival,
            // Completions are raw text: the reasoning stays in it.
            reasoning: None,
        },
        permit,
    );
    let echo_of = move |index: usize| echoes[index / n].clone();
    if prepared.stream {
        Ok(stream_response(
            st,
            id,
            outputs,
            echo_of,
            prepared.include_usage,
            arrival,
        ))
    } else {
        collect(st, id, outputs, echo_of, req.logprobs.is_some(), arrival).await
    }
}

fn completion_logprobs(entries: &[TokenLogprob], offset: &mut usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    for e in entries {
        lp.tokens.push(e.token.clone());
        lp.token_logprobs.push(e.logprob);
        lp.top_logprobs.push(e.top.iter().cloned().collect());
        lp.text_offset.push(*offset);
        *offset += e.token.len();
    }
    lp
}

async fn collect(
    st: Arc<AppState>,
    id: String,
    mut outputs: Outputs,
    echo_of: impl Fn(usize) -> String,
    want_logprobs: bool,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let k = outputs.num_choices();
    let mut texts: Vec<String> = (0..k).map(&echo_of).collect();
    let mut offsets: Vec<usize> = texts.iter().map(String::len).collect();
    let mut logprobs: Vec<CompletionLogprobs> = vec![CompletionLogprobs::default(); k];
    let mut reasons: Vec<Option<&'static str>> = vec![None; k];
    while let Some(ev) = outputs.next().await {
        match ev? {
            OutputEvent::Text {
                index,
                text,
                logprobs: lp,
                ..
            } => {
                if want_logprobs {
                    let part = completion_logprobs(&lp, &mut offsets[index]);
                    let all = &mut logprobs[index];
                    all.tokens.extend(part.tokens);
                    all.token_logprobs.extend(part.token_logprobs);
                    all.top_logprobs.extend(part.top_logprobs);
                    all.text_offset.extend(part.text_offset);
                }
                texts[index].push_str(&text);
            }
            OutputEvent::Finished { index, reason } => reasons[index] = Some(reason),
        }
    }
    let choices = texts
        .into_iter()
        .zip(logprobs)
        .enumerate()
        .map(|(index, (text, lp))| CompletionChoice {
            index,
            text,
            logprobs: want_logprobs.then_some(lp),
            finish_reason: reasons[index],
        })
        .collect();
    st.request_log
        .finished(&id, &outputs, arrival, &st.model_name);
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created: unix_now(),
        model: st.model_name.clone(),
        choices,
        usage: Some(outputs.usage),
    })
    .into_response())
}

struct StreamState<F> {
    st: Arc<AppState>,
    id: String,
    outputs: Outputs,
    echo_of: F,
    echoed: usize,
    include_usage: bool,
    offsets: Vec<usize>,
    finished: bool,
    arrival: Instant,
}

impl<F: Fn(usize) -> String> StreamState<F> {
    fn chunk(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Option<crate::server::protocol::Usage>>,
    ) -> Bytes {
        let c = CompletionChunk {
            id: self.id.clone(),
            object: "text_completion",
            created: unix_now(),
            model: self.st.model_name.clone(),
            choices,
            usage,
        };
        sse::event(&serde_json::to_string(&c).unwrap_or_default())
    }

    fn usage_slot(&self) -> Option<Option<crate::server::protocol::Usage>> {
        self.include_usage.then_some(None)
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        if self.echoed < self.outputs.num_choices() {
            let index = self.echoed;
            self.echoed += 1;
            let text = (self.echo_of)(index);
            if !text.is_empty() {
                self.offsets[index] = text.len();
                let choice = CompletionChoice {
                    index,
                    text,
                    logprobs: None,
                    finish_reason: None,
                };
                return Some(self.chunk(vec![choice], self.usage_slot()));
            }
        }
        match self.outputs.next().await {
            Some(Ok(OutputEvent::Text {
                index,
                text,
                logprobs,
                ..
            })) => {
                let lp = (!logprobs.is_empty())
                    .then(|| completion_logprobs(&logprobs, &mut self.offsets[index]));
                let choice = CompletionChoice {
                    index,
                    text,
                    logprobs: lp,
                    finish_reason: None,
                };
                Some(self.chunk(vec![choice], self.usage_slot()))
            }
            Some(Ok(OutputEvent::Finished { index, reason })) => {
                let choice = CompletionChoice {
                    index,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(reason),
                };
                Some(self.chunk(vec![choice], self.usage_slot()))
            }
            Some(Err(e)) => {
                self.finished = true;
                self.st.request_log.rejected(&self.id, &e);
                Some(sse::error_then_done(&e.to_json()))
            }
            None => {
                self.finished = true;
                self.st.request_log.finished(
                    &self.id,
                    &self.outputs,
                    self.arrival,
                    &self.st.model_name,
                );
                let usage = self
                    .include_usage
                    .then(|| self.chunk(vec![], Some(Some(self.outputs.usage))));
                Some(sse::finish(usage))
            }
        }
    }
}

fn stream_response(
    st: Arc<AppState>,
    id: String,
    outputs: Outputs,
    echo_of: impl Fn(usize) -> String + Send + 'static,
    include_usage: bool,
    arrival: Instant,
) -> Response {
    let state = StreamState {
        st,
        id,
        offsets: vec![0; outputs.num_choices()],
        outputs,
        echo_of,
        echoed: 0,
        include_usage,
        finished: false,
        arrival,
    };
    sse::response(stream::unfold(state, |mut s| async move {
        s.next_bytes().await.map(|b| (b, s))
    }))
}
