//! The grammar of each format's calls, as Lark text in llguidance's dialect: markers and names
//! as literals (or token references), each tool's arguments as an inline `%json` schema.

use super::{deepseek, hermes, ToolFormat, ToolSpec};
use serde_json::{json, Map, Value};

pub(super) fn call_grammar(
    format: ToolFormat,
    tools: &[ToolSpec],
    parallel: bool,
    marker_is_token: &dyn Fn(&str) -> bool,
) -> Result<String, String> {
    if tools.is_empty() {
        return Err("no tools to call".to_string());
    }
    let marker = |m: &str| {
        if marker_is_token(m) {
            m.to_string()
        } else {
            literal(m)
        }
    };
    // Calls are joined as the models' chat templates join them.
    let calls = match (parallel, format) {
        (false, _) => "call".to_string(),
        (true, ToolFormat::Deepseek | ToolFormat::Hermes) => "call (\"\\n\" call)*".to_string(),
        (true, ToolFormat::Llama3Json) => "call (\"; \" call)*".to_string(),
    };
    let mut g = String::new();
    match format {
        ToolFormat::Deepseek => {
            g.push_str(&format!("start: calls_begin {calls} calls_end\n"));
            g.push_str(&format!("calls_begin: {}\n", marker(deepseek::CALLS_BEGIN)));
            g.push_str(&format!("calls_end: {}\n", marker(deepseek::CALLS_END)));
            g.push_str(&format!("call_begin: {}\n", marker(deepseek::CALL_BEGIN)));
            g.push_str(&format!("call_end: {}\n", marker(deepseek::CALL_END)));
            g.push_str(&format!("tool_sep: {}\n", marker(deepseek::SEP)));
        }
        ToolFormat::Hermes => {
            g.push_str(&format!("start: {calls}\n"));
            g.push_str(&format!("call_open: {}\n", marker(hermes::OPEN)));
            g.push_str(&format!("call_close: {}\n", marker(hermes::CLOSE)));
        }
        ToolFormat::Llama3Json => g.push_str(&format!("start: {calls}\n")),
    }
    let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("call_{i}")).collect();
    g.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    for (i, tool) in tools.iter().enumerate() {
        let call = match format {
            ToolFormat::Deepseek => format!(
                "call_begin \"function\" tool_sep {} args_{i} {} call_end",
                literal(&format!("{}\n```json\n", tool.name)),
                literal("\n```"),
            ),
            ToolFormat::Hermes => format!(
                "call_open {} args_{i} {} call_close",
                literal(&format!(
                    "\n{{\"name\": {}, \"arguments\": ",
                    json_string(&tool.name)
                )),
                literal("}\n"),
            ),
            ToolFormat::Llama3Json => format!(
                "{} args_{i} \"}}\"",
                literal(&format!(
                    "{{\"name\": {}, \"parameters\": ",
                    json_string(&tool.name)
                )),
            ),
        };
        g.push_str(&format!("call_{i}: {call}\n"));
        g.push_str(&format!("args_{i}: %json {}\n", arguments_schema(tool)?));
    }
    Ok(g)
}

/// The tool's schema for its arguments, as the `%json` body: an object (what every format's
/// parser requires), laid out with one space after `,` and `:` and nowhere else (Python's
/// `json.dumps`, what these models saw in training), so whitespace can't drift.
fn arguments_schema(tool: &ToolSpec) -> Result<String, String> {
    let mut schema = match &tool.parameters {
        Value::Object(schema) => schema.clone(),
        Value::Bool(true) => Map::new(),
        other => {
            return Err(format!(
                "tool {:?}: parameters must be a JSON schema object, not {other}",
                tool.name
            ))
        }
    };
    match schema.get("type") {
        None => {
            schema.insert("type".to_string(), json!("object"));
        }
        Some(Value::String(t)) if t == "object" => {}
        Some(other) => {
            return Err(format!(
                "tool {:?}: parameters must describe an object, not \"type\": {other}",
                tool.name
            ))
        }
    }
    // Ours to set, whatever the request carried: it decides the layout, not what is valid.
    schema.insert(
        "x-guidance".to_string(),
        json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        }),
    );
    serde_json::to_string(&Value::Object(schema))
        .map_err(|e| format!("tool {:?}: parameters: {e}", tool.name))
}

/// `text` as a Lark string literal: JSON string syntax, but the Lark lexer also refuses a raw
/// DEL, which JSON allows.
pub(super) fn literal(text: &str) -> String {
    json_string(text).replace('\u{7f}', "\\u007f")
}

/// `text` as a JSON string, escaped as serde_json (and Python's `json.dumps` with
/// `ensure_ascii=False`, as chat templates' `tojson`) writes it.
pub(super) fn json_string(text: &str) -> String {
    Value::from(text).to_string()
}
