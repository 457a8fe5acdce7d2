//! The request fields that constrain an answer, read into one grammar: OpenAI's
//! `response_format`, vLLM's `structured_outputs` object and its older `guided_*` fields,
//! and (chat) `tools` with `tool_choice` and `parallel_tool_calls`.
//!
//! Owns their shapes, the 400s that name them, and how a request's grammar reaches the
//! tokenizer pool (`grammar_job`, `compiled_or_400`, shared by both routes); the grammar itself is
//! [`crate::structured`]'s, the tool-call formats [`crate::tools`]'.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::state::AppState;
use crate::structured::{closed_objects, GrammarError, GrammarSpec, Kind};
use crate::tools::{ToolFormat, ToolSpec};

/// A grammar asked for, and the field that asked (errors name it).
#[derive(Clone, Debug)]
pub struct Requested {
    pub spec: GrammarSpec,
    pub kind: Kind,
    pub field: String,
}

/// vLLM's backends: all of them name "a grammar engine", which llguidance is.
const BACKENDS: [&str; 4] = ["auto", "guidance", "llguidance", "xgrammar"];

/// The output grammar the request's fields ask for, if any; more than one is a 400.
pub fn output_grammar(other: &Map<String, Value>) -> Result<Option<Requested>, ApiError> {
    if let Some(b) = other
        .get("guided_decoding_backend")
        .filter(|v| !v.is_null())
    {
        match b.as_str() {
            Some(name) if BACKENDS.contains(&name) => {}
            _ => {
                return Err(ApiError::invalid(
                    format!(
                        "guided_decoding_backend must be one of {BACKENDS:?} (all are served by \
                         llguidance), got {b}"
                    ),
                    Some("guided_decoding_backend"),
                ))
            }
        }
    }
    let mut found: Vec<Requested> = Vec::new();
    if let Some(v) = present(other, "response_format") {
        found.extend(response_format(v)?);
    }
    if let Some(v) = present(other, "structured_outputs") {
        found.extend(structured_outputs(v)?);
    }
    for (field, kind) in [
        ("guided_json", Kind::JsonSchema),
        ("guided_regex", Kind::Regex),
        ("guided_choice", Kind::Choice),
        ("guided_grammar", Kind::Grammar),
    ] {
        if let Some(v) = present(other, field) {
            found.push(Requested {
                spec: spec_of(kind, v, field)?,
                kind,
                field: field.into(),
            });
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|r| r.field.as_str()).collect();
        return Err(ApiError::invalid(
            format!(
                "only one output constraint may be given; got {}",
                names.join(", ")
            ),
            Some(&found[1].field),
        ));
    }
    Ok(found.pop())
}

fn present<'a>(other: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    other.get(field).filter(|v| !v.is_null())
}

fn response_format(v: &Value) -> Result<Option<Requested>, ApiError> {
    let field = "response_format";
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("response_format must be an object", Some(field)))?;
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Requested {
            spec: GrammarSpec::json_object(),
            kind: Kind::JsonObject,
            field: field.into(),
        })),
        Some("json_schema") => {
            let field = "response_format.json_schema";
            let js = obj
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format of type json_schema needs a json_schema object",
                        Some(field),
                    )
                })?;
            let schema = js.get("schema").filter(|s| !s.is_null()).ok_or_else(|| {
                ApiError::invalid(
                    "response_format.json_schema needs a schema",
                    Some("response_format.json_schema.schema"),
                )
            })?;
            Ok(Some(Requested {
                spec: schema_spec(schema, "response_format.json_schema.schema")?,
                kind: Kind::JsonSchema,
                field: "response_format.json_schema.schema".into(),
            }))
        }
        other => Err(ApiError::invalid(
            format!(
                "response_format.type must be text, json_object or json_schema, got {}",
                other.map_or("nothing".to_string(), |t| format!("{t:?}"))
            ),
            Some("response_format.type"),
        )),
    }
}

