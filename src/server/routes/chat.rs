//! `POST /v1/chat/completions`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::stream;

use crate::reasoning::{Effort, Phase, Reasoning, ReasoningPlan};
use crate::server::constrain::{self, compiled_or_400, grammar_job};
use crate::server::error::ApiError;
use crate::server::fields::{self, Endpoint};
use crate::server::output::{OutputEvent, OutputOptions, Outputs, PromptShape, TextPart};
use crate::server::protocol::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessageIn, ChatMessageOut,
    ChatRequest, ChatResponse, ChatTokenLogprob, Content, PromptLogprobs, ReasoningOut, Usage,
};
use crate::server::request_log::{RequestId, RequestLogger};
use crate::server::scores::{chat_logprobs, vllm_prompt_logprobs};
use crate::server::state::{unix_now, AppState};
use crate::server::tool_calls::{split_answer, StreamedCalls};
use crate::server::{json, sse, validate};
use crate::structured::Gate;
use crate::tokenizer::{ChatMessage, RenderArgs};
use crate::tools::ToolFormat;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    request_id: Option<Extension<RequestId>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let arrival = Instant::now();
    let id = st.next_id("chatcmpl");
    let log = st.request_log.for_request(request_id.map(|Extension(r)| r));
    match handle(st, body, arrival, id.clone(), log.clone()).await {
        Ok(r) => r,
        Err(e) => {
            log.rejected(&id, &e);
            e.into_response()
        }
    }
}

/// OpenAI messages → template messages: text parts are joined, `developer` is a system turn.
pub fn to_template_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("unsupported role {:?}; expected one of {ROLES:?}", m.role),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::invalid(
                                format!(
                                    "content part type {:?} is not supported (text only)",
                                    p.kind
                                ),
                                Some(&format!("messages[{i}].content")),
                            ));
                        }
                        s.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    s
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            // A turn that only calls tools keeps its null content: templates test for it
            // (`content is none`). Any other null content renders as empty text, as before.
            let content = match (&m.content, &m.tool_calls) {
                (None, Some(_)) => None,
                _ => Some(content),
            };
            let reasoning = m.reasoning_content.clone().or_else(|| m.reasoning.clone());
            Ok(ChatMessage {
                role: role.to_string(),
                content,
                tool_calls: m.tool_calls.clone(),
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
                reasoning_content: reasoning.clone(),
                reasoning,
            })
        })
        .collect()
}

/// How the rendered chat ends: `(add_generation_prompt, continue_final_message)`. The first
/// defaults to true, or to false when the last message is to be continued; both is an error.
pub fn turn_ending(
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
) -> Result<(bool, bool), ApiError> {
    let continue_final = continue_final_message.unwrap_or(false);
    let add = add_generation_prompt.unwrap_or(!continue_final);
    if continue_final && add {
        return Err(ApiError::invalid(
            "continue_final_message and add_generation_prompt cannot both be true",
            Some("continue_final_message"),
        ));
    }
    Ok((add, continue_final))
}

/// The request's tools as the template's `tools` value.
pub fn template_tools(tools: &Option<Vec<serde_json::Value>>) -> Option<serde_json::Value> {
    tools.clone().map(serde_json::Value::Array)
}

/// The thinking budget a request asks for, checked against the served model.
pub fn requested_budget(
    req: &ChatRequest,
    reasoning: Option<&Reasoning>,
) -> Result<Option<usize>, ApiError> {
    let effort = match req.reasoning_effort.as_deref() {
        None => None,
        Some(e) => Some(Effort::parse(e).ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "reasoning_effort must be one of {:?}, got {e:?}",
                    Effort::NAMES
                ),
                Some("reasoning_effort"),
            )
        })?),
    };
    let Some(reasoning) = reasoning else {
        let field = if req.max_reasoning_tokens.is_some() {
            Some("max_reasoning_tokens")
        } else {
            effort.map(|_| "reasoning_effort")
        };
        return match field {
            Some(f) => Err(ApiError::invalid(
                format!(
                    "{f} needs a reasoning model; this one has no reasoning parser (see \
                     --reasoning-parser)"
                ),
                Some(f),
            )),
            None => Ok(None),
        };
    };
    Ok(reasoning.budget_for(req.max_reasoning_tokens.map(|n| n as usize), effort))
}

