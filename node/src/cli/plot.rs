//! Minimal SVG line charts for `murmur cluster` and `murmur chaos`: no
//! plotting dependency, just axes, ticks, one polyline per series and
//! shaded bands (chaos's fault windows).

use std::fmt::Write;

/// One named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A shaded stretch of the x axis, labelled.
#[derive(Debug, Clone)]
pub struct Band {
    pub from: f64,
    pub to: f64,
    pub label: String,
}

const W: f64 = 480.0;
const H: f64 = 320.0;
const M: f64 = 50.0;
const COLORS: [&str; 8] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Panels side by side in one SVG document.
pub fn svg(panels: &[(String, String, String, Vec<Series>)]) -> String {
    svg_banded(panels, &[])
}

/// Panels in rows of at most three, each with the same bands shaded
/// behind its lines.
pub fn svg_banded(panels: &[(String, String, String, Vec<Series>)], bands: &[Band]) -> String {
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols).max(1);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        W * cols as f64,
        H * rows as f64
    );
    for (i, (title, xl, yl, series)) in panels.iter().enumerate() {
        let (x, y) = (W * (i % cols) as f64, H * (i / cols) as f64);
        let _ = write!(out, r#"<g transform="translate({x},{y})">"#);
        panel(&mut out, title, xl, yl, series, bands);
        out.push_str("</g>");
    }
    out.push_str("</svg>\n");
    out
}

fn panel(out: &mut String, title: &str, xl: &str, yl: &str, series: &[Series], bands: &[Band]) {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| M + (x - x0) / (x1 - x0) * (W - 2.0 * M);
    let sy = |y: f64| H - M - (y - y0) / (y1 - y0) * (H - 2.0 * M);
    for (k, b) in bands.iter().enumerate() {
        let (a, z) = (sx(b.from.clamp(x0, x1)), sx(b.to.clamp(x0, x1)));
        let _ = write!(
            out,
            r##"<rect x="{a:.1}" y="{M}" width="{:.1}" height="{}" fill="#d62728" fill-opacity="0.12"/><text x="{:.1}" y="{}" font-size="9" fill="#a00">{}</text>"##,
            (z - a).max(1.0),
            H - 2.0 * M,
            a + 2.0,
            M + 10.0 + 10.0 * (k % 4) as f64,
            escape(&b.label)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="13">{title}</text>"#,
        W / 2.0
    );
    let _ = write!(
        out,
        r##"<line x1="{M}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{M}" y1="{M}" x2="{M}" y2="{}" stroke="#333"/>"##,
        H - M,
        W - M,
        H - M,
        H - M
    );
    for k in 0..=4 {
        let (fx, fy) = (x0 + (x1 - x0) * k as f64 / 4.0, y0 + (y1 - y0) * k as f64 / 4.0);
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(fx),
            H - M + 15.0,
            tick(fx)
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            M - 4.0,
            sy(fy) + 4.0,
            tick(fy)
        );
    }
    let _ =
        write!(out, r#"<text x="{}" y="{}" text-anchor="middle">{xl}</text>"#, W / 2.0, H - 12.0);
    let _ = write!(
        out,
        r#"<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{yl}</text>"#,
        H / 2.0,
        H / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> =
            s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
            W - M + 4.0,
            M + 12.0 * i as f64,
            s.name
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() { format!("{v:.0}") } else { format!("{v:.2}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_each_series_as_a_polyline() {
        let s = vec![
            Series { name: "a".into(), points: vec![(0.0, 0.1), (1.0, 0.5), (2.0, 0.9)] },
            Series { name: "b".into(), points: vec![(0.0, 0.2)] },
        ];
        let doc = svg(&[("t".into(), "x".into(), "y".into(), s)]);
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        // The lowest point sits on the x axis, the highest at the top margin.
        assert!(doc.contains(&format!("{:.1},{:.1}", M, H - M)), "{doc}");
        assert!(doc.contains(&format!("{:.1},{:.1}", W - M, M)), "{doc}");
    }

    #[test]
    fn bands_are_shaded_where_they_fall_and_labelled() {
        let s = vec![Series { name: "a".into(), points: vec![(0.0, 0.0), (10.0, 1.0)] }];
        let band = Band { from: 5.0, to: 10.0, label: "kill <2>".into() };
        let doc = svg_banded(&[("t".into(), "x".into(), "y".into(), s)], &[band]);
        assert_eq!(doc.matches("<rect").count(), 1);
        // From the middle of the x axis to its end.
        let mid = M + (W - 2.0 * M) / 2.0;
        assert!(
            doc.contains(&format!(r#"<rect x="{mid:.1}" y="{M}" width="{:.1}""#, mid - M)),
            "{doc}"
        );
        assert!(doc.contains("kill &lt;2&gt;"));
    }
}
