//! Descriptive statistics over latency samples: percentiles with linear interpolation between
//! closest ranks (numpy's default, which `vllm bench serve` uses), mean and population standard
//! deviation (numpy's `std` with `ddof=0`). Owns nothing else: callers pick what to summarise.

use serde::Serialize;

/// The percentile `p` (0..=100) of already sorted samples, interpolating linearly between the two
/// closest ranks exactly as `numpy.percentile(x, p)` does by default. `None` for no samples or a
/// `p` outside 0..=100.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    // numpy's "linear" method: the rank is p/100 * (n - 1) on a 0-based index.
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let (a, b) = (sorted[lo], sorted[hi.min(sorted.len() - 1)]);
    Some(a + (b - a) * (rank - lo as f64))
}

/// Arithmetic mean; `None` for no samples.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

/// Population standard deviation (divides by n, as `numpy.std` does by default); `None` for no
/// samples.
pub fn std_dev(values: &[f64]) -> Option<f64> {
    let m = mean(values)?;
    let var = values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64;
    Some(var.sqrt())
}

/// The figures reported for one latency metric. All zero with `count == 0` when there were no
/// samples, as vLLM's report prints zeros rather than NaN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarises `values`, sorting them in place (the caller's buffer is scratch: copying
    /// millions of inter-token gaps again would only cost time).
    pub fn of(values: &mut [f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        values.sort_unstable_by(f64::total_cmp);
        let pct = |p| percentile(values, p).unwrap_or(0.0);
        Summary {
            count: values.len(),
            mean: mean(values).unwrap_or(0.0),
            median: pct(50.0),
            std: std_dev(values).unwrap_or(0.0),
            p90: pct(90.0),
            p99: pct(99.0),
            min: values[0],
            max: values[values.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_match_numpy_on_one_to_ten() {
        // numpy.percentile(np.arange(1, 11), [0, 25, 50, 90, 99, 100]) ->
        // [1.0, 3.25, 5.5, 9.1, 9.91, 10.0] (rank = p/100 * 9, interpolated by hand the same way).
        let x: Vec<f64> = (1..=10).map(f64::from).collect();
        for (p, want) in [
            (0.0, 1.0),
            (25.0, 3.25),
            (50.0, 5.5),
            (90.0, 9.1),
            (99.0, 9.91),
            (100.0, 10.0),
        ] {
            let got = percentile(&x, p).unwrap();
            assert!(close(got, want), "p{p}: got {got}, want {want}");
        }
    }

    #[test]
    fn percentiles_of_odd_and_tiny_samples() {
        // numpy.percentile([7], 99) == 7; numpy.percentile([1, 2], 50) == 1.5;
        // numpy.percentile([10, 20, 30, 40, 1000], [50, 90, 99]) == [30, 616, 961.6].
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        let x = [10.0, 20.0, 30.0, 40.0, 1000.0];
        assert!(close(percentile(&x, 50.0).unwrap(), 30.0));
        assert!(close(percentile(&x, 90.0).unwrap(), 616.0));
        assert!(close(percentile(&x, 99.0).unwrap(), 961.6));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&x, 101.0), None);
    }

    #[test]
    fn summary_sorts_and_reports_numpy_figures() {
        // Unsorted 1..=10: mean 5.5, numpy.std 2.8722813232690143 (ddof=0).
        let mut x = vec![10.0, 3.0, 1.0, 7.0, 5.0, 2.0, 9.0, 4.0, 8.0, 6.0];
        let s = Summary::of(&mut x);
        assert_eq!(s.count, 10);
        assert!(close(s.mean, 5.5));
        assert!(close(s.median, 5.5));
        assert!(close(s.std, 2.872_281_323_269_014_3));
        assert!(close(s.p90, 9.1));
        assert!(close(s.p99, 9.91));
        assert_eq!((s.min, s.max), (1.0, 10.0));
    }

    #[test]
    fn empty_summary_is_zeros() {
        assert_eq!(Summary::of(&mut []), Summary::default());
        assert_eq!(mean(&[]), None);
        assert_eq!(std_dev(&[]), None);
    }
}
