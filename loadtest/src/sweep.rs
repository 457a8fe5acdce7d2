//! `--sweep`: the points of a rate sweep, which of them meet the p99 SLOs, the table printed at
//! the end, and the SVG chart of latency against achieved throughput (plotters, SVG backend
//! only).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::report::{BenchSummary, RunReport};

/// The share of the target rate a sweep point must achieve to count.
pub const ACHIEVED_FRACTION: f64 = 0.9;

/// The SLOs a sweep point must meet, on the run's p99s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepSlo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_e2e_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ttft_ms: Option<f64>,
}

impl SweepSlo {
    /// A run at `target_rate` meets the SLO when nothing failed, something succeeded, it achieved
    /// at least `ACHIEVED_FRACTION` of the target (an in-flight cap can hold latency down by
    /// sending less, and that must not pass), and each p99 given holds.
    pub fn met_by(&self, target_rate: f64, s: &BenchSummary) -> bool {
        s.failed_requests == 0
            && s.successful_requests > 0
            && (!target_rate.is_finite() || s.request_throughput >= ACHIEVED_FRACTION * target_rate)
            && self.p99_e2e_ms.is_none_or(|l| s.e2e_ms.p99 <= l)
            && self.p99_ttft_ms.is_none_or(|l| s.ttft_ms.p99 <= l)
    }
}

/// One rate of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub failed_requests: u64,
    pub p50_e2e_ms: f64,
    pub p99_e2e_ms: f64,
    pub p99_ttft_ms: f64,
    pub meets_slo: bool,
}

/// The `--output` document of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepReport {
    pub slo: SweepSlo,
    pub points: Vec<SweepPoint>,
    /// The highest target rate whose run met the SLO, if any did.
    pub best_rate: Option<f64>,
    /// That run's achieved request throughput.
    pub best_achieved_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<String>,
    pub runs: Vec<RunReport>,
}

impl SweepReport {
    pub fn new(slo: SweepSlo, runs: Vec<(f64, RunReport)>) -> SweepReport {
        let points: Vec<SweepPoint> = runs
            .iter()
            .map(|(rate, r)| SweepPoint {
                target_rate: *rate,
                achieved_rate: r.summary.request_throughput,
                failed_requests: r.summary.failed_requests,
                p50_e2e_ms: r.summary.e2e_ms.median,
                p99_e2e_ms: r.summary.e2e_ms.p99,
                p99_ttft_ms: r.summary.ttft_ms.p99,
                meets_slo: slo.met_by(*rate, &r.summary),
            })
            .collect();
        let best = points
            .iter()
            .filter(|p| p.meets_slo)
            .max_by(|a, b| a.target_rate.total_cmp(&b.target_rate));
        SweepReport {
            slo,
            best_rate: best.map(|p| p.target_rate),
            best_achieved_rate: best.map(|p| p.achieved_rate),
            points,
            chart: None,
            runs: runs.into_iter().map(|(_, r)| r).collect(),
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "{:=^86}", " Rate sweep ");
        let _ = writeln!(
            o,
            "{:>12} {:>12} {:>8} {:>14} {:>14} {:>14}  SLO",
            "target/s", "achieved/s", "failed", "p50 E2E ms", "p99 E2E ms", "p99 TTFT ms"
        );
        for p in &self.points {
            let _ = writeln!(
                o,
                "{:>12} {:>12.1} {:>8} {:>14.2} {:>14.2} {:>14.2}  {}",
                rate_label(p.target_rate),
                p.achieved_rate,
                p.failed_requests,
                p.p50_e2e_ms,
                p.p99_e2e_ms,
                p.p99_ttft_ms,
                if p.meets_slo { "met" } else { "missed" }
            );
        }
        let mut slo = String::new();
        if let Some(e) = self.slo.p99_e2e_ms {
            slo += &format!("p99 E2E <= {e} ms, ");
        }
        if let Some(t) = self.slo.p99_ttft_ms {
            slo += &format!("p99 TTFT <= {t} ms, ");
        }
        slo += &format!(
            "no failures, achieved >= {:.0}% of target",
            ACHIEVED_FRACTION * 100.0
        );
        match (self.best_rate, self.best_achieved_rate) {
            (Some(r), Some(a)) => {
                let _ = writeln!(
                    o,
                    "Highest rate meeting the SLO ({slo}): {} req/s (achieved {a:.1} req/s)",
                    rate_label(r)
                );
            }
            _ => {
                let _ = writeln!(o, "No rate met the SLO ({slo})");
            }
        }
        if let Some(c) = &self.chart {
            let _ = writeln!(o, "Chart: {c}");
        }
        let _ = writeln!(o, "{}", "=".repeat(86));
        o
    }
}

