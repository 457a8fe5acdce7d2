//! Scenarios: the TOML files under `loadtest/scenarios/` that say what to send (endpoint,
//! streaming, max_tokens, temperature, where prompts come from), and their turning into a
//! `Workload` of request bodies serialised once, before the clock starts, so that sending a
//! request costs a reference-count increment rather than JSON encoding.

use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Which OpenAI endpoint a scenario drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub endpoint: Endpoint,
    #[serde(default)]
    pub stream: bool,
    /// Output tokens per request; a `random` prompt source draws its own per prompt instead.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default)]
    pub temperature: f64,
    /// vLLM's extension that keeps generating past end-of-sequence, so output length holds.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Further body fields sent verbatim (e.g. `top_p`), for servers' own extensions.
    #[serde(default)]
    pub extra_body: Map<String, Value>,
    pub prompts: PromptSource,
}

fn default_max_tokens() -> u32 {
    16
}

/// The body fields that constrain what a server may generate (structured outputs and tool
/// calls, in OpenAI's and vLLM's spellings): `--unconstrained` drops them from `extra_body`, so
/// a constrained scenario's paired baseline differs from it by the constraint alone.
pub const CONSTRAINT_FIELDS: &[&str] = &[
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "tools",
    "tool_choice",
];

/// Where prompts come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PromptSource {
    /// A fixed pool of texts (user questions for chat, prompts for completions), optionally
    /// behind a shared system prompt (chat: a system message; completions: prepended text).
    Pool {
        #[serde(default)]
        system: Option<String>,
        prompts: Vec<String>,
    },
    /// Prompts of random length, as vllm bench's random data set: `num_prompts` prompts whose
    /// input length and max_tokens are drawn uniformly from the inclusive ranges.
    Random {
        input_len: [u32; 2],
        output_len: [u32; 2],
        #[serde(default = "default_num_prompts")]
        num_prompts: usize,
        #[serde(default)]
        format: RandomFormat,
        /// Token ids drawn from this inclusive range (`token-ids` format); keep it inside the
        /// smallest vocabulary served.
        #[serde(default = "default_token_id_range")]
        token_id_range: [u32; 2],
    },
}

fn default_num_prompts() -> usize {
    256
}

fn default_token_id_range() -> [u32; 2] {
    [10, 500]
}

/// How a random prompt is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RandomFormat {
    /// A list of token ids (completions only): the input length is exact.
    #[default]
    TokenIds,
    /// Random common English words, about one token each on the usual tokenizers.
    Words,
}

/// Request bodies ready to send, and the order to send them in.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    // Private, with `order`: only `Scenario::prepare` builds them, never empty, so `request`
    // cannot index out of range.
    bodies: Vec<Bytes>,
    /// The prompt index of the i-th request is `order[i % order.len()]`: a seeded shuffle, so a
    /// run is reproducible and consecutive requests do not walk the pool in file order.
    order: Vec<u32>,
    /// The largest max_tokens of any body, to size per-request buffers.
    pub max_output_tokens: u32,
}

impl Workload {
    /// The prompt index and body of the `i`-th request.
    pub fn request(&self, i: u64) -> (u32, &Bytes) {
        // `order` is a permutation of the body indices and never empty (`Scenario::prepare`
        // rejects an empty pool), so neither index can be out of range.
        let idx = self.order[(i % self.order.len() as u64) as usize];
        (idx, &self.bodies[idx as usize])
    }

    /// Distinct request bodies.
    pub fn len(&self) -> usize {
        self.bodies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bodies.is_empty()
    }

    /// The serialised bodies, in prompt order.
    pub fn bodies(&self) -> &[Bytes] {
        &self.bodies
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in scenario {}", path.display()))
    }

    /// The same scenario without the [`CONSTRAINT_FIELDS`] in its `extra_body`; every other
    /// field is kept as it is.
    pub fn unconstrained(mut self) -> Scenario {
        self.extra_body
            .retain(|k, _| !CONSTRAINT_FIELDS.contains(&k.as_str()));
        self
    }

