//! metrics: the Prometheus registry and the metric set — what is measured, under which names
//! (the native `distillery:*` family and, when asked, the same values under vLLM v1's
//! `vllm:*` names), with which buckets, and how it all renders as Prometheus text.
//!
//! Knows nothing of everything else: not the engine, not HTTP, not requests. Its callers hand
//! it plain counts and durations — per engine step through [`StepMetrics`], per request
//! through [`RequestMetrics`], and at scrape time the engine's live figures as
//! [`LiveFigures`]. There is no global state: the [`Registry`] lives inside [`Metrics`], which
//! its owner builds once and passes around.
//!
//! Cost model: recording a sample touches only the atomics inside a prometheus histogram or
//! counter (no lock, no allocation), so the engine thread and the per-token path never wait on
//! a scrape. Rendering takes the registry's own lock, which no recording path touches.

pub mod buckets;

use std::collections::HashMap;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

/// The native family's prefix.
pub const NATIVE_PREFIX: &str = "distillery:";
/// vLLM v1's prefix, used for the compatibility copies.
pub const VLLM_PREFIX: &str = "vllm:";

/// The series that vLLM v1 also exports, by suffix: with compatibility on, each is rendered a
/// second time as `vllm:<suffix>` with the same labels and values. The rest (rejections,
/// batch size, step phases, block states, queued prompt tokens) are ours alone.
pub const VLLM_SUFFIXES: &[&str] = &[
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "gpu_cache_usage_perc",
    "cache_config_info",
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
    "num_preemptions_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "http_requests_client_disconnected_total",
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "request_time_per_output_token_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_inference_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_params_max_tokens",
    "request_params_n",
    "iteration_tokens_total",
];

/// What the metric set needs to know once, at start-up.
#[derive(Clone, Debug)]
pub struct MetricsOptions {
    /// The `model_name` label every series carries.
    pub model_name: String,
    /// Also render the vLLM-named copies.
    pub vllm_compat: bool,
    /// Upper end of the token-count histograms' 1-2-5 buckets (vLLM uses the context length).
    pub max_model_len: usize,
    /// For `cache_config_info`.
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub enable_prefix_caching: bool,
    /// `--kv-cache-dtype` as vLLM names it (`auto`, `bfloat16`, ...).
    pub cache_dtype: &'static str,
}

/// Why a request was refused before it ran (`distillery:requests_rejected_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// 503: the queue bound was hit, or the server is draining.
    Overloaded,
    /// A malformed or unacceptable request (400, 404, 405, 413).
    Invalid,
    /// 401: missing or wrong API key.
    Unauthorized,
    /// Prompt plus `max_tokens` over the context or the whole cache.
    TooLong,
}

impl RejectReason {
    pub const ALL: [RejectReason; 4] = [
        Self::Overloaded,
        Self::Invalid,
        Self::Unauthorized,
        Self::TooLong,
    ];

    /// Position in [`Self::ALL`].
    fn index(self) -> usize {
        match self {
            Self::Overloaded => 0,
            Self::Invalid => 1,
            Self::Unauthorized => 2,
            Self::TooLong => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Overloaded => "overloaded",
            Self::Invalid => "invalid",
            Self::Unauthorized => "unauthorized",
            Self::TooLong => "too_long",
        }
    }
}

/// The engine's state and cumulative counts, read at scrape time (the engine keeps them in
/// relaxed atomics, so reading them costs the engine nothing).
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveFigures {
    pub running: u64,
    pub waiting: u64,
    pub total_blocks: u64,
    /// Blocks no sequence holds, cached content included.
    pub free_blocks: u64,
    /// Of the free blocks, those still holding reusable prefix-cache content.
    pub cached_free_blocks: u64,
    /// Prompt tokens of requests admitted but not yet at their first token.
    pub queued_prompt_tokens: u64,
    /// Tokenization jobs waiting for a thread.
    pub tokenizer_jobs_queued: u64,
    /// Tokenization jobs dropped unrun because their client had gone.
    pub tokenizer_jobs_abandoned: u64,
    /// HTTP connections open now.
    pub http_connections_open: u64,
    /// Connections closed at their header or keep-alive deadline.
    pub http_connections_timed_out: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub finished_stop: u64,
    pub finished_length: u64,
    pub finished_abort: u64,
}