fn rate_label(r: f64) -> String {
    if r.is_finite() {
        format!("{r}")
    } else {
        "inf".into()
    }
}

/// A line of the chart: its legend, colour, and the figure it plots.
type Series = (&'static str, RGBColor, fn(&SweepPoint) -> f64);

/// Draws p50/p99 E2E and p99 TTFT against achieved request throughput, with the SLO lines.
pub fn write_chart(report: &SweepReport, path: &Path) -> Result<()> {
    let mut pts: Vec<&SweepPoint> = report.points.iter().collect();
    pts.sort_by(|a, b| a.achieved_rate.total_cmp(&b.achieved_rate));
    let x_max = pts.iter().map(|p| p.achieved_rate).fold(1.0, f64::max) * 1.1;
    let y_max = pts
        .iter()
        .flat_map(|p| [p.p99_e2e_ms, p.p99_ttft_ms, p.p50_e2e_ms])
        .chain(report.slo.p99_e2e_ms)
        .chain(report.slo.p99_ttft_ms)
        .fold(1.0, f64::max)
        * 1.15;

    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency against achieved throughput", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("achieved request throughput (req/s)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .y_desc("latency (ms)")
        .draw()
        .map_err(e)?;
    // TTFT first, so that E2E (equal to it when not streaming) is drawn on top and stays
    // visible.
    let series: [Series; 3] = [
        ("p99 TTFT", RGBColor(230, 140, 0), |p| p.p99_ttft_ms),
        ("p50 E2E", BLUE, |p| p.p50_e2e_ms),
        ("p99 E2E", RED, |p| p.p99_e2e_ms),
    ];
    for (name, color, f) in series {
        let data: Vec<(f64, f64)> = pts.iter().map(|p| (p.achieved_rate, f(p))).collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                data.into_iter()
                    .map(|xy| Circle::new(xy, 4, color.filled())),
            )
            .map_err(e)?;
    }
    for (name, slo, color) in [
        ("SLO p99 E2E", report.slo.p99_e2e_ms, RED.mix(0.5)),
        (
            "SLO p99 TTFT",
            report.slo.p99_ttft_ms,
            RGBColor(230, 140, 0).mix(0.5),
        ),
    ] {
        if let Some(y) = slo {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, y), (x_max, y)],
                    8,
                    5,
                    color.stroke_width(2),
                ))
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1))
                });
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Summary;

    fn summary(throughput: f64, p99_e2e: f64, failed: u64) -> BenchSummary {
        BenchSummary {
            successful_requests: 100,
            failed_requests: failed,
            request_throughput: throughput,
            e2e_ms: Summary {
                p99: p99_e2e,
                ..Summary::default()
            },
            ttft_ms: Summary {
                p99: p99_e2e / 2.0,
                ..Summary::default()
            },
            ..BenchSummary::default()
        }
    }

    #[test]
    fn slo_needs_latency_no_failures_and_the_rate() {
        let slo = SweepSlo {
            p99_e2e_ms: Some(250.0),
            p99_ttft_ms: None,
        };
        assert!(slo.met_by(1000.0, &summary(995.0, 200.0, 0)));
        assert!(
            !slo.met_by(1000.0, &summary(995.0, 300.0, 0)),
            "p99 over the SLO"
        );
        assert!(!slo.met_by(1000.0, &summary(995.0, 200.0, 1)), "a failure");
        assert!(
            !slo.met_by(1000.0, &summary(700.0, 200.0, 0)),
            "sent too little"
        );
        assert!(slo.met_by(f64::INFINITY, &summary(700.0, 200.0, 0)));
    }

    #[test]
    fn best_is_the_highest_passing_target() {
        let run = |thr, p99| RunReport {
            config: crate::report::RunConfig {
                url: String::new(),
                model: String::new(),
                scenario: String::new(),
                endpoint: String::new(),
                stream: false,
                unconstrained: false,
                mode: "open-loop".into(),
                request_rate: None,
                burstiness: None,
                concurrency: None,
                duration_s: None,
                num_requests: None,
                warmup_s: 0.0,
                seed: 0,
            },
            summary: summary(thr, p99, 0),
            requests: Vec::new(),
        };
        let slo = SweepSlo {
            p99_e2e_ms: Some(100.0),
            p99_ttft_ms: None,
        };
        let r = SweepReport::new(
            slo,
            vec![
                (1000.0, run(1000.0, 10.0)),
                (2000.0, run(2000.0, 50.0)),
                (3000.0, run(2500.0, 400.0)),
            ],
        );
        assert_eq!(r.best_rate, Some(2000.0));
        assert_eq!(r.best_achieved_rate, Some(2000.0));
        assert!(r.render().contains("Highest rate meeting the SLO"));
    }
}