/// vLLM's `structured_outputs`: one of `json`, `regex`, `choice`, `grammar`, `json_object`.
fn structured_outputs(v: &Value) -> Result<Option<Requested>, ApiError> {
    let obj = v.as_object().ok_or_else(|| {
        ApiError::invalid(
            "structured_outputs must be an object",
            Some("structured_outputs"),
        )
    })?;
    let mut found = Vec::new();
    let mut flexible = false;
    for (key, value) in obj {
        let field = format!("structured_outputs.{key}");
        if value.is_null() {
            continue;
        }
        let kind = match key.as_str() {
            "json" => Kind::JsonSchema,
            "regex" => Kind::Regex,
            "choice" => Kind::Choice,
            "grammar" => Kind::Grammar,
            "json_object" => match value {
                Value::Bool(true) => Kind::JsonObject,
                Value::Bool(false) => continue,
                _ => return Err(ApiError::invalid("must be a boolean", Some(&field))),
            },
            // We never fall back to another backend: nothing to disable.
            "disable_fallback" => continue,
            "disable_any_whitespace" => match value {
                Value::Bool(b) => {
                    flexible = !b;
                    continue;
                }
                _ => return Err(ApiError::invalid("must be a boolean", Some(&field))),
            },
            _ => {
                return Err(ApiError::invalid(
                    format!(
                        "{field} is not supported (supported: json, regex, choice, grammar, \
                         json_object, disable_any_whitespace, disable_fallback)"
                    ),
                    Some(&field),
                ))
            }
        };
        let spec = match kind {
            Kind::JsonObject => GrammarSpec::json_object(),
            _ => spec_of(kind, value, &field)?,
        };
        found.push(Requested { spec, kind, field });
    }
    if found.len() > 1 {
        return Err(ApiError::invalid(
            "structured_outputs must set exactly one of json, regex, choice, grammar, json_object",
            Some(&found[1].field),
        ));
    }
    Ok(found.pop().map(|mut r| {
        if flexible {
            if let GrammarSpec::JsonSchema(Value::Object(o)) = &mut r.spec {
                o.entry("x-guidance")
                    .or_insert_with(|| serde_json::json!({"whitespace_flexible": true}));
            }
        }
        r
    }))
}

fn spec_of(kind: Kind, v: &Value, field: &str) -> Result<GrammarSpec, ApiError> {
    let text = |what: &str| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| ApiError::invalid(format!("must be a {what} string"), Some(field)))
    };
    Ok(match kind {
        Kind::JsonSchema | Kind::JsonObject => schema_spec(v, field)?,
        Kind::Regex => GrammarSpec::Regex(text("regular expression")?),
        Kind::Grammar => GrammarSpec::Lark(text("Lark grammar")?),
        Kind::Choice => {
            let list = v
                .as_array()
                .ok_or_else(|| ApiError::invalid("must be a list of strings", Some(field)))?;
            let choices = list
                .iter()
                .map(|c| c.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::invalid("must be a list of strings", Some(field)))?;
            if choices.is_empty() {
                return Err(ApiError::invalid(
                    "must list at least one choice",
                    Some(field),
                ));
            }
            GrammarSpec::Choice(choices)
        }
        Kind::ToolCall => GrammarSpec::Lark(text("grammar")?),
    })
}

/// A schema given as an object, or as a string holding one (vLLM takes both).
fn schema_spec(v: &Value, field: &str) -> Result<GrammarSpec, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::invalid(format!("is not valid JSON: {e}"), Some(field)))?,
        other => other.clone(),
    };
    if !schema.is_object() && !schema.is_boolean() {
        return Err(ApiError::invalid(
            "a JSON schema must be an object",
            Some(field),
        ));
    }
    Ok(GrammarSpec::JsonSchema(schema))
}