/// `validate::prepare` names the completions endpoint's fields; a chat request sent
/// `top_logprobs` for what it calls `logprobs`, and maybe `max_completion_tokens` for
/// `max_tokens`, and the error must name what the client sent.
fn chat_field_names(mut e: ApiError, sent_max_completion_tokens: bool) -> ApiError {
    let rename = match e.param.as_deref() {
        Some("logprobs") => Some(("logprobs", "top_logprobs")),
        Some("max_tokens") if sent_max_completion_tokens => {
            Some(("max_tokens", "max_completion_tokens"))
        }
        _ => None,
    };
    if let Some((from, to)) = rename {
        e.param = Some(to.to_string());
        e.message = e.message.replacen(from, to, 1);
    }
    e
}

async fn handle(
    st: Arc<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    arrival: Instant,
    id: String,
    log: RequestLogger,
) -> Result<Response, ApiError> {
    let body = json::body(body)?;
    let mut req: ChatRequest = json::parse(&body)?;
    st.check_model(req.model.as_deref())?;
    fields::check(&req.other, Endpoint::Chat)?;
    let tokens = st.tokenizer.clone();
    let tool_plan = constrain::tool_plan(req.tools.as_deref(), &req.other, st.tool_format, &|m| {
        tokens.is_added_token(m)
    })?;
    let requested = match (
        constrain::output_grammar(&req.other)?,
        tool_plan.as_ref().and_then(|p| p.grammar.clone()),
    ) {
        (Some(r), Some(_)) => {
            return Err(ApiError::invalid(
                format!(
                    "{} cannot be combined with tool_choice \"required\" or a named function: \
                     the calls have their own grammar",
                    r.field
                ),
                Some("tool_choice"),
            ))
        }
        (a, b) => a.or(b),
    };
    let (add_generation_prompt, continue_final) =
        turn_ending(req.add_generation_prompt, req.continue_final_message)?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top = if want_logprobs {
        Some(req.top_logprobs.unwrap_or(0))
    } else if req.top_logprobs.is_some_and(|t| t > 0) {
        return Err(ApiError::invalid(
            "top_logprobs requires logprobs to be true",
            Some("top_logprobs"),
        ));
    } else {
        None
    };
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let prepared = validate::prepare(
        &req.sampling,
        max_tokens,
        validate::Scores {
            logprobs: top,
            prompt_logprobs: req.prompt_logprobs,
            prompt_only: false,
        },
        st.vocab_size,
        &st.sampling_defaults,
    )
    .map_err(|e| chat_field_names(e, req.max_completion_tokens.is_some()))?;
    let budget = requested_budget(&req, st.reasoning.as_ref())?;
    let include_reasoning = req.include_reasoning.unwrap_or(true);
    let messages = to_template_messages(&req.messages)?;
    let echo_text = match (req.echo.unwrap_or(false), messages.last()) {
        (true, Some(last)) if last.role == "assistant" => last.text().to_string(),
        _ => String::new(),
    };
    let tokenizer = st.tokenizer.clone();
    let tools = template_tools(&req.tools);
    let extra = req.chat_template_kwargs.take();
    let add_special = req.add_special_tokens.unwrap_or(false);
    // Each message also costs the template's text around it: many empty messages are not
    // small work.
    let text_bytes = messages.iter().map(|m| m.text().len() + 64).sum::<usize>()
        + tools.as_ref().map_or(0, |t| t.to_string().len());
    let (key, work) = grammar_job(&st, requested.as_ref());
    let text_bytes = text_bytes + work;
    let choices = prepared.n;
    // Plain greedy choices ask the grammar one token at a time: they share its lexer.
    let greedy = prepared.params.is_plain_greedy();
    let grammars = st.grammars.clone();
    let field = requested.as_ref().map(|r| r.field.clone());
    let grammar = requested.zip(key);
    let (ids, compiled) = st
        .preprocess
        .run_sized(text_bytes, move || {
            // Compiled here, before admission and off the engine thread (a cache hit usually).
            let compiled = grammar.map(|(r, key)| {
                let c = grammars.compile_keyed(key, &r.spec, r.kind)?;
                let starts = c.starts(choices, greedy);
                Ok((c, starts))
            });
            let ids = tokenizer
                .render_chat(
                    &messages,
                    RenderArgs {
                        add_generation_prompt,
                        continue_final_message: continue_final,
                        tools: tools.as_ref(),
                        extra: extra.as_ref(),
                    },
                )
                // Templates emit BOS themselves, as transformers' apply_chat_template assumes.
                .and_then(|text| tokenizer.encode(&text, add_special));
            (ids, compiled)
        })
        .await?;
    let mut ids = ids.map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let compiled = compiled_or_400(compiled, field.as_deref())?;
    let plan = st.reasoning.as_ref().map(|r| r.plan(&ids, budget));
    if let Some(p) = &plan {
        ids.extend_from_slice(&p.prompt_suffix);
    }
    let prompt_len = ids.len();
    let permit = st.admission.try_admit(prompt_len * prepared.n)?;
    let mut r = prepared.engine_request(
        Arc::from(ids),
        max_tokens.is_some(),
        st.max_model_len,
        arrival,
    );
    r.steer = plan.as_ref().and_then(|p| p.steer.clone());
    r.constraint = compiled.map(|(c, starts)| {
        c.factory(
            starts,
            answer_gate(plan.as_ref()),
            Some(st.metrics.grammar().mask.clone()),
        )
    });
    let shown = Shown {
        reasoning: plan.is_some(),
        include_reasoning,
        prompt_logprobs: req.prompt_logprobs,
        tools: tool_plan.map(|p| p.format),
    };
    let shape = PromptShape {
        tokens: prompt_len,
        max_tokens: r.stop.max_tokens,
    };
    let stream = st.engine.submit(r)?;
    let outputs = Outputs::new(
        vec![stream],
        &[shape],
        st.tokenizer.clone(),
        OutputOptions {
            stops: prepared.stop_strings.clone(),
            // A tool-call marker may be a special token: the parser must see it.
            skip_special_tokens: prepared.skip_special_tokens && shown.tools.is_none(),
            logprobs: want_logprobs,
            n: prepared.n,
            metrics: st.metrics.clone(),
            arrival,
            reasoning: plan,
            prompt_texts: Vec::new(),
        },
        permit,
    );
    if prepared.stream {
        Ok(stream_response(
            st,
            id,
            outputs,
            echo_text,
            (prepared.include_usage, prepared.continuous_usage),
            (arrival, log),
            shown,
        ))
    } else {
        collect(
            st,
            (id, log),
            outputs,
            echo_text,
            want_logprobs,
            arrival,
            shown,
        )
        .await
    }
}

