use super::*;
use proptest::prelude::*;

const DS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_END: &str = "<｜tool▁calls▁end｜>";

fn ds_call(name: &str, args: &str) -> String {
    format!("<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>")
}

fn hermes_call(name: &str, args: &str) -> String {
    format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>")
}

fn call(name: &str, arguments: &str) -> ParsedCall {
    ParsedCall {
        name: name.to_string(),
        arguments: arguments.to_string(),
    }
}

fn content(text: &str) -> Parsed {
    Parsed {
        content: Some(text.to_string()),
        calls: vec![],
    }
}

#[test]
fn names_round_trip() {
    for name in ToolFormat::NAMES {
        let format = ToolFormat::parse_name(name).unwrap();
        assert_eq!(format.name(), name);
    }
    assert_eq!(ToolFormat::parse_name("auto"), None);
}

#[test]
fn detect_finds_each_family() {
    let deepseek =
        "{%- for tool in message['tool_calls'] %}{{'<｜Assistant｜><｜tool▁calls▁begin｜>\
        <｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] }}";
    assert_eq!(ToolFormat::detect(deepseek), Some(ToolFormat::Deepseek));
    let only_call_marker = "{{'<｜tool▁call▁begin｜>' + tool['type'] }}";
    assert_eq!(
        ToolFormat::detect(only_call_marker),
        Some(ToolFormat::Deepseek)
    );

    let qwen =
        "{%- if tools %}{{- '<|im_start|>system\\n' }}For each function call, return a json \
        object with function name and arguments within <tool_call></tool_call> XML tags:\\n\
        <tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>\
        {%- endif %}";
    assert_eq!(ToolFormat::detect(qwen), Some(ToolFormat::Hermes));

    let llama31 = "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools %}\
        {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of \
        argument name and its value}.' }}{%- endif %}{%- if message.role == \"ipython\" %}";
    assert_eq!(ToolFormat::detect(llama31), Some(ToolFormat::Llama3Json));
    let llama_builtin = "{{- '<|python_tag|>' + tool_call.name + '.call(' }}";
    assert_eq!(
        ToolFormat::detect(llama_builtin),
        Some(ToolFormat::Llama3Json)
    );

    let chatml = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + \
        '<|im_end|>\\n'}}{% endfor %}";
    assert_eq!(ToolFormat::detect(chatml), None);
    let llama3_plain = "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}";
    assert_eq!(ToolFormat::detect(llama3_plain), None);
}

#[test]
fn detect_reads_the_fixture_template() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/models/tiny-r1-distill-qwen2/tokenizer_config.json"
    );
    let Ok(config) = std::fs::read_to_string(path) else {
        eprintln!("SKIPPING: ../shared/models absent");
        return;
    };
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let template = config["chat_template"].as_str().unwrap();
    assert_eq!(ToolFormat::detect(template), Some(ToolFormat::Deepseek));
}

