//! Grammar compilation: the llguidance parser factory (built once, on first use, from the
//! served tokenizer) and a bounded cache of compiled grammars, so the same schema at
//! thousands of requests per second compiles once. Compilation is blocking work: callers run
//! it off the engine thread, before admission.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use super::{closed_objects, quoted, GrammarSpec, Kind};
use crate::metrics::GrammarMetrics;
use crate::tokenizer::Tokenizer;

/// The largest grammar source accepted (a schema's JSON text, a regex, a Lark grammar).
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

/// Compiled grammars kept; the least recently used goes first.
const CACHE_ENTRIES: usize = 512;

/// Why a grammar cannot constrain a request: the client's fault, a 400.
#[derive(Clone, Debug, PartialEq)]
pub struct GrammarError(pub String);

impl std::fmt::Display for GrammarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A grammar ready to constrain choices: each choice starts from its own copy of a matcher
/// at the grammar's start.
///
/// llguidance builds its lexer's states lazily and a copy takes them along, so copies of a
/// warm matcher start fast. A lexer can also break for good (its fuel or state limit spent,
/// or a panic inside it) and every matcher sharing it with it: so nothing generates with the
/// compiled matcher itself, and a broken template or shared lexer is rebuilt from it.
pub struct Compiled {
    /// As compiled: only ever copied.
    pristine: Matcher,
    /// Where private copies start. Now and then a finished choice's matcher, rolled back to
    /// the start, takes its place, so the next choices start with the states it built.
    template: Mutex<Matcher>,
    /// The lexer plain greedy choices share (a copy of the template), and how many choices
    /// have shared it; replaced after [`SHARED_USES`] so it cannot grow without bound.
    shared: Mutex<(Matcher, u64)>,
    /// Finished choices offered back so far.
    offers: AtomicU64,
    pub(super) eos_ids: Arc<[u32]>,
    /// The matcher's own end-of-sequence id (any of `eos_ids` stands for it).
    pub(super) eos: u32,
}

/// The first offers replace the template (it warms quickly), then one in this many.
const EARLY_OFFERS: u64 = 32;
const LATER_OFFER_EVERY: u64 = 256;
/// Choices that share one lexer before a fresh copy of the template replaces it.
const SHARED_USES: u64 = 1 << 16;

impl Compiled {
    pub(super) fn new(pristine: Matcher, eos_ids: Arc<[u32]>, eos: u32) -> Self {
        Self {
            template: Mutex::new(pristine.deep_clone()),
            shared: Mutex::new((pristine.deep_clone(), 0)),
            pristine,
            offers: AtomicU64::new(0),
            eos_ids,
            eos,
        }
    }

    /// A matcher at the grammar's start for each of `n` choices: copying one is work for the
    /// caller's thread, not the engine's. `shared`: the copies share one lexer (behind
    /// llguidance's lock) instead of taking a copy each. Sharing costs nothing per request
    /// and warms one lexer for all; it suits choices that ask the grammar about one token at
    /// a time (plain greedy: see `engine::constraint`), not ones whose masks are computed in
    /// parallel, which would wait on each other. The flag beside each matcher says whether
    /// its lexer is its own.
    pub fn starts(&self, n: usize, shared: bool) -> Vec<(Matcher, bool)> {
        if !shared {
            let template = self.template();
            return (0..n).map(|_| (template.deep_clone(), true)).collect();
        }
        let mut s = lock(&self.shared);
        if s.1 >= SHARED_USES || broken(&s.0) {
            *s = (self.template().deep_clone(), 0);
        }
        s.1 += n as u64;
        (0..n).map(|_| (s.0.clone(), false)).collect()
    }

    pub(super) fn start(&self) -> (Matcher, bool) {
        (self.template().deep_clone(), true)
    }

