//! Small charts of a rack's recent health (CPU, memory, disk, sync lag) as inline SVG rendered
//! on the server: no script and no inline style, so the CSP stays `default-src 'self'`.

use maud::{html, Markup};

use crate::racks::history::HEALTH_SAMPLES_MAX;
use crate::racks::HealthSample;

/// Drawing size of a sparkline, in SVG units (= CSS pixels at the size we draw them).
const WIDTH: f64 = 120.0;
const HEIGHT: f64 = 24.0;

/// What the four charts show, in the order the page shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    Cpu,
    Memory,
    Disk,
    SyncLag,
}

impl Series {
    pub const ALL: [Series; 4] = [Series::Cpu, Series::Memory, Series::Disk, Series::SyncLag];

    /// The name in `data-series` (tests and style find charts by it).
    pub fn name(self) -> &'static str {
        match self {
            Series::Cpu => "cpu",
            Series::Memory => "memory",
            Series::Disk => "disk",
            Series::SyncLag => "sync-lag",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Series::Cpu => "CPU",
            Series::Memory => "Memory",
            Series::Disk => "Disk",
            Series::SyncLag => "Sync lag",
        }
    }

    fn value(self, sample: &HealthSample) -> Option<f64> {
        match self {
            Series::Cpu => Some(sample.cpu_load),
            Series::Memory => sample.memory_used,
            Series::Disk => sample.disk_used,
            Series::SyncLag => sample.sync_lag_ms.map(|ms| ms as f64 / 1000.0),
        }
    }

    /// The value in words, for the caption.
    fn show(self, value: Option<f64>) -> String {
        match (self, value) {
            (_, None) => "–".to_owned(),
            (Series::SyncLag, Some(s)) => format!("{} s", s.round()),
            (_, Some(fraction)) => format!("{:.0} %", fraction * 100.0),
        }
    }

    /// The top of the chart: fractions against 100 % (CPU load may go past it, and then the
    /// chart scales to its peak), a lag against its peak (at least 1 s).
    fn top(values: &[Option<f64>]) -> f64 {
        values.iter().flatten().copied().fold(0.0, f64::max).max(1.0)
    }
}

/// The polylines of `values` (oldest first), right-aligned so the newest is at the right edge
/// and a rack heard from only recently fills the chart from the right; a missing value breaks
/// the line. Each slot is one of [`HEALTH_SAMPLES_MAX`] samples.
pub fn polylines(values: &[Option<f64>], top: f64) -> Vec<String> {
    let slots = HEALTH_SAMPLES_MAX.max(values.len());
    let step = WIDTH / (slots - 1).max(1) as f64;
    let first_slot = slots - values.len();
    let mut lines = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for (i, value) in values.iter().enumerate() {
        match value {
            Some(v) => {
                let x = (first_slot + i) as f64 * step;
                let y = HEIGHT - (v / top).clamp(0.0, 1.0) * HEIGHT;
                current.push(format!("{x:.1},{y:.1}"));
            }
            None if !current.is_empty() => lines.push(std::mem::take(&mut current).join(" ")),
            None => {}
        }
    }
    if !current.is_empty() {
        lines.push(current.join(" "));
    }
    lines
}

/// One series of a rack's samples as a captioned sparkline.
pub fn sparkline(series: Series, samples: &[HealthSample]) -> Markup {
    let values: Vec<Option<f64>> = samples.iter().map(|s| series.value(s)).collect();
    let latest = values.last().copied().flatten();
    let caption = format!("{} {}", series.label(), series.show(latest));
    let lines = polylines(&values, Series::top(&values));
    // A single sample draws a dot: a polyline of one point shows nothing.
    html! {
        figure.spark data-series=(series.name()) data-samples=(values.len()) {
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width=(WIDTH) height=(HEIGHT) role="img" aria-label=(caption) {
                title { (caption) }
                line.baseline x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
                @for points in &lines {
                    @if points.contains(' ') { polyline points=(points) {} }
                    @else { @let (x, y) = points.split_once(',').unwrap_or(("0", "0")); circle cx=(x) cy=(y) r="1.5" {} }
                }
            }
            figcaption { (caption) }
        }
    }
}

/// The four charts of a rack.
pub fn rack_charts(samples: &[HealthSample]) -> Markup {
    html! {
        div.sparks {
            @if samples.is_empty() { span.muted { "no heartbeat since the region started" } }
            @else { @for series in Series::ALL { (sparkline(series, samples)) } }
        }
    }
}

/// What the charts show, for the page.
pub fn explanation(heartbeat_interval_ms: u64) -> Markup {
    let span_s = (HEALTH_SAMPLES_MAX as u64 * heartbeat_interval_ms).div_ceil(1000);
    let span = if span_s < 120 { format!("{span_s} s") } else { format!("{} min", span_s.div_ceil(60)) };
    html! {
        p.hint id="charts-explained" {
            "Charts: each rack's last " (HEALTH_SAMPLES_MAX) " heartbeats (about " (span)
            ") since the region started. "
            "CPU is the one-minute load per core; memory is the part not available to new work "
            "(MemTotal − MemAvailable); disk is the rack's data disk in use. "
            strong { "Sync lag" } " is how long the rack's image snapshot has been behind the catalogue: 0 while it "
            "was built from the catalogue's current revision, otherwise the time since the first heartbeat that "
            "showed it behind (it grows while a sync waits for its delay, its window or an operator)."
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_right_aligned_scaled_and_broken_where_missing() {
        let lines = polylines(&[Some(0.0), Some(1.0), None, Some(0.5)], 1.0);
        let step = WIDTH / (HEALTH_SAMPLES_MAX - 1) as f64;
        let slot = |i: usize| format!("{:.1}", (HEALTH_SAMPLES_MAX - 4 + i) as f64 * step);
        assert_eq!(lines, vec![format!("{},24.0 {},0.0", slot(0), slot(1)), format!("{},12.0", slot(3))]);
        assert_eq!(lines[1].split(',').next().unwrap(), format!("{WIDTH:.1}"), "the newest is at the right edge");
    }

    #[test]
    fn values_over_the_top_are_clamped_and_nothing_gives_no_line() {
        assert_eq!(polylines(&[Some(3.0)], 1.0), vec![format!("{WIDTH:.1},0.0")]);
        assert!(polylines(&[None, None], 1.0).is_empty());
    }

    #[test]
    fn a_chart_captions_its_latest_value() {
        let sample = HealthSample {
            at_ms: 0,
            cpu_load: 0.25,
            memory_used: Some(0.5),
            disk_used: None,
            sync_lag_ms: Some(12_400),
        };
        let html = rack_charts(&[sample, sample]).into_string();
        assert!(html.contains("<figcaption>CPU 25 %</figcaption>"), "{html}");
        assert!(html.contains("<figcaption>Memory 50 %</figcaption>"), "{html}");
        assert!(html.contains("<figcaption>Disk –</figcaption>"), "{html}");
        assert!(html.contains("<figcaption>Sync lag 12 s</figcaption>"), "{html}");
        assert_eq!(html.matches("<polyline").count(), 3, "{html}");
        assert!(!html.contains("style="), "no inline style: the CSP forbids it");
    }
}