/// One finished request (one choice of it: like vLLM v1, each of `n` choices is a request of
/// its own here), as the intervals vLLM defines. All on one monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct FinishedRequest {
    /// HTTP arrival → the last token handed to the client.
    pub e2e: Duration,
    /// Admitted to the queue → first scheduled.
    pub queue: Duration,
    /// First scheduled → first token.
    pub prefill: Duration,
    /// First token → last token (a preemption in between counts here).
    pub decode: Duration,
    /// First scheduled → last token.
    pub inference: Duration,
    pub prompt_tokens: usize,
    /// Tokens generated, a final EOS/stop token included.
    pub generation_tokens: usize,
    pub max_tokens: usize,
    pub n: usize,
}

/// Per-request recording, done by the server as tokens arrive and requests end.
#[derive(Clone)]
pub struct RequestMetrics {
    ttft: Histogram,
    itl: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    inference: Histogram,
    prefill: Histogram,
    decode: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    max_tokens: Histogram,
    n: Histogram,
    reasoning_tokens_total: IntCounter,
    reasoning_tokens: Histogram,
    reasoning_cutoffs: IntCounter,
    disconnected: IntCounter,
    /// Indexed like [`RejectReason::ALL`].
    rejected: [IntCounter; 4],
}

impl RequestMetrics {
    /// HTTP arrival → the first token of a request (tokenization and queueing included).
    pub fn first_token(&self, since_arrival: Duration) {
        self.ttft.observe(since_arrival.as_secs_f64());
    }

    /// The gap between two consecutive tokens of one request.
    pub fn inter_token(&self, gap: Duration) {
        self.itl.observe(gap.as_secs_f64());
    }

    pub fn finished(&self, r: &FinishedRequest) {
        self.e2e.observe(r.e2e.as_secs_f64());
        self.queue.observe(r.queue.as_secs_f64());
        self.prefill.observe(r.prefill.as_secs_f64());
        self.decode.observe(r.decode.as_secs_f64());
        self.inference.observe(r.inference.as_secs_f64());
        // vLLM's definition: the first token is prefill's, so it is not a decode interval;
        // a request of one token still counts, as 0.
        let tpot = if r.generation_tokens > 1 {
            r.decode.as_secs_f64() / (r.generation_tokens - 1) as f64
        } else {
            0.0
        };
        self.tpot.observe(tpot);
        self.prompt_tokens.observe(r.prompt_tokens as f64);
        self.generation_tokens.observe(r.generation_tokens as f64);
        self.max_tokens.observe(r.max_tokens as f64);
        self.n.observe(r.n as f64);
    }

    /// A finished choice of a reasoning model: its reasoning tokens, and whether its
    /// thinking budget ended the thought.
    pub fn reasoning(&self, tokens: usize, cut_off: bool) {
        self.reasoning_tokens_total.inc_by(tokens as u64);
        self.reasoning_tokens.observe(tokens as f64);
        if cut_off {
            self.reasoning_cutoffs.inc();
        }
    }

    /// The client went away before its response was complete.
    pub fn client_disconnected(&self) {
        self.disconnected.inc();
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.rejected[reason.index()].inc();
    }
}

/// Per-step recording, done by the engine thread after each step that ran a batch.
#[derive(Clone)]
pub struct StepMetrics {
    batch_size: Histogram,
    iteration_tokens: Histogram,
    schedule: Histogram,
    forward: Histogram,
    sample: Histogram,
}

