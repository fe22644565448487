//! SVG plots with plotters.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One horizontal bar: a median with its spread.
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub median: f64,
    pub lo: f64,
    pub hi: f64,
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("{err:?}")
}

/// Horizontal bars (median) with min–max whiskers, one per label.
pub fn bars(path: &Path, title: &str, x_desc: &str, bars: &[Bar]) -> Result<()> {
    let n = bars.len();
    let ends = || bars.iter().flat_map(|b| [b.lo, b.median, b.hi]).filter(|v| v.is_finite());
    let xmax = ends().fold(0.0, f64::max) * 1.1 + 1e-9;
    let xmin = ends().fold(0.0, f64::min) * 1.1;
    let root = SVGBackend::new(path, (900, 80 + 45 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(300)
        .build_cartesian_2d(xmin..xmax, -0.5f64..(n as f64 - 0.5))
        .map_err(e)?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                labels[n - 1 - i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc(x_desc)
        .draw()
        .map_err(e)?;
    for (k, b) in bars.iter().enumerate() {
        if !b.median.is_finite() {
            continue;
        }
        let y = (n - 1 - k) as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new([(0.0, y - 0.3), (b.median, y + 0.3)], BLUE.mix(0.5).filled())))
            .map_err(e)?;
        if b.lo.is_finite() && b.hi.is_finite() {
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(b.lo, y), (b.hi, y)], BLACK.stroke_width(2))))
                .map_err(e)?;
            for x in [b.lo, b.hi] {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x, y - 0.15), (x, y + 0.15)],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(e)?;
            }
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

/// One line per series over the same x values (log x), e.g. µs per decision against VMAs.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    xs: &[f64],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let finite = || series.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite() && *v > 0.0);
    let ymax = finite().fold(0.0, f64::max) * 1.3 + 1e-9;
    let ymin = finite().fold(f64::INFINITY, f64::min).min(ymax) * 0.7;
    let xmin = xs.iter().copied().fold(f64::INFINITY, f64::min) * 0.8;
    let xmax = xs.iter().copied().fold(0.0, f64::max) * 1.25;
    let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), (ymin.max(1e-9)..ymax).log_scale())
        .map_err(e)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(format!("{y_desc} (log scale)")).draw().map_err(e)?;
    for (i, (name, ys)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> =
            xs.iter().copied().zip(ys.iter().copied()).filter(|p| p.1.is_finite() && p.1 > 0.0).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(e)?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