    /// The template, rebuilt from the compiled matcher if its lexer broke.
    fn template(&self) -> std::sync::MutexGuard<'_, Matcher> {
        let mut t = lock(&self.template);
        if broken(&t) {
            *t = self.pristine.deep_clone();
        }
        t
    }

    /// A choice that ended (complete or cut) with a lexer of its own hands its matcher back.
    pub(super) fn offer(&self, mut finished: Matcher) {
        let n = self.offers.fetch_add(1, Ordering::Relaxed);
        if n >= EARLY_OFFERS && !n.is_multiple_of(LATER_OFFER_EVERY) {
            return;
        }
        if finished.reset().is_err() || broken(&finished) {
            return;
        }
        // The masks it cached were for the states it went through, not for the start.
        finished.invalidate_bias_cache();
        // Never wait for the template: a copy being made now is as good.
        if let Ok(mut t) = self.template.try_lock() {
            *t = finished;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // What these locks guard is replaced whole, never left half-changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A matcher in error, or whose lexer is (a lexer error is permanent and shared by every
/// matcher sharing the lexer; a panic inside llguidance poisons its lock, and asking then
/// panics again).
fn broken(m: &Matcher) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.is_error() || m.get_error().is_some()
    }))
    .unwrap_or(true)
}

/// The server's grammar compiler.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    eos_ids: Arc<[u32]>,
    vocab_size: usize,
    factory: OnceLock<Result<ParserFactory, String>>,
    cache: Mutex<Lru>,
    metrics: Option<GrammarMetrics>,
}

impl Grammars {
    /// `eos_ids`: every id that ends a choice (the grammar's end allows them all);
    /// `vocab_size`: the model's logit row.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        eos_ids: &[u32],
        vocab_size: usize,
        metrics: Option<GrammarMetrics>,
    ) -> Self {
        Self {
            tokenizer,
            eos_ids: eos_ids.into(),
            vocab_size,
            factory: OnceLock::new(),
            cache: Mutex::new(Lru::default()),
            metrics,
        }
    }

    pub fn metrics(&self) -> Option<&GrammarMetrics> {
        self.metrics.as_ref()
    }

    /// The compiled grammar for `spec`, from the cache or compiled now (blocking: seconds at
    /// worst for a large schema, milliseconds usually).
    pub fn compile(&self, spec: &GrammarSpec, kind: Kind) -> Result<Arc<Compiled>, GrammarError> {
        self.compile_keyed(spec.key(), spec, kind)
    }

    /// [`Self::compile`] with the cache key already made ([`Self::key_if_compiled`]).
    pub fn compile_keyed(
        &self,
        key: String,
        spec: &GrammarSpec,
        kind: Kind,
    ) -> Result<Arc<Compiled>, GrammarError> {
        let compiled = self.cached_or_built(key, spec);
        if let (Some(m), Ok(_)) = (&self.metrics, &compiled) {
            m.requests.with_label_values(&[kind.as_str()]).inc();
        }
        compiled
    }

    fn cached_or_built(
        &self,
        key: String,
        spec: &GrammarSpec,
    ) -> Result<Arc<Compiled>, GrammarError> {
        if key.len() > MAX_GRAMMAR_BYTES {
            return Err(GrammarError(format!(
                "is {} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
                key.len()
            )));
        }
        // One cell per grammar: requests that miss together wait for one compilation.
        let cell = self.lock().entry(key);
        let mut compiled_here = false;
        let result = cell
            .get_or_init(|| {
                compiled_here = true;
                let start = Instant::now();
                let result = self.build(spec).map(Arc::new);
                if let Some(m) = &self.metrics {
                    m.compile.observe(start.elapsed().as_secs_f64());
                }
                result
            })
            .clone();
        if let (Some(m), Ok(_)) = (&self.metrics, &result) {
            // A request that waited for another's compilation found it done: a hit.
            if compiled_here {
                m.cache_misses.inc();
            } else {
                m.cache_hits.inc();
            }
        }
        result
    }

    /// `spec`'s cache key (made once per request), and whether it is compiled and cached:
    /// if not, asking for it is blocking work.
    pub fn key_if_compiled(&self, spec: &GrammarSpec) -> (String, bool) {
        let key = spec.key();
        let compiled = self.lock().peek(&key);
        (key, compiled)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // The cache holds no invariant a panic could break half-way: use it as it is.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer, &self.eos_ids, self.vocab_size))
            .as_ref()
            .map_err(|e| GrammarError(format!("structured outputs are unavailable: {e}")))
    }

    fn build(&self, spec: &GrammarSpec) -> Result<Compiled, GrammarError> {
        let factory = self.factory()?;
        let grammar = top_level(spec)?;
        // llguidance reports a broken grammar as an error, but a bug in it should still not
        // take the server down: a panic here fails this request alone.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.create_parser(grammar)
        }))
        .map_err(|_| GrammarError("the grammar compiler failed on it".into()))?
        .map_err(|e| GrammarError(first_line(&e.to_string())))?;
        let eos = parser.token_env.tok_trie().eos_token();
        let pristine = Matcher::new(Ok(parser));
        admits_something(&pristine)?;
        Ok(Compiled::new(pristine, self.eos_ids.clone(), eos))
    }
}