/// A grammar constrains the answer: with a reasoning parser on, from the end of thinking
/// (the reasoning is free, as vLLM has it).
fn answer_gate(plan: Option<&ReasoningPlan>) -> Gate {
    match plan {
        Some(p) if p.start == Phase::Thinking => Gate::After(p.tokens.end),
        _ => Gate::Open,
    }
}

/// What a response shows besides the answer's text.
#[derive(Clone, Copy, Debug)]
struct Shown {
    /// The model has a reasoning parser: the output is split.
    reasoning: bool,
    /// The reasoning part is sent (`include_reasoning`, default true).
    include_reasoning: bool,
    /// vLLM's `prompt_logprobs`: the top N of each prompt position.
    prompt_logprobs: Option<u32>,
    /// The answer is parsed into tool calls in this format.
    tools: Option<ToolFormat>,
}

impl Shown {
    fn sends_reasoning(self) -> bool {
        self.reasoning && self.include_reasoning
    }
}

async fn collect(
    st: Arc<AppState>,
    (id, log): (String, RequestLogger),
    mut outputs: Outputs,
    echo: String,
    want_logprobs: bool,
    arrival: Instant,
    shown: Shown,
) -> Result<Response, ApiError> {
    let k = outputs.num_choices();
    let mut prompt_logprobs = None;
    let mut texts = vec![echo; k];
    let mut thoughts = vec![String::new(); k];
    let mut logprobs: Vec<Vec<ChatTokenLogprob>> = vec![Vec::new(); k];
    let mut reasons: Vec<Option<&'static str>> = vec![None; k];
    while let Some(ev) = outputs.next().await {
        match ev? {
            OutputEvent::Text {
                index,
                part,
                text,
                logprobs: lp,
            } => {
                match part {
                    TextPart::Content => texts[index].push_str(&text),
                    TextPart::Reasoning => thoughts[index].push_str(&text),
                }
                logprobs[index].extend(chat_logprobs(&lp));
            }
            OutputEvent::Finished { index, reason } => reasons[index] = Some(reason),
            OutputEvent::Prompt { tokens, .. } => {
                prompt_logprobs = shown
                    .prompt_logprobs
                    .map(|k| vllm_prompt_logprobs(&tokens, k as usize));
            }
        }
    }
    let choices = texts
        .into_iter()
        .zip(thoughts)
        .zip(logprobs)
        .enumerate()
        .map(|(index, ((content, thought), lp))| {
            let (content, calls) = match shown.tools {
                Some(format) => split_answer(format, &content),
                None => (Some(content), Vec::new()),
            };
            // vLLM's shape: a reasoning model's empty answer (it never stopped thinking) is
            // null, as is an empty thought.
            let content = content.filter(|c| !shown.reasoning || !c.is_empty());
            ChatChoice {
                index,
                message: ChatMessageOut {
                    role: "assistant",
                    content,
                    reasoning: shown
                        .sends_reasoning()
                        .then(|| ReasoningOut::new((!thought.is_empty()).then_some(thought))),
                    tool_calls: (!calls.is_empty()).then_some(calls.clone()),
                },
                logprobs: want_logprobs.then_some(ChatLogprobs { content: lp }),
                finish_reason: finish_reason(reasons[index], !calls.is_empty()),
            }
        })
        .collect();
    log.finished(&id, &outputs, arrival, &st.model_name);
    Ok(json::response(&ChatResponse {
        id,
        object: "chat.completion",
        created: unix_now(),
        model: st.model_name.clone(),
        choices,
        usage: outputs.usage,
        prompt_logprobs,
    }))
}

