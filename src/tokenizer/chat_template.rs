//! Chat templates, rendered to match transformers' `apply_chat_template`: jinja2 with
//! `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`
//! and its own `tojson`; minijinja plus Python-compat methods stands in for jinja2.

use std::borrow::Cow;
use std::fmt::Write as _;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use super::python_format::{python_formatter, tojson};
use super::TokenizerError;

const NAME: &str = "chat_template";

/// One message as a template sees it: the fields transformers passes through from an OpenAI
/// message. Absent optional fields are left out (undefined to the template), as they are
/// absent from the dict transformers renders.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// `None` renders as none: an assistant turn that only calls tools.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An earlier turn's reasoning, under both names clients use; the template decides
    /// whether to show it (R1's drops it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
            reasoning_content: None,
            reasoning: None,
        }
    }

    /// The content as text (empty for none).
    pub fn text(&self) -> &str {
        self.content.as_deref().unwrap_or("")
    }
}

/// A template compiled once and rendered many times.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Value,
    eos_token: Value,
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(python_formatter);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, replace_generation_tags(source).into_owned())?;
        // transformers leaves unset special tokens out of the context (undefined), not None.
        let token = |t: Option<String>| t.map_or(Value::UNDEFINED, Value::from);
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: token(bos_token),
            eos_token: token(eos_token),
        })
    }

    /// The template as written (e.g. to see whether it writes `<think>`).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_serialized(messages, add_generation_prompt, None)
    }

    /// Renders any serializable message list, e.g. OpenAI messages with `tool_calls`
    /// or `null` content, which [`ChatMessage`] cannot carry.
    /// `tools` is the request's tool list, given to the template as transformers'
    /// `tools=` (none when absent).
    pub fn render_serialized<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, TokenizerError> {
        self.render_with(messages, add_generation_prompt, tools, None)
    }

    /// [`Self::render_serialized`] with extra template variables (a request's
    /// `chat_template_kwargs`); the standard ones win over an extra of the same name.
    pub fn render_with<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, TokenizerError> {
        let template = self.env.get_template(NAME)?;
        // transformers passes tools=None and documents=None explicitly, so templates
        // see them as defined-but-none ("tools is not none" is false).
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            tools => tools.map_or(Value::from(()), Value::from_serialize),
            documents => Value::from(()),
        };
        // Later maps win: the standard variables over the request's extras.
        let ctx = match extra {
            Some(extra) => minijinja::value::merge_maps([Value::from_serialize(extra), ctx]),
            None => ctx,
        };
        Ok(template.render(ctx)?)
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<Value, Error> {
    let mut out = String::new();
    // chrono reports a bad format specifier as a fmt::Error rather than text.
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// transformers' `{% generation %}...{% endgeneration %}` extension marks assistant
/// text for training masks and renders its body unchanged; minijinja has no such
/// tag, so the keywords become `if true` / `endif`, keeping any `-` whitespace control.
fn replace_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        let Some(end) = tag.find("%}") else {
            rest = tag;
            break;
        };
        let inner = &tag[2..end];
        let keyword = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let replacement = match keyword {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner.replacen(keyword, r, 1));
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_if_blocks() {
        assert_eq!(
            replace_generation_tags("a{%- generation %}b{% endgeneration -%}c{% if x %}"),
            "a{%- if true %}b{% endif -%}c{% if x %}"
        );
    }

    #[test]
    fn extra_variables_reach_the_template_but_never_replace_the_standard_ones() {
        let t = ChatTemplate::new(
            "{% if enable_thinking is false %}no-think {% endif %}{{ messages | length }} \
             {{ add_generation_prompt }}",
            None,
            None,
        )
        .unwrap();
        let messages = [ChatMessage::new("user", "hi")];
        let extra: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"enable_thinking": false, "messages": [], "add_generation_prompt": false}"#,
        )
        .unwrap();
        assert_eq!(
            t.render_with(&messages, true, None, Some(&extra)).unwrap(),
            "no-think 1 True"
        );
        assert_eq!(
            t.render_with(&messages, true, None, None).unwrap(),
            "1 True"
        );
    }
}
