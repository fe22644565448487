//! Medians, spread and ratios of interleaved samples.

/// Summary of one side's samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub q1: f64,
    pub q3: f64,
}

/// The `q` quantile (0..=1) of sorted values, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Summarise samples (NaNs, i.e. failed runs, are dropped).
pub fn summarize(samples: &[f64]) -> Summary {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    Summary {
        median: quantile(&v, 0.5),
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
        q1: quantile(&v, 0.25),
        q3: quantile(&v, 0.75),
    }
}

/// Per-round `f(a, b)` of two interleaved sides (same round index), summarised.
pub fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Summary {
    let v: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    summarize(&v)
}

/// A number for a table: 3 significant-ish digits, `n/a` when missing.
pub fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `median (min–max)`.
pub fn fmt_spread(s: &Summary) -> String {
    format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max))
}
