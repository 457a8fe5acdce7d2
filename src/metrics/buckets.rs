//! Histogram bucket bounds. The vLLM ones are vLLM v1's exact lists, so that quantiles computed
//! over our series match what the same dashboards show for a vLLM server.

/// `time_to_first_token_seconds`.
pub const TIME_TO_FIRST_TOKEN: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// `inter_token_latency_seconds` and `request_time_per_output_token_seconds`.
pub const TOKEN_LATENCY: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// `e2e_request_latency_seconds` and the queue / inference / prefill / decode phases.
pub const REQUEST_LATENCY: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Our own (`distillery:*`) latency histograms: from half a millisecond, so that a workload
/// whose p99 is a few hundred milliseconds is resolved (vLLM's E2E buckets start at 0.3 s).
/// Every bound of the three vLLM lists above is one of these, so the `vllm:*` copies are
/// these histograms' cumulative counts read at vLLM's bounds: one observation serves both.
pub const NATIVE_LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
    0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 120.0, 160.0, 240.0, 480.0, 640.0, 960.0, 1920.0, 2560.0,
    7680.0,
];

/// vLLM's bounds for one of the latency histograms, by suffix.
pub fn vllm_latency(suffix: &str) -> Option<&'static [f64]> {
    match suffix {
        "time_to_first_token_seconds" => Some(TIME_TO_FIRST_TOKEN),
        "inter_token_latency_seconds" | "request_time_per_output_token_seconds" => {
            Some(TOKEN_LATENCY)
        }
        "e2e_request_latency_seconds"
        | "request_queue_time_seconds"
        | "request_inference_time_seconds"
        | "request_prefill_time_seconds"
        | "request_decode_time_seconds" => Some(REQUEST_LATENCY),
        _ => None,
    }
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    #[test]
    fn every_vllm_latency_bound_is_a_native_bound() {
        for list in [TIME_TO_FIRST_TOKEN, TOKEN_LATENCY, REQUEST_LATENCY] {
            for b in list {
                assert!(NATIVE_LATENCY.contains(b), "{b}");
            }
        }
        assert!(NATIVE_LATENCY.windows(2).all(|w| w[0] < w[1]));
    }
}

/// `request_params_n`.
pub const PARAMS_N: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];

/// `iteration_tokens_total`: tokens computed in one engine step.
pub const ITERATION_TOKENS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// `distillery:batch_size`: sequences in one step (the default cap is 256; 1024 leaves room).
pub const BATCH_SIZE: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// `distillery:step_duration_seconds`: a step of a small model on a GPU takes well under a
/// millisecond, a large batch on a CPU can take a second, so the range is wide and fine.
pub const STEP_DURATION: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One grammar mask: tens of microseconds for a JSON schema on a 150k vocabulary, more for
/// a grammar that keeps many alternatives open.
pub const MASK_DURATION: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

/// vLLM's 1-2-5 series up to and including `max` (`build_1_2_5_buckets`), used for the token
/// count histograms: 1, 2, 5, 10, 20, 50, 100, …
pub fn one_two_five(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade: usize = 1;
    loop {
        for m in [1usize, 2, 5] {
            match m.checked_mul(decade) {
                Some(v) if v <= max => out.push(v as f64),
                _ => return nonempty(out),
            }
        }
        match decade.checked_mul(10) {
            Some(d) => decade = d,
            None => return nonempty(out),
        }
    }
}

/// The prometheus crate swaps an empty list for its own defaults; one bucket is more honest.
fn nonempty(mut v: Vec<f64>) -> Vec<f64> {
    if v.is_empty() {
        v.push(1.0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_two_five_stops_at_the_context_length() {
        assert_eq!(
            one_two_five(2048),
            [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]
        );
        assert_eq!(one_two_five(5), [1.0, 2.0, 5.0]);
        assert_eq!(one_two_five(0), [1.0]);
        assert!(one_two_five(usize::MAX).len() > 50);
    }

    #[test]
    fn every_list_is_strictly_increasing() {
        for b in [
            TIME_TO_FIRST_TOKEN,
            TOKEN_LATENCY,
            REQUEST_LATENCY,
            PARAMS_N,
            ITERATION_TOKENS,
            BATCH_SIZE,
            STEP_DURATION,
            MASK_DURATION,
        ] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
    }
}