/// A grammar that compiles may still admit no output at all (`[^\s\S]`, a rule defined only
/// by itself): its first mask fails. That is the request's fault, so it is found here, once
/// per grammar, rather than as a failure in the engine.
fn admits_something(template: &Matcher) -> Result<(), GrammarError> {
    if let Some(e) = template.get_error() {
        return Err(GrammarError(first_line(&e)));
    }
    let mut probe = template.deep_clone();
    let unusable = || GrammarError("admits no output at all".into());
    let mask = probe.compute_mask_or_eos().map_err(|_| unusable())?;
    if mask.is_zero() {
        return Err(unusable());
    }
    Ok(())
}

fn build_factory(
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
    vocab_size: usize,
) -> Result<ParserFactory, String> {
    let json = tokenizer
        .to_json()
        .map_err(|e| format!("the tokenizer cannot be serialised: {e}"))?;
    let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())
        .map_err(|e| format!("the tokenizer has no byte-level token table: {e}"))?;
    if !eos_ids.is_empty() {
        bytes.set_eos_tokens(eos_ids);
    }
    let n_vocab = vocab_size.max(tokenizer.vocab_size());
    let env = bytes
        .into_tok_env(Some(n_vocab))
        .map_err(|e| format!("cannot build the token trie: {e}"))?;
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    // An error names what is wrong, not the whole grammar (which may be a megabyte).
    *factory.limits_mut() = ParserLimits {
        verbose_errors: false,
        ..ParserLimits::default()
    };
    Ok(factory)
}

/// `spec` as llguidance's top-level grammar. JSON is compact and without free whitespace
/// unless the schema says otherwise (`x-guidance`): a constrained answer should not spend
/// tokens on indentation. Objects that list their properties are closed (see `strict`).
fn top_level(spec: &GrammarSpec) -> Result<TopLevelGrammar, GrammarError> {
    Ok(match spec {
        GrammarSpec::JsonSchema(schema) => {
            if !schema.is_object() && !schema.is_boolean() {
                return Err(GrammarError("a JSON schema must be an object".into()));
            }
            TopLevelGrammar::from_json_schema(compact(closed_objects(schema.clone())))
        }
        GrammarSpec::Regex(rx) => {
            // llguidance takes a regex that fails to parse as a lexer error at compile time.
            TopLevelGrammar::from_regex(rx)
        }
        GrammarSpec::Choice(choices) => {
            if choices.is_empty() {
                return Err(GrammarError("must list at least one choice".into()));
            }
            let alts: Vec<String> = choices.iter().map(|c| quoted(c)).collect();
            TopLevelGrammar::from_lark(format!("start: {}\n", alts.join(" | ")))
        }
        GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
    })
}

/// Adds `x-guidance: {whitespace_flexible: false}` to a schema that sets no options itself.
pub(crate) fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    let mut out: String = line.chars().take(500).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
}

/// A grammar's cache cell: empty while it is being compiled.
type Cell = Arc<OnceLock<Result<Arc<Compiled>, GrammarError>>>;

/// A least-recently-used map, small enough that eviction scans it.
#[derive(Default)]
struct Lru {
    entries: HashMap<String, (Cell, u64)>,
    clock: u64,
}

impl Lru {
    /// The cell for `key` (a new, empty one on a miss).
    fn entry(&mut self, key: String) -> Cell {
        self.clock += 1;
        let clock = self.clock;
        if let Some((cell, used)) = self.entries.get_mut(&key) {
            *used = clock;
            return cell.clone();
        }
        if self.entries.len() >= CACHE_ENTRIES {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        let cell = Cell::default();
        self.entries.insert(key, (cell.clone(), clock));
        cell
    }

    /// Compiled (successfully or not) and cached.
    fn peek(&self, key: &str) -> bool {
        self.entries
            .get(key)
            .is_some_and(|(cell, _)| cell.get().is_some())
    }
}