/// A choice that stopped after making calls finished to make them.
fn finish_reason(reason: Option<&'static str>, called: bool) -> Option<&'static str> {
    match reason {
        Some("stop") if called => Some("tool_calls"),
        r => r,
    }
}

struct StreamState {
    st: Arc<AppState>,
    log: RequestLogger,
    id: String,
    created: u64,
    outputs: Outputs,
    echo: String,
    /// Choices whose first chunk (with the role) has been sent.
    started: usize,
    include_usage: bool,
    /// Usage so far on every chunk.
    continuous_usage: bool,
    finished: bool,
    arrival: Instant,
    shown: Shown,
    /// Per choice, its calls as they stream (with tools).
    calls: Vec<StreamedCalls>,
}

impl StreamState {
    fn chunk(&self, choice: Option<ChatChunkChoice>, usage: Option<Option<Usage>>) -> Bytes {
        self.chunk_with(choice, usage, None)
    }

    fn chunk_with(
        &self,
        choice: Option<ChatChunkChoice>,
        usage: Option<Option<Usage>>,
        prompt_logprobs: Option<PromptLogprobs>,
    ) -> Bytes {
        let c = ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.st.model_name.clone(),
            choices: choice.into_iter().collect(),
            usage,
            prompt_logprobs,
        };
        sse::event(&json::to_string(&c))
    }

    fn usage_slot(&self) -> Option<Option<Usage>> {
        match (self.include_usage, self.continuous_usage) {
            (false, _) => None,
            (true, false) => Some(None),
            (true, true) => Some(Some(self.outputs.usage)),
        }
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        // Each choice opens with the assistant role (and any echoed text), as OpenAI does.
        if self.started < self.outputs.num_choices() {
            let index = self.started;
            self.started += 1;
            let delta = ChatDelta {
                role: Some("assistant"),
                content: Some(self.echo.clone()),
                ..ChatDelta::default()
            };
            let choice = ChatChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason: None,
            };
            return Some(self.chunk(Some(choice), self.usage_slot()));
        }
        loop {
            return match self.outputs.next().await {
                Some(Ok(OutputEvent::Text {
                    index,
                    part,
                    text,
                    logprobs,
                })) => {
                    let delta = match part {
                        TextPart::Content => match self.calls.get_mut(index) {
                            Some(calls) => {
                                let parts = calls.push(&text);
                                if parts.is_empty() && logprobs.is_empty() {
                                    continue;
                                }
                                parts.into_delta()
                            }
                            None => ChatDelta {
                                content: Some(text),
                                ..ChatDelta::default()
                            },
                        },
                        TextPart::Reasoning if self.shown.include_reasoning => ChatDelta {
                            reasoning_content: Some(text.clone()),
                            reasoning: Some(text),
                            ..ChatDelta::default()
                        },
                        // Left out; a chunk still carries any logprobs it had.
                        TextPart::Reasoning if logprobs.is_empty() => continue,
                        TextPart::Reasoning => ChatDelta::default(),
                    };
                    let lp = (!logprobs.is_empty()).then(|| ChatLogprobs {
                        content: chat_logprobs(&logprobs),
                    });
                    let choice = ChatChunkChoice {
                        index,
                        delta,
                        logprobs: lp,
                        finish_reason: None,
                    };
                    Some(self.chunk(Some(choice), self.usage_slot()))
                }
                Some(Ok(OutputEvent::Prompt { tokens, .. })) => {
                    let Some(k) = self.shown.prompt_logprobs else {
                        continue;
                    };
                    let lp = vllm_prompt_logprobs(&tokens, k as usize);
                    Some(self.chunk_with(None, self.usage_slot(), Some(lp)))
                }
                Some(Ok(OutputEvent::Finished { index, reason })) => {
                    // What the call parser held back goes out before the finish.
                    let held = self.calls.get_mut(index).map(|c| c.finish());
                    let called = self.calls.get(index).is_some_and(|c| c.started > 0);
                    let mut bytes = Vec::new();
                    if let Some(parts) = held.filter(|p| !p.is_empty()) {
                        let choice = ChatChunkChoice {
                            index,
                            delta: parts.into_delta(),
                            logprobs: None,
                            finish_reason: None,
                        };
                        bytes.extend_from_slice(&self.chunk(Some(choice), self.usage_slot()));
                    }
                    let choice = ChatChunkChoice {
                        index,
                        delta: ChatDelta::default(),
                        logprobs: None,
                        finish_reason: finish_reason(Some(reason), called),
                    };
                    bytes.extend_from_slice(&self.chunk(Some(choice), self.usage_slot()));
                    Some(Bytes::from(bytes))
                }
                Some(Err(e)) => {
                    self.finished = true;
                    self.log.rejected(&self.id, &e);
                    Some(sse::error_then_done(&e.to_json()))
                }
                None => {
                    self.finished = true;
                    self.log
                        .finished(&self.id, &self.outputs, self.arrival, &self.st.model_name);
                    let usage = self
                        .include_usage
                        .then(|| self.chunk(None, Some(Some(self.outputs.usage))));
                    Some(sse::finish(usage))
                }
            };
        }
    }
}

fn stream_response(
    st: Arc<AppState>,
    id: String,
    outputs: Outputs,
    echo: String,
    (include_usage, continuous_usage): (bool, bool),
    (arrival, log): (Instant, RequestLogger),
    shown: Shown,
) -> Response {
    let calls = match shown.tools {
        Some(format) => (0..outputs.num_choices())
            .map(|_| StreamedCalls::new(format))
            .collect(),
        None => Vec::new(),
    };
    let state = StreamState {
        calls,
        st,
        log,
        id,
        created: unix_now(),
        outputs,
        echo,
        started: 0,
        include_usage,
        continuous_usage,
        finished: false,
        arrival,
        shown,
    };
    sse::response(stream::unfold(state, |mut s| async move {
        s.next_bytes().await.map(|b| (b, s))
    }))
}
