use super::*;
use prom_text_format_parser::{Scrape, Type};

fn metrics(compat: bool) -> Metrics {
    Metrics::new(&MetricsOptions {
        model_name: "m".into(),
        vllm_compat: compat,
        max_model_len: 4096,
        block_size: 16,
        num_gpu_blocks: 100,
        enable_prefix_caching: true,
        cache_dtype: "auto",
    })
    .unwrap()
}

fn value(s: &Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    let m = s.metrics.iter().find(|m| m.name == name)?;
    m.samples
        .iter()
        .find(|x| match label {
            None => true,
            Some((k, v)) => x.labels.iter().any(|l| l.key == k && l.value == v),
        })
        .map(|x| x.value.value.as_f64())
}

#[test]
fn renders_both_families_that_a_strict_parser_accepts() {
    let m = metrics(true);
    m.requests().first_token(Duration::from_millis(30));
    m.requests().rejected(RejectReason::TooLong);
    m.steps().observe(
        3,
        40,
        Duration::from_micros(50),
        Duration::from_millis(2),
        Duration::from_micros(80),
    );
    let live = LiveFigures {
        running: 2,
        total_blocks: 100,
        free_blocks: 75,
        cached_free_blocks: 5,
        finished_length: 7,
        ..Default::default()
    };
    let text = m.render(&live).unwrap();
    let s = Scrape::parse(&text).unwrap();
    assert_eq!(
        value(&s, "vllm:num_requests_running", None),
        Some(2.0),
        "{text}"
    );
    assert_eq!(value(&s, "vllm:kv_cache_usage_perc", None), Some(0.25));
    assert_eq!(value(&s, "vllm:gpu_cache_usage_perc", None), Some(0.25));
    assert_eq!(
        value(&s, "distillery:kv_cache_blocks", Some(("state", "cached"))),
        Some(5.0)
    );
    assert_eq!(
        value(&s, "distillery:kv_cache_blocks", Some(("state", "free"))),
        Some(70.0)
    );
    assert_eq!(
        value(
            &s,
            "vllm:request_success_total",
            Some(("finished_reason", "length"))
        ),
        Some(7.0)
    );
    assert_eq!(
        value(
            &s,
            "distillery:requests_rejected_total",
            Some(("reason", "too_long"))
        ),
        Some(1.0)
    );
    // Ours alone: no vLLM copy.
    assert!(!text.contains("vllm:requests_rejected_total"));
    assert!(!text.contains("vllm:batch_size"));
    for m in &s.metrics {
        assert!(
            m.samples.iter().all(|x| x
                .labels
                .iter()
                .any(|l| l.key == "model_name" && l.value == "m")),
            "{} lacks model_name",
            m.name
        );
        if m.name.ends_with("_seconds") && !m.name.starts_with("process_") {
            assert_eq!(m.kind, Type::Histogram, "{}", m.name);
        }
    }
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
}

#[test]
fn compat_off_renders_only_the_native_family() {
    let text = metrics(false).render(&LiveFigures::default()).unwrap();
    assert!(!text.contains("vllm:"), "{text}");
    assert!(text.contains("distillery:time_to_first_token_seconds_bucket"));
    assert!(text.contains("distillery:cache_config_info"));
}

#[test]
fn time_per_output_token_leaves_out_the_first_token() {
    let m = metrics(false);
    m.requests().finished(&FinishedRequest {
        decode: Duration::from_millis(300),
        generation_tokens: 4,
        n: 1,
        ..Default::default()
    });
    let s = Scrape::parse(&m.render(&LiveFigures::default()).unwrap()).unwrap();
    let tpot = s
        .metrics
        .iter()
        .find(|m| m.name == "distillery:request_time_per_output_token_seconds")
        .unwrap();
    let sum = tpot
        .samples
        .iter()
        .find(|x| x.value.value_type == prom_text_format_parser::ValueType::Sum)
        .unwrap();
    assert!((sum.value.value.as_f64() - 0.1).abs() < 1e-9);
}