    pub fn parse(text: &str) -> Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("temperature must be a finite number >= 0");
        }
        match &self.prompts {
            PromptSource::Pool { prompts, .. } if prompts.is_empty() => {
                bail!("prompts: the pool is empty")
            }
            PromptSource::Pool { .. } => {}
            PromptSource::Random {
                input_len,
                output_len,
                num_prompts,
                format,
                token_id_range,
            } => {
                for (what, r) in [("input_len", input_len), ("output_len", output_len)] {
                    if r[0] == 0 || r[0] > r[1] {
                        bail!("{what} must be [lo, hi] with 1 <= lo <= hi, got {r:?}");
                    }
                }
                if *num_prompts == 0 {
                    bail!("num_prompts must be at least 1");
                }
                if token_id_range[0] > token_id_range[1] {
                    bail!("token_id_range must be [lo, hi] with lo <= hi");
                }
                if *format == RandomFormat::TokenIds && self.endpoint == Endpoint::Chat {
                    bail!("format = \"token-ids\" needs endpoint = \"completions\" (chat messages are text)");
                }
            }
        }
        Ok(())
    }

    /// Serialises every request body for `model`. `stream` overrides the scenario's setting when
    /// given; `seed` fixes random prompts and the send order.
    pub fn prepare(&self, model: &str, stream: Option<bool>, seed: u64) -> Result<Workload> {
        // Again here: a `Scenario` can be built in code without `parse`.
        self.validate()?;
        let stream = stream.unwrap_or(self.stream);
        let mut rng = StdRng::seed_from_u64(seed);
        // (prompt value, max_tokens) per distinct request.
        let prompts: Vec<(Value, u32)> = match &self.prompts {
            PromptSource::Pool { system, prompts } => prompts
                .iter()
                .map(|p| (self.prompt_value(system.as_deref(), p), self.max_tokens))
                .collect(),
            PromptSource::Random {
                input_len,
                output_len,
                num_prompts,
                format,
                token_id_range,
            } => (0..*num_prompts)
                .map(|_| {
                    let n = rng.random_range(input_len[0]..=input_len[1]);
                    let out = rng.random_range(output_len[0]..=output_len[1]);
                    let prompt = match format {
                        RandomFormat::TokenIds => Value::from(
                            (0..n)
                                .map(|_| rng.random_range(token_id_range[0]..=token_id_range[1]))
                                .collect::<Vec<u32>>(),
                        ),
                        RandomFormat::Words => {
                            let text = random_words(&mut rng, n as usize);
                            self.prompt_value(None, &text)
                        }
                    };
                    (prompt, out)
                })
                .collect(),
        };
        let mut bodies = Vec::with_capacity(prompts.len());
        let mut max_output_tokens = 1;
        for (prompt, max_tokens) in prompts {
            max_output_tokens = max_output_tokens.max(max_tokens);
            let mut body = Map::new();
            body.insert("model".into(), json!(model));
            match self.endpoint {
                Endpoint::Chat => body.insert("messages".into(), prompt),
                Endpoint::Completions => body.insert("prompt".into(), prompt),
            };
            body.insert("max_tokens".into(), json!(max_tokens));
            body.insert("temperature".into(), json!(self.temperature));
            if self.ignore_eos {
                body.insert("ignore_eos".into(), json!(true));
            }
            body.insert("stream".into(), json!(stream));
            if stream {
                // Token counts come from `usage`, which a stream carries only when asked.
                body.insert("stream_options".into(), json!({"include_usage": true}));
            }
            for (k, v) in &self.extra_body {
                body.insert(k.clone(), v.clone());
            }
            bodies.push(Bytes::from(serde_json::to_vec(&Value::Object(body))?));
        }
        let mut order: Vec<u32> = (0..bodies.len() as u32).collect();
        order.shuffle(&mut rng);
        Ok(Workload {
            name: self.name.clone(),
            endpoint: self.endpoint,
            stream,
            bodies,
            order,
            max_output_tokens,
        })
    }

    /// The `messages` (chat) or `prompt` (completions) value for one text.
    fn prompt_value(&self, system: Option<&str>, text: &str) -> Value {
        match (self.endpoint, system) {
            (Endpoint::Chat, Some(sys)) => json!([
                {"role": "system", "content": sys},
                {"role": "user", "content": text},
            ]),
            (Endpoint::Chat, None) => json!([{"role": "user", "content": text}]),
            (Endpoint::Completions, Some(sys)) => json!(format!("{sys}\n\n{text}")),
            (Endpoint::Completions, None) => json!(text),
        }
    }
}

