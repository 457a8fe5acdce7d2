//! `GET /metrics` read with a strict Prometheus text parser, and single samples out of it.

use prom_text_format_parser::{Scrape, ValueType};

/// Scrapes `base` + `/metrics`; panics on an unparsable exposition.
pub async fn scrape(c: &reqwest::Client, base: &str) -> Scrape {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the /metrics body");
    Scrape::parse(&text).unwrap_or_else(|e| panic!("unparsable scrape: {e:?}\n{text}"))
}

/// The first sample of `name` of the given kind (a counter's value, a histogram's count)
/// carrying all of `labels`.
pub fn sample(s: &Scrape, name: &str, labels: &[(&str, &str)], kind: ValueType) -> f64 {
    s.metrics
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} missing from the scrape"))
        .samples
        .iter()
        .find(|x| {
            x.value.value_type == kind
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.iter().any(|l| l.key == *k && l.value == *v))
        })
        .unwrap_or_else(|| panic!("{name}{labels:?} has no {kind:?} sample"))
        .value
        .value
        .as_f64()
}

/// A gauge's or counter's value.
pub fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(s, name, labels, ValueType::Sample)
}