/// What a chat request asks of tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A chat request's tools, once read: the format the answer is parsed in, and the grammar
/// when calls are required.
#[derive(Clone, Debug)]
pub struct ToolPlan {
    pub format: ToolFormat,
    /// With `tool_choice` `required` or a named function: only calls may be written.
    pub grammar: Option<Requested>,
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`. `Ok(None)`: the output is not
/// parsed into calls (no tools, or `tool_choice: "none"`, or no format and nothing asked).
/// `marker_is_token`: whether a format's marker (`<tool_call>`) is one token of the vocabulary,
/// which the grammar must then name as that token.
pub fn tool_plan(
    tools: Option<&[Value]>,
    other: &Map<String, Value>,
    format: Option<ToolFormat>,
    marker_is_token: &dyn Fn(&str) -> bool,
) -> Result<Option<ToolPlan>, ApiError> {
    let specs = tool_specs(tools.unwrap_or_default())?;
    let choice = tool_choice(present(other, "tool_choice"), &specs)?;
    let parallel = match present(other, "parallel_tool_calls") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "parallel_tool_calls must be a boolean",
                Some("parallel_tool_calls"),
            ))
        }
    };
    if choice == ToolChoice::None {
        return Ok(None);
    }
    let Some(format) = format else {
        return Err(ApiError::invalid(
            "tool calls need a tool-call format and this model's chat template writes none: \
             start the server with --tool-call-parser deepseek|hermes|llama3_json, or send \
             tool_choice \"none\"",
            Some("tool_choice"),
        ));
    };
    let grammar = match &choice {
        ToolChoice::Required => Some(specs.as_slice()),
        ToolChoice::Named(name) => Some(
            specs
                .iter()
                .position(|s| &s.name == name)
                .map(|i| &specs[i..=i])
                .unwrap_or_default(),
        ),
        _ => None,
    };
    let grammar = match grammar {
        None => None,
        Some(allowed) => {
            let lark = format
                .call_grammar_with(allowed, parallel, marker_is_token)
                .map_err(|e| {
                    ApiError::invalid(
                        format!("cannot constrain to these tools: {e}"),
                        Some("tools"),
                    )
                })?;
            Some(Requested {
                spec: GrammarSpec::Lark(lark),
                kind: Kind::ToolCall,
                field: "tools".into(),
            })
        }
    };
    Ok(Some(ToolPlan { format, grammar }))
}

fn tool_specs(tools: &[Value]) -> Result<Vec<ToolSpec>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let field = |f: &str| format!("tools[{i}]{f}");
            let obj = t
                .as_object()
                .ok_or_else(|| ApiError::invalid("a tool must be an object", Some(&field(""))))?;
            match obj.get("type").and_then(Value::as_str) {
                Some("function") => {}
                other => {
                    return Err(ApiError::invalid(
                        format!(
                            "only function tools are supported, got type {}",
                            other.map_or("nothing".to_string(), |t| format!("{t:?}"))
                        ),
                        Some(&field(".type")),
                    ))
                }
            }
            let f = obj
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "a function tool needs a function object",
                        Some(&field(".function")),
                    )
                })?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid("a function needs a name", Some(&field(".function.name")))
                })?;
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => serde_json::json!({"type": "object"}),
                // Closed, as the schema of a function's arguments means.
                Some(p @ Value::Object(_)) => closed_objects(p.clone()),
                Some(_) => {
                    return Err(ApiError::invalid(
                        "parameters must be a JSON schema object",
                        Some(&field(".function.parameters")),
                    ))
                }
            };
            Ok(ToolSpec {
                name: name.to_string(),
                parameters,
            })
        })
        .collect()
}

fn tool_choice(v: Option<&Value>, specs: &[ToolSpec]) -> Result<ToolChoice, ApiError> {
    let field = Some("tool_choice");
    let choice = match v {
        None if specs.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "tool_choice must be none, auto, required or a function, got {other:?}"
                    ),
                    field,
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}",
                        field,
                    )
                })?;
            if !specs.iter().any(|s| s.name == name) {
                return Err(ApiError::invalid(
                    format!("tool_choice names {name:?}, which is not among the request's tools"),
                    field,
                ));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice must be a string or an object",
                field,
            ))
        }
    };
    if specs.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Auto) && v.is_some()
    {
        return Err(ApiError::invalid(
            "tool_choice needs tools; the request has none",
            field,
        ));
    }
    Ok(choice)
}

/// A request's grammar on its way to the tokenizer pool: its cache key (made once), and the
/// bytes of work it adds to the request's preprocessing: none once it is cached, else enough
/// that it runs on the pool, never on the connection's task (building the token trie for the
/// first grammar takes a second on a 150k vocabulary).
pub fn grammar_job(st: &AppState, requested: Option<&Requested>) -> (Option<String>, usize) {
    let Some(r) = requested else {
        return (None, 0);
    };
    let (key, compiled) = st.grammars.key_if_compiled(&r.spec);
    let work = match compiled {
        true => 0,
        false => super::preprocess::INLINE_BYTES + r.spec.source_len(),
    };
    (Some(key), work)
}

/// The compiled grammar a request asked for, or the 400 that names its field.
pub fn compiled_or_400<T>(
    compiled: Option<Result<T, GrammarError>>,
    field: Option<&str>,
) -> Result<Option<T>, ApiError> {
    match (compiled, field) {
        (Some(Err(e)), Some(field)) => Err(ApiError::invalid(
            format!("{field} cannot be used: {e}"),
            Some(field),
        )),
        (Some(Ok(c)), _) => Ok(Some(c)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn other(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn param(e: ApiError) -> String {
        e.param.unwrap_or_default()
    }

    #[test]
    fn each_field_reads_into_its_grammar() {
        let r = output_grammar(&other(json!({"response_format": {"type": "json_object"}})))
            .unwrap()
            .unwrap();
        assert_eq!(r.kind, Kind::JsonObject);
        let r = output_grammar(&other(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "integer"}, "strict": true}}})))
        .unwrap()
        .unwrap();
        assert_eq!(r.spec, GrammarSpec::JsonSchema(json!({"type": "integer"})));
        let r = output_grammar(&other(json!({"guided_json": "{\"type\": \"string\"}"})))
            .unwrap()
            .unwrap();
        assert_eq!(r.spec, GrammarSpec::JsonSchema(json!({"type": "string"})));
        let r = output_grammar(&other(
            json!({"structured_outputs": {"choice": ["a", "b"]}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(r.spec, GrammarSpec::Choice(vec!["a".into(), "b".into()]));
        let r = output_grammar(&other(json!({"guided_regex": "[a-z]+"})))
            .unwrap()
            .unwrap();
        assert_eq!(r.kind, Kind::Regex);
        assert!(
            output_grammar(&other(json!({"response_format": {"type": "text"}})))
                .unwrap()
                .is_none()
        );
        assert!(
            output_grammar(&other(json!({"guided_decoding_backend": "guidance"})))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_shapes_are_400s_naming_the_field() {
        for (v, field) in [
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_regex": 3}), "guided_regex"),
            (
                json!({"structured_outputs": {"structural_tag": "x"}}),
                "structured_outputs.structural_tag",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
                "structured_outputs.choice",
            ),
            (
                json!({"guided_regex": "a", "guided_choice": ["b"]}),
                "guided_choice",
            ),
            (
                json!({"guided_decoding_backend": "outlines"}),
                "guided_decoding_backend",
            ),
        ] {
            let e = output_grammar(&other(v.clone())).unwrap_err();
            assert_eq!(param(e), field, "{v}");
        }
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        let tools = [
            json!({"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}),
        ];
        let f = Some(ToolFormat::Hermes);
        let e = tool_plan(
            Some(&tools),
            &other(json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}})),
            f,
            &|_| false,
        )
        .unwrap_err();
        assert_eq!(param(e), "tool_choice");
        let e = tool_plan(None, &other(json!({"tool_choice": "required"})), f, &|_| {
            false
        })
        .unwrap_err();
        assert_eq!(param(e), "tool_choice");
        let e = tool_plan(
            Some(&[json!({"type": "retrieval"})]),
            &other(json!({})),
            f,
            &|_| false,
        )
        .unwrap_err();
        assert_eq!(param(e), "tools[0].type");
        let e = tool_plan(
            Some(&tools),
            &other(json!({"tool_choice": "auto"})),
            None,
            &|_| false,
        )
        .unwrap_err();
        assert_eq!(param(e), "tool_choice");
        assert!(tool_plan(
            Some(&tools),
            &other(json!({"tool_choice": "none"})),
            None,
            &|_| false
        )
        .unwrap()
        .is_none());
        let plan = tool_plan(Some(&tools), &other(json!({})), f, &|_| false)
            .unwrap()
            .unwrap();
        assert!(plan.grammar.is_none(), "auto: the model chooses");
        let plan = tool_plan(
            Some(&tools),
            &other(json!({"tool_choice": "required"})),
            f,
            &|_| false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.grammar.map(|g| g.kind), Some(Kind::ToolCall));
    }
}