/// `n` words drawn from a fixed list of common English words.
fn random_words(rng: &mut StdRng, n: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "order",
        "delivery",
        "package",
        "store",
        "price",
        "return",
        "refund",
        "size",
        "color",
        "shipping",
        "account",
        "card",
        "payment",
        "week",
        "day",
        "time",
        "help",
        "want",
        "need",
        "please",
        "thanks",
        "could",
        "would",
        "about",
        "when",
        "where",
        "how",
        "what",
        "item",
        "box",
        "address",
        "city",
        "phone",
        "email",
        "number",
        "code",
        "discount",
        "sale",
        "gift",
        "shoe",
        "shirt",
        "coat",
        "bag",
        "watch",
        "lamp",
        "table",
        "chair",
        "book",
        "cup",
        "blue",
        "red",
        "green",
        "small",
        "large",
        "new",
        "old",
        "fast",
        "slow",
        "late",
        "early",
        "today",
        "tomorrow",
        "yesterday",
        "morning",
        "evening",
        "open",
        "close",
        "send",
        "find",
        "check",
        "change",
        "cancel",
        "track",
        "arrive",
        "leave",
        "buy",
        "sell",
        "pay",
        "keep",
    ];
    let mut out = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_parse_and_prepare() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let s = Scenario::load(&path).unwrap();
            let w = s.prepare("m", None, 1).unwrap();
            assert!(!w.bodies.is_empty());
            for b in &w.bodies {
                let v: Value = serde_json::from_slice(b).unwrap();
                assert_eq!(v["model"], "m");
                assert_eq!(v["stream"], s.stream);
            }
            seen += 1;
        }
        assert!(
            seen >= 3,
            "expected the three shipped scenarios in {}",
            dir.display()
        );
    }

    #[test]
    fn customer_service_has_a_large_varied_pool() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/customer-service.toml");
        let s = Scenario::load(&path).unwrap();
        assert_eq!(s.endpoint, Endpoint::Chat);
        assert_eq!(s.max_tokens, 16);
        let PromptSource::Pool { system, prompts } = &s.prompts else {
            panic!("customer-service uses a pool");
        };
        let words = system.as_deref().unwrap().split_whitespace().count();
        assert!(
            (25..=45).contains(&words),
            "system prompt of {words} words (~40 tokens)"
        );
        let distinct: std::collections::HashSet<_> = prompts.iter().collect();
        assert!(
            distinct.len() >= 50,
            "{} distinct questions",
            distinct.len()
        );
    }

    #[test]
    fn streaming_bodies_ask_for_usage() {
        let s = Scenario::parse(
            r#"
            name = "t"
            endpoint = "chat"
            [prompts]
            source = "pool"
            system = "be brief"
            prompts = ["hi"]
            "#,
        )
        .unwrap();
        let w = s.prepare("m", Some(true), 0).unwrap();
        let v: Value = serde_json::from_slice(&w.bodies[0]).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["role"], "system");
        assert_eq!(v["messages"][1]["content"], "hi");
        let w = s.prepare("m", None, 0).unwrap();
        let v: Value = serde_json::from_slice(&w.bodies[0]).unwrap();
        assert_eq!(v["stream"], false);
        assert!(v.get("stream_options").is_none());
    }

    #[test]
    fn random_prompts_respect_ranges_and_seed() {
        let s = Scenario::parse(
            r#"
            name = "r"
            endpoint = "completions"
            ignore_eos = true
            [prompts]
            source = "random"
            input_len = [5, 9]
            output_len = [2, 4]
            num_prompts = 50
            token_id_range = [100, 120]
            "#,
        )
        .unwrap();
        let a = s.prepare("m", None, 7).unwrap();
        let b = s.prepare("m", None, 7).unwrap();
        assert_eq!(a.bodies, b.bodies);
        assert_eq!(a.order, b.order);
        for body in &a.bodies {
            let v: Value = serde_json::from_slice(body).unwrap();
            let ids = v["prompt"].as_array().unwrap();
            assert!((5..=9).contains(&ids.len()));
            assert!(ids
                .iter()
                .all(|t| (100..=120).contains(&t.as_u64().unwrap())));
            assert!((2..=4).contains(&v["max_tokens"].as_u64().unwrap()));
            assert_eq!(v["ignore_eos"], true);
        }
    }

    #[test]
    fn unconstrained_drops_exactly_the_constraint_fields() {
        let s = Scenario::parse(
            r#"
            name = "c"
            endpoint = "chat"
            max_tokens = 7
            ignore_eos = true
            [extra_body]
            top_p = 0.9
            seed = 3
            parallel_tool_calls = false
            guided_decoding_backend = "auto"
            guided_json = { type = "object" }
            guided_regex = "[a-z]+"
            guided_choice = ["yes", "no"]
            guided_grammar = "start: \"x\""
            tool_choice = "auto"
            tools = [{ type = "function", function = { name = "f" } }]
            [extra_body.structured_outputs]
            regex = "[0-9]+"
            [extra_body.response_format]
            type = "json_schema"
            json_schema = { name = "n", schema = { type = "object" } }
            [prompts]
            source = "pool"
            system = "be brief"
            prompts = ["hi", "where is my order?"]
            "#,
        )
        .unwrap();
        let constrained = s.prepare("m", None, 5).unwrap();
        let plain = s.clone().unconstrained().prepare("m", None, 5).unwrap();
        assert_eq!(constrained.order, plain.order);
        assert_eq!(constrained.bodies.len(), plain.bodies.len());
        for (c, p) in constrained.bodies.iter().zip(&plain.bodies) {
            let Value::Object(mut c) = serde_json::from_slice(c).unwrap() else {
                panic!("a body is an object");
            };
            let Value::Object(p) = serde_json::from_slice(p).unwrap() else {
                panic!("a body is an object");
            };
            for field in CONSTRAINT_FIELDS {
                assert!(c.contains_key(*field), "{field} was sent");
                assert!(!p.contains_key(*field), "{field} is dropped");
                c.remove(*field);
            }
            // Everything else is untouched: prompt, sampling, ignore_eos, other extras.
            assert_eq!(c, p);
            assert_eq!(p["top_p"], 0.9);
            assert_eq!(p["parallel_tool_calls"], false);
            assert_eq!(p["guided_decoding_backend"], "auto");
            assert_eq!(p["ignore_eos"], true);
            assert_eq!(p["max_tokens"], 7);
        }
    }

    #[test]
    fn customer_service_intent_differs_from_its_baseline_by_the_schema_alone() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let intent = Scenario::load(&dir.join("customer-service-intent.toml")).unwrap();
        let plain = Scenario::load(&dir.join("customer-service.toml")).unwrap();
        let (
            PromptSource::Pool {
                system: a,
                prompts: pa,
            },
            PromptSource::Pool {
                system: b,
                prompts: pb,
            },
        ) = (&intent.prompts, &plain.prompts)
        else {
            panic!("both use a pool");
        };
        assert_eq!((a, pa), (b, pb), "the customer-service prompts");
        assert_eq!(intent.endpoint, Endpoint::Chat);
        let w = intent.prepare("m", None, 0).unwrap();
        let v: Value = serde_json::from_slice(&w.bodies[0]).unwrap();
        let schema = &v["response_format"]["json_schema"]["schema"];
        assert_eq!(v["response_format"]["type"], "json_schema");
        assert_eq!(
            schema["properties"]["intent"]["enum"]
                .as_array()
                .unwrap()
                .len(),
            8
        );
        assert_eq!(schema["properties"]["reply"]["maxLength"], 200);
        assert_eq!(schema["additionalProperties"], false);
        let w = intent.unconstrained().prepare("m", None, 0).unwrap();
        let v: Value = serde_json::from_slice(&w.bodies[0]).unwrap();
        assert!(v.get("response_format").is_none());
        assert_eq!(v["ignore_eos"], true);
    }

    #[test]
    fn bad_scenarios_are_rejected() {
        let token_ids_on_chat = r#"
            name = "x"
            endpoint = "chat"
            [prompts]
            source = "random"
            input_len = [1, 2]
            output_len = [1, 2]
        "#;
        assert!(Scenario::parse(token_ids_on_chat).is_err());
        let unknown_field = r#"
            name = "x"
            endpoint = "chat"
            max_tokenz = 3
            [prompts]
            source = "pool"
            prompts = ["a"]
        "#;
        assert!(Scenario::parse(unknown_field).is_err());
        let empty_pool = r#"
            name = "x"
            endpoint = "completions"
            [prompts]
            source = "pool"
            prompts = []
        "#;
        assert!(Scenario::parse(empty_pool).is_err());
    }
}
