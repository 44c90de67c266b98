//! `plot.png`: the server's RSS, CPU and connected calls over the run, and the
//! distribution of pacing error.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use crate::stats::{CallReport, Sample, percentile};

/// A system font for labels (plotters' bitmap backend has none of its own).
const FONTS: [&str; 2] = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

fn register_font() -> Result<()> {
    let bytes = FONTS.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| anyhow!("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)"))?;
    // Registered once per process; the bytes live as long as it does.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow!("the font did not load"))
}

/// Draws the run's plot to `path`.
pub fn draw(path: &Path, samples: &[Sample], reports: &[CallReport], title: &str) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(|e| anyhow!("{e:?}"))?;
    let panels = root.split_evenly((2, 2));
    let t_max = samples.last().map(|s| s.t_s).unwrap_or(1.0).max(1.0);
    type Series = (&'static str, fn(&Sample) -> f64, RGBColor);
    let series: [Series; 3] = [
        ("server RSS (MB)", |s| s.rss_mb, BLUE),
        ("server CPU (% of a core)", |s| s.cpu_pct, RED),
        ("connected calls", |s| s.calls as f64, GREEN),
    ];
    for (panel, (name, value, color)) in panels.iter().zip(series) {
        let y_max = samples.iter().map(value).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| anyhow!("{e:?}"))?;
        chart.configure_mesh().x_desc("seconds").draw().map_err(|e| anyhow!("{e:?}"))?;
        chart.draw_series(LineSeries::new(samples.iter().map(|s| (s.t_s, value(s))), color)).map_err(|e| anyhow!("{e:?}"))?;
    }
    // Pacing error: the share of frames later than x ms (a survival curve).
    let late: Vec<f64> = reports.iter().flat_map(|r| r.late_all.iter().copied()).collect();
    let x_max = percentile(&late, 100.0).max(5.0);
    let mut chart = ChartBuilder::on(&panels[3])
        .caption("pacing error: frames later than x ms (%)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..100.0)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart.configure_mesh().x_desc("ms").draw().map_err(|e| anyhow!("{e:?}"))?;
    let n = late.len().max(1) as f64;
    let points: Vec<(f64, f64)> = (0..=100).map(|i| x_max * f64::from(i) / 100.0).map(|x| (x, late.iter().filter(|&&l| l > x).count() as f64 * 100.0 / n)).collect();
    chart.draw_series(LineSeries::new(points, &MAGENTA)).map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}")).with_context(|| format!("writing {}", path.display()))
}