impl StepMetrics {
    /// `seqs` sequences computing `tokens` tokens; the three phases' wall times.
    pub fn observe(
        &self,
        seqs: usize,
        tokens: usize,
        schedule: Duration,
        forward: Duration,
        sample: Duration,
    ) {
        self.batch_size.observe(seqs as f64);
        self.iteration_tokens.observe(tokens as f64);
        self.schedule.observe(schedule.as_secs_f64());
        self.forward.observe(forward.as_secs_f64());
        self.sample.observe(sample.as_secs_f64());
    }
}

/// Structured outputs: grammar compilation, its cache, and the per-token mask time.
#[derive(Clone)]
pub struct GrammarMetrics {
    pub compile: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub mask: Histogram,
    /// Constrained requests, by kind (`json_schema`, `json_object`, `regex`, `choice`,
    /// `grammar`, `tool_call`).
    pub requests: IntCounterVec,
}

/// The registry and every recorded metric; build once, share by `Arc`.
pub struct Metrics {
    registry: Registry,
    model_name: String,
    vllm_compat: bool,
    requests: RequestMetrics,
    steps: StepMetrics,
    grammar: GrammarMetrics,
}

fn native(suffix: &str) -> String {
    format!("{NATIVE_PREFIX}{suffix}")
}

fn counter(reg: &Registry, suffix: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::with_opts(Opts::new(native(suffix), help))?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    reg: &Registry,
    suffix: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(native(suffix), help).buckets(buckets))?;
    reg.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new(opts: &MetricsOptions) -> prometheus::Result<Self> {
        // The registry adds `model_name` to every series it gathers, the process collector's
        // included; the per-scrape series below add it themselves.
        let labels = HashMap::from([("model_name".to_string(), opts.model_name.clone())]);
        let reg = Registry::new_custom(None, Some(labels))?;
        let token_counts = buckets::one_two_five(opts.max_model_len);
        let secs = |v: &[f64]| v.to_vec();

        let requests = RequestMetrics {
            ttft: histogram(
                &reg,
                "time_to_first_token_seconds",
                "Histogram of time to first token in seconds, from HTTP arrival (tokenization \
                 included) to the first token sent.",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            itl: histogram(
                &reg,
                "inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds (every gap between two tokens of a \
                 request).",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            tpot: histogram(
                &reg,
                "request_time_per_output_token_seconds",
                "Histogram of time per output token in seconds: decode time / (generated tokens \
                 - 1).",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            e2e: histogram(
                &reg,
                "e2e_request_latency_seconds",
                "Histogram of end-to-end request latency in seconds.",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            queue: histogram(
                &reg,
                "request_queue_time_seconds",
                "Histogram of time spent waiting in the queue (admitted to first scheduled) in \
                 seconds.",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            inference: histogram(
                &reg,
                "request_inference_time_seconds",
                "Histogram of time spent running (first scheduled to last token) in seconds.",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            prefill: histogram(
                &reg,
                "request_prefill_time_seconds",
                "Histogram of time spent in prefill (first scheduled to first token) in seconds.",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            decode: histogram(
                &reg,
                "request_decode_time_seconds",
                "Histogram of time spent in decode (first to last token) in seconds.",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            prompt_tokens: histogram(
                &reg,
                "request_prompt_tokens",
                "Number of prefill tokens processed, per request.",
                token_counts.clone(),
            )?,
            generation_tokens: histogram(
                &reg,
                "request_generation_tokens",
                "Number of generation tokens processed, per request.",
                token_counts.clone(),
            )?,
            max_tokens: histogram(
                &reg,
                "request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                token_counts.clone(),
            )?,
            reasoning_tokens_total: counter(
                &reg,
                "reasoning_tokens_total",
                "Reasoning tokens generated (inside <think>, the markers not counted), by \
                 reasoning models only.",
            )?,
            reasoning_tokens: histogram(
                &reg,
                "request_reasoning_tokens",
                "Number of reasoning tokens, per request of a reasoning model.",
                token_counts,
            )?,
            reasoning_cutoffs: counter(
                &reg,
                "reasoning_budget_cutoffs_total",
                "Requests whose thinking budget ran out, so that the end of thinking was forced.",
            )?,
            n: histogram(
                &reg,
                "request_params_n",
                "Histogram of the n request parameter.",
                secs(buckets::PARAMS_N),
            )?,
            disconnected: {
                let c = IntCounter::with_opts(Opts::new(
                    native("http_requests_client_disconnected_total"),
                    "Requests whose client went away before the response was complete.",
                ))?;
                reg.register(Box::new(c.clone()))?;
                c
            },
            rejected: {
                let v = IntCounterVec::new(
                    Opts::new(
                        native("requests_rejected_total"),
                        "Requests refused before they ran, by reason.",
                    ),
                    &["reason"],
                )?;
                reg.register(Box::new(v.clone()))?;
                // Resolved once so that counting never looks a label up; every reason shows
                // (at 0) from the first scrape, which rate() needs.
                RejectReason::ALL.map(|r| v.with_label_values(&[r.as_str()]))
            },
        };

        let phases = HistogramVec::new(
            HistogramOpts::new(
                native("step_duration_seconds"),
                "Wall time of one engine step's phases: schedule (incl. dropping cancelled \
                 sequences), forward (the model), sample (sampling, stop checks, events).",
            )
            .buckets(secs(buckets::STEP_DURATION)),
            &["phase"],
        )?;
        reg.register(Box::new(phases.clone()))?;
        let steps = StepMetrics {
            batch_size: histogram(
                &reg,
                "batch_size",
                "Sequences in one engine step.",
                secs(buckets::BATCH_SIZE),
            )?,
            iteration_tokens: histogram(
                &reg,
                "iteration_tokens_total",
                "Histogram of the number of tokens computed per engine step.",
                secs(buckets::ITERATION_TOKENS),
            )?,
            schedule: phases.with_label_values(&["schedule"]),
            forward: phases.with_label_values(&["forward"]),
            sample: phases.with_label_values(&["sample"]),
        };

        let grammar = GrammarMetrics {
            compile: histogram(
                &reg,
                "grammar_compile_seconds",
                "Time to compile a request's grammar (JSON schema, regex, choice, Lark, tool \
                 calls) into a token parser; cache hits are not observed.",
                buckets::NATIVE_LATENCY.to_vec(),
            )?,
            cache_hits: counter(
                &reg,
                "grammar_cache_hits_total",
                "Constrained requests whose grammar was already compiled.",
            )?,
            cache_misses: counter(
                &reg,
                "grammar_cache_misses_total",
                "Constrained requests whose grammar had to be compiled.",
            )?,
            mask: histogram(
                &reg,
                "grammar_mask_seconds",
                "Time to compute one constrained sample point's token mask.",
                secs(buckets::MASK_DURATION),
            )?,
            requests: {
                let v = IntCounterVec::new(
                    Opts::new(
                        native("constrained_requests_total"),
                        "Requests decoded under a grammar, by kind.",
                    ),
                    &["kind"],
                )?;
                reg.register(Box::new(v.clone()))?;
                v
            },
        };

        // Info-style: the value is 1, the facts are in the labels (vLLM writes Python's
        // str() of each field, hence "True"/"False").
        let info = Gauge::with_opts(
            Opts::new(
                native("cache_config_info"),
                "Information of the KV cache configuration.",
            )
            .const_label("block_size", opts.block_size.to_string())
            .const_label("num_gpu_blocks", opts.num_gpu_blocks.to_string())
            .const_label("cache_dtype", opts.cache_dtype)
            .const_label(
                "enable_prefix_caching",
                if opts.enable_prefix_caching {
                    "True"
                } else {
                    "False"
                },
            ),
        )?;
        info.set(1.0);
        reg.register(Box::new(info))?;

        #[cfg(target_os = "linux")]
        reg.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Self {
            registry: reg,
            model_name: opts.model_name.clone(),
            vllm_compat: opts.vllm_compat,
            requests,
            steps,
            grammar,
        })
    }

    pub fn grammar(&self) -> &GrammarMetrics {
        &self.grammar
    }

    pub fn requests(&self) -> &RequestMetrics {
        &self.requests
    }

    /// A handle for the engine thread (its histograms are shared, not copied).
    pub fn steps(&self) -> StepMetrics {
        self.steps.clone()
    }

    /// Everything, as Prometheus text (version 0.0.4). `live` supplies the gauges and the
    /// counters the engine keeps itself.
    pub fn render(&self, live: &LiveFigures) -> prometheus::Result<String> {
        let mut families = self.registry.gather();
        precise_cpu_seconds(&mut families);
        families.extend(self.live_families(live)?);
        if self.vllm_compat {
            let copies: Vec<MetricFamily> = families.iter().filter_map(vllm_copy).collect();
            families.extend(copies);
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        TextEncoder::new().encode_to_string(&families)
    }

    /// Series whose values live in the engine: made afresh on each scrape (a few small
    /// allocations once a scrape), so concurrent scrapes never share mutable state.
    fn live_families(&self, l: &LiveFigures) -> prometheus::Result<Vec<MetricFamily>> {
        let used = l.total_blocks.saturating_sub(l.free_blocks);
        // Cached-but-free blocks count as free, as vLLM counts them: they are evictable.
        let usage = if l.total_blocks == 0 {
            0.0
        } else {
            used as f64 / l.total_blocks as f64
        };
        let mut out = Vec::with_capacity(16);
        let mut gauge = |suffix: &str, help: &str, labels: &[(&str, &str)], v: f64| {
            let g = Gauge::with_opts(self.opts(suffix, help, labels))?;
            g.set(v);
            out.extend(g.collect());
            prometheus::Result::Ok(())
        };
        gauge(
            "num_requests_running",
            "Number of requests in model execution batches.",
            &[],
            l.running as f64,
        )?;
        gauge(
            "num_requests_waiting",
            "Number of requests waiting to be processed.",
            &[],
            l.waiting as f64,
        )?;
        gauge(
            "kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            &[],
            usage,
        )?;
        gauge(
            "gpu_cache_usage_perc",
            "KV-cache usage (the older name of kv_cache_usage_perc). 1 means 100 percent usage.",
            &[],
            usage,
        )?;
        gauge(
            "queued_prompt_tokens",
            "Prompt tokens of requests admitted but not yet at their first token.",
            &[],
            l.queued_prompt_tokens as f64,
        )?;
        gauge(
            "tokenizer_jobs_queued",
            "Template and tokenization jobs waiting for a thread.",
            &[],
            l.tokenizer_jobs_queued as f64,
        )?;
        gauge(
            "http_connections_open",
            "HTTP connections open now.",
            &[],
            l.http_connections_open as f64,
        )?;
        let blocks_help = "KV cache blocks by state: used (held by sequences), cached (free but \
                           holding reusable prefix content), free (empty).";
        let outright_free = l.free_blocks.saturating_sub(l.cached_free_blocks);
        for (state, v) in [
            ("free", outright_free),
            ("used", used),
            ("cached", l.cached_free_blocks),
        ] {
            gauge(
                "kv_cache_blocks",
                blocks_help,
                &[("state", state)],
                v as f64,
            )?;
        }
        // Counters merge into one family per name before encoding (see `merge`).
        let mut counter = |suffix: &str, help: &str, labels: &[(&str, &str)], v: u64| {
            let c = IntCounter::with_opts(self.opts(suffix, help, labels))?;
            c.inc_by(v);
            out.extend(c.collect());
            prometheus::Result::Ok(())
        };
        counter(
            "tokenizer_jobs_abandoned_total",
            "Tokenization jobs dropped before they ran because their client had gone.",
            &[],
            l.tokenizer_jobs_abandoned,
        )?;
        counter(
            "http_connections_timed_out_total",
            "Connections closed for sending no complete headers, or staying idle, in time.",
            &[],
            l.http_connections_timed_out,
        )?;
        counter(
            "prompt_tokens_total",
            "Number of prefill tokens processed.",
            &[],
            l.prompt_tokens,
        )?;
        counter(
            "generation_tokens_total",
            "Number of generation tokens processed.",
            &[],
            l.generation_tokens,
        )?;
        counter(
            "num_preemptions_total",
            "Cumulative number of preemptions from the engine.",
            &[],
            l.preemptions,
        )?;
        counter(
            "prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            &[],
            l.prefix_cache_queries,
        )?;
        counter(
            "prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            &[],
            l.prefix_cache_hits,
        )?;
        let success_help = "Count of finished requests (each choice of n counts), by finish \
                            reason.";
        for (reason, v) in [
            ("stop", l.finished_stop),
            ("length", l.finished_length),
            ("abort", l.finished_abort),
        ] {
            counter(
                "request_success_total",
                success_help,
                &[("finished_reason", reason)],
                v,
            )?;
        }
        Ok(merge(out))
    }

    fn opts(&self, suffix: &str, help: &str, labels: &[(&str, &str)]) -> Opts {
        let mut o = Opts::new(native(suffix), help).const_label("model_name", &self.model_name);
        for (k, v) in labels {
            o = o.const_label(*k, *v);
        }
        o
    }
}

/// The process collector counts CPU time in whole seconds (clock ticks divided as integers);
/// `getrusage` gives microseconds, so a short benchmark's CPU cost is visible.
fn precise_cpu_seconds(families: &mut [MetricFamily]) {
    let Some(secs) = cpu_seconds() else { return };
    for f in families
        .iter_mut()
        .filter(|f| f.name() == "process_cpu_seconds_total")
    {
        for m in f.mut_metric() {
            let mut c = prometheus::proto::Counter::default();
            c.set_value(secs);
            m.set_counter(c);
        }
    }
}

/// User plus system CPU time of this process, in seconds.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value we own and pass by
    // pointer; it reads nothing else, and RUSAGE_SELF is always a valid `who`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    Some(t(usage.ru_utime) + t(usage.ru_stime))
}

/// Joins families of the same name (one per label set as built) into one, as the text format
/// wants each name's samples under a single TYPE line.
fn merge(families: Vec<MetricFamily>) -> Vec<MetricFamily> {
    let mut out: Vec<MetricFamily> = Vec::with_capacity(families.len());
    for mut f in families {
        match out.iter_mut().find(|o| o.name() == f.name()) {
            Some(o) => o.mut_metric().extend(f.take_metric()),
            None => out.push(f),
        }
    }
    out
}

/// The vLLM-named copy of a native family that vLLM also has.
fn vllm_copy(f: &MetricFamily) -> Option<MetricFamily> {
    let suffix = f.name().strip_prefix(NATIVE_PREFIX)?;
    if !VLLM_SUFFIXES.contains(&suffix) {
        return None;
    }
    let mut copy = f.clone();
    copy.set_name(format!("{VLLM_PREFIX}{suffix}"));
    // Ours are finer; vLLM's bounds are among them, so its buckets are ours read there.
    if let Some(bounds) = buckets::vllm_latency(suffix) {
        for m in copy.mut_metric() {
            let mut h = m.get_histogram().clone();
            let kept = h
                .get_bucket()
                .iter()
                .filter(|b| bounds.contains(&b.upper_bound()))
                .cloned()
                .collect();
            h.set_bucket(kept);
            m.set_histogram(h);
        }
    }
    Some(copy)
}

#[cfg(test)]
mod tests;