#[test]
fn hermes_parse() {
    let f = ToolFormat::Hermes;
    let text = format!(
        "Let me check.\n{}\n{}\n",
        hermes_call("get_weather", "{\"city\": \"Paris\",\n \"days\": [1, 2]}"),
        hermes_call("get_time", "{}"),
    );
    assert_eq!(
        f.parse(&text),
        Parsed {
            content: Some("Let me check.".to_string()),
            calls: vec![
                call("get_weather", r#"{"city":"Paris","days":[1,2]}"#),
                call("get_time", "{}"),
            ],
        }
    );
    // Nothing but calls and whitespace: no content.
    let only = format!("\n{}\n\n", hermes_call("f", "{\"b\": 1, \"a\": 2}"));
    assert_eq!(
        f.parse(&only),
        Parsed {
            content: None,
            // Key order is the model's (serde_json's preserve_order, which llguidance turns on).
            calls: vec![call("f", r#"{"b":1,"a":2}"#)],
        }
    );
    // Text between and after calls is content.
    let around = format!(
        "A {} B {} C",
        hermes_call("f", "{}"),
        hermes_call("g", "{}")
    );
    let parsed = f.parse(&around);
    assert_eq!(parsed.content.as_deref(), Some("A B C"));
    assert_eq!(parsed.calls.len(), 2);
}

#[test]
fn hermes_malformed_stays_content() {
    let f = ToolFormat::Hermes;
    for text in [
        "<tool_call>\nnot json\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
        "<tool_call>\n{\"name\": 3, \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": [1]}\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}",
        "Hello <tool_ world <tool_cal",
        "plain answer\n",
    ] {
        assert_eq!(f.parse(text), content(text), "{text:?}");
    }
    // A malformed block beside a good one: only the good one is a call.
    let text = format!(
        "<tool_call>oops</tool_call>{}",
        hermes_call("f", "{\"x\": null}")
    );
    assert_eq!(
        f.parse(&text),
        Parsed {
            content: Some("<tool_call>oops</tool_call>".to_string()),
            calls: vec![call("f", r#"{"x":null}"#)],
        }
    );
    assert_eq!(f.parse(" \n "), Parsed::default());
}

#[test]
fn deepseek_parse() {
    let f = ToolFormat::Deepseek;
    let text = format!(
        "I'll call two tools.{DS_BEGIN}{}\n{}{DS_END}",
        ds_call("get_weather", "{\"city\": \"Paris\"}"),
        ds_call("get_time", "{\n  \"tz\": \"CET\"\n}"),
    );
    assert_eq!(
        f.parse(&text),
        Parsed {
            content: Some("I'll call two tools.".to_string()),
            calls: vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("get_time", r#"{"tz":"CET"}"#),
            ],
        }
    );
    // The output may end right after a complete call.
    let open = format!("{DS_BEGIN}{}", ds_call("f", "{}"));
    assert_eq!(
        f.parse(&open),
        Parsed {
            content: None,
            calls: vec![call("f", "{}")],
        }
    );
    // Text after the section is content.
    let after = format!("{DS_BEGIN}{}{DS_END}\nDone.", ds_call("f", "{}"));
    assert_eq!(f.parse(&after).content.as_deref(), Some("\nDone."));
}

#[test]
fn deepseek_malformed_stays_content() {
    let f = ToolFormat::Deepseek;
    for text in [
        format!("{DS_BEGIN}{}{DS_END}", ds_call("f", "{not json")),
        format!("{DS_BEGIN}{}", ds_call("f", "[1, 2]")),
        format!("{DS_BEGIN}<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{{}}"),
        format!("{DS_BEGIN}garbage"),
        format!("{DS_BEGIN}{DS_END}"),
        "text <｜tool▁calls▁beg".to_string(),
        format!("{} without section", ds_call("f", "{}")),
    ] {
        assert_eq!(f.parse(&text), content(&text), "{text:?}");
    }
    // Calls, then the section stops without its end marker: the rest is content.
    let text = format!("{DS_BEGIN}{}\nthen text", ds_call("f", "{}"));
    assert_eq!(
        f.parse(&text),
        Parsed {
            content: Some("\nthen text".to_string()),
            calls: vec![call("f", "{}")],
        }
    );
}

#[test]
fn llama3_json_parse() {
    let f = ToolFormat::Llama3Json;
    assert_eq!(
        f.parse("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"),
        Parsed {
            content: None,
            calls: vec![call("get_weather", r#"{"city":"Paris"}"#)],
        }
    );
    assert_eq!(
        f.parse(
            " <|python_tag|>{\"name\": \"f\", \"arguments\": {\"a\": 1}}; \
             {\"name\": \"g\", \"parameters\": {}}\n"
        ),
        Parsed {
            content: None,
            calls: vec![call("f", r#"{"a":1}"#), call("g", "{}")],
        }
    );
    for text in [
        "Sure: {\"name\": \"f\", \"parameters\": {}}",
        "{\"name\": \"f\", \"parameters\": {}} and more",
        "{\"name\": \"f\", \"parameters\": {}};",
        "{\"name\": \"f\"",
        "{\"name\": \"f\", \"parameters\": \"x\"}",
        "<|python_tag|>",
        "  <|python_t",
        "It is sunny.\n",
    ] {
        assert_eq!(f.parse(text), content(text), "{text:?}");
    }
    assert_eq!(f.parse("\n "), Parsed::default());
}

fn outputs(format: ToolFormat) -> Vec<String> {
    let common = [
        "Just an answer, no tools.\n".to_string(),
        "  héllo 🌍 wörld  ".to_string(),
        String::new(),
        " \n\t".to_string(),
    ];
    let specific = match format {
        ToolFormat::Hermes => vec![
            format!(
                "Let me check.\n{}\n{}",
                hermes_call("get_weather", "{\"city\": \"Paris\"}"),
                hermes_call("get_time", "{\"tz\": \"CET\"}")
            ),
            "<tool_call>\nnot json\n</tool_call> then text".to_string(),
            "a <tool_ b <tool_cal".to_string(),
            "<tool_call>{\"name\": \"x\", \"arguments\": {}}".to_string(),
            format!(
                "  \n{}\n\n",
                hermes_call("é", "{\"a\": [1, 2], \"s\": \"</tool\"}")
            ),
            format!("x{}y{}z", hermes_call("f", "{}"), hermes_call("g", "{}")),
        ],
        ToolFormat::Deepseek => vec![
            format!(
                "Thinking done.{DS_BEGIN}{}\n{}{DS_END}",
                ds_call("get_weather", "{\"city\": \"Paris\"}"),
                ds_call("get_time", "{}")
            ),
            format!("{DS_BEGIN}{}", ds_call("f", "{\"a\": 1}")),
            format!("{DS_BEGIN}{}{DS_END}", ds_call("f", "{oops")),
            format!("{DS_BEGIN} \n garbage <｜tool▁call"),
            "text <｜tool▁calls▁beg".to_string(),
            format!("{DS_BEGIN}{}\nthen {DS_END} text", ds_call("f", "{}")),
            format!("{DS_BEGIN}<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{{"),
        ],
        ToolFormat::Llama3Json => vec![
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}".to_string(),
            "<|python_tag|>{\"name\": \"f\", \"arguments\": {}}; {\"name\": \"g\", \"parameters\": {\"x\": [1]}}"
                .to_string(),
            "  {\"name\": \"f\", \"parameters\": {}} trailing".to_string(),
            "  <|python_ta".to_string(),
            "<|python_tag|>".to_string(),
            "{ not json".to_string(),
        ],
    };
    common.into_iter().chain(specific).collect()
}

/// Fragments that random outputs are made of: markers, their beginnings, JSON, text.
fn fragments(format: ToolFormat) -> Vec<&'static str> {
    let mut pieces = vec![" ", "\n", "x", "é🌍", "{}", "{\"a\": 1}", ";", "\"", "}"];
    pieces.extend(match format {
        ToolFormat::Hermes => vec![
            "<tool_call>",
            "</tool_call>",
            "<tool_",
            "</tool_ca",
            "{\"name\": \"f\", \"arguments\": {\"k\": [1, 2]}}",
            "\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>",
        ],
        ToolFormat::Deepseek => vec![
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁sep｜>",
            "<｜tool▁ca",
            "function<｜tool▁sep｜>f\n```json\n",
            "\n```",
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{\"b\": true}\n```<｜tool▁call▁end｜>",
        ],
        ToolFormat::Llama3Json => vec![
            "<|python_tag|>",
            "<|pyth",
            "{\"name\": \"f\", \"parameters\": {\"k\": 1}}",
            "; ",
            "{\"name\": \"g\", \"arguments\": {}}",
        ],
    });
    pieces
}

/// Feeds `text` in pieces cut at `cuts` (mapped onto char boundaries) and checks the deltas
/// against `parse`.
fn check_stream(format: ToolFormat, text: &str, cuts: &[usize]) -> Result<(), TestCaseError> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            let mut c = c % (text.len() + 1);
            while !text.is_char_boundary(c) {
                c -= 1;
            }
            c
        })
        .collect();
    at.sort_unstable();
    at.dedup();
    let mut stream = format.streamer();
    let mut deltas = Vec::new();
    let mut from = 0;
    for cut in at.into_iter().chain([text.len()]) {
        deltas.extend(stream.push(&text[from..cut]));
        from = cut;
    }
    deltas.extend(stream.finish());
    prop_assert!(stream.push("more").is_empty() && stream.finish().is_empty());

    let mut next_index = 0;
    for delta in &deltas {
        match delta {
            ToolDelta::Content(c) => prop_assert!(!c.is_empty()),
            ToolDelta::CallStart { index, .. } => {
                prop_assert_eq!(*index, next_index);
                next_index += 1;
            }
            ToolDelta::Arguments { index, .. } => prop_assert!(*index < next_index),
        }
    }
    let streamed = Parsed::from_deltas(deltas);
    let whole = format.parse(text);
    prop_assert_eq!(
        streamed.content.unwrap_or_default(),
        whole.content.clone().unwrap_or_default(),
        "{:?}",
        text
    );
    prop_assert_eq!(&streamed.calls, &whole.calls, "{:?}", text);
    if let Some(content) = &whole.content {
        prop_assert!(!content.trim().is_empty());
    }
    Ok(())
}

const FORMATS: [ToolFormat; 3] = [
    ToolFormat::Deepseek,
    ToolFormat::Hermes,
    ToolFormat::Llama3Json,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn stream_matches_parse_on_representative_outputs(
        format in prop::sample::select(FORMATS.to_vec()),
        pick in any::<prop::sample::Index>(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let outputs = outputs(format);
        let text = pick.get(&outputs);
        check_stream(format, text, &cuts)?;
    }

    #[test]
    fn stream_matches_parse_on_random_outputs(
        format in prop::sample::select(FORMATS.to_vec()),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let pieces = fragments(format);
        let text: String = picks.iter().map(|p| *p.get(&pieces)).collect();
        check_stream(format, &text, &cuts)?;
    }

    #[test]
    fn stream_matches_parse_on_any_text(
        format in prop::sample::select(FORMATS.to_vec()),
        text in "[<>a-z_{}\":; \n｜▁|]{0,40}",
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        check_stream(format, &text, &cuts)?;
    }
}

#[test]
fn stream_sends_calls_as_they_close_and_holds_marker_prefixes() {
    let mut s = ToolFormat::Hermes.streamer();
    assert_eq!(
        s.push("Hi <tool"),
        vec![ToolDelta::Content("Hi".to_string())]
    );
    assert_eq!(s.push("_call>\n{\"name\": \"f\", "), vec![]);
    assert_eq!(
        s.push("\"arguments\": {}}\n</tool_call>"),
        vec![
            ToolDelta::CallStart {
                index: 0,
                name: "f".to_string()
            },
            ToolDelta::Arguments {
                index: 0,
                fragment: "{}".to_string()
            },
        ]
    );
    assert_eq!(s.push("\n"), vec![]);
    assert_eq!(s.finish(), vec![]);

    // A held prefix that never completes is content in the end.
    let mut s = ToolFormat::Deepseek.streamer();
    assert_eq!(
        s.push("ok <｜tool▁"),
        vec![ToolDelta::Content("ok".to_string())]
    );
    assert_eq!(
        s.finish(),
        vec![ToolDelta::Content(" <｜tool▁".to_string())]
    );
}
