//! Training curves as one picture: `geossl-train plot RUN_DIR…` reads each run's `metrics.jsonl` and draws
//! loss, positive top-1, geo top-1, learning rate, alignment and the health measures (see [`crate::health`])
//! against the step, one panel per measure and one colour per run, so runs can be compared by eye.
//!
//! Drawing is plotters' (bitmap backend into a buffer, text by ab_glyph with the embedded DejaVu Sans Mono,
//! so a machine without fonts draws the same picture); the PNG is encoded by `image` and written atomically,
//! so an earlier picture is replaced whole or not at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::pretrain::METRICS_FILE;

/// The measures drawn, in panel order: the key in a `metrics.jsonl` record (`a.b` for a nested field) and
/// the panel's title. A measure no run recorded gets no panel.
pub const PANELS: &[(&str, &str)] = &[
    ("loss", "loss"),
    ("positive_top1", "positive top-1"),
    ("geo_top1", "geo top-1"),
    ("lr", "learning rate"),
    ("alignment", "alignment (lower: positives closer)"),
    ("health.std", "embedding std x sqrt(D) (0: collapsed)"),
    ("health.effective_rank", "effective rank"),
    ("health.uniformity", "uniformity (lower: more uniform)"),
    ("health.mean_cosine", "mean pairwise cosine (1: collapsed)"),
];

/// One colour per run, in the order the runs are given (Tableau 10; runs beyond ten reuse them).
pub const COLOURS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// What can go wrong reading runs or drawing them.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("no run directories given")]
    NoRuns,
    #[error("reading {path} (a run directory holds the metrics.jsonl `geossl-train pretrain` writes)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: not a JSON record")]
    Parse { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("{path} line {line}: the record has no numeric \"step\"")]
    NoStep { path: PathBuf, line: usize },
    #[error("{path} has no steps yet: nothing to draw")]
    Empty { path: PathBuf },
    #[error("the picture must be at least 320 × 240 pixels, not {0} × {1}")]
    TooSmall(u32, u32),
    #[error("drawing the curves: {0}")]
    Draw(String),
    #[error("writing {path}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// One run's curves: for each measure of [`PANELS`] it recorded, `(step, value)` in step order. A step
/// logged twice (a resumed run repeats the steps after its last checkpoint) keeps its last value.
#[derive(Debug, Clone)]
pub struct RunCurves {
    /// The legend's name: the run directory's name (its path when two runs share a name).
    pub name: String,
    pub curves: BTreeMap<&'static str, Vec<(f64, f64)>>,
}

/// Reads `dir/metrics.jsonl`.
pub fn read_run(dir: &Path) -> Result<RunCurves, PlotError> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| PlotError::Read { path: path.clone(), source })?;
    let mut by_key: BTreeMap<&'static str, BTreeMap<u64, f64>> = BTreeMap::new();
    let mut steps = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: serde_json::Value = serde_json::from_str(line).map_err(|source| PlotError::Parse {
            path: path.clone(),
            line: i + 1,
            source,
        })?;
        let step =
            rec.get("step").and_then(|s| s.as_u64()).ok_or(PlotError::NoStep { path: path.clone(), line: i + 1 })?;
        steps += 1;
        for (key, _) in PANELS {
            let v = key.split('.').try_fold(&rec, |v, k| v.get(k)).and_then(|v| v.as_f64());
            if let Some(v) = v.filter(|v| v.is_finite()) {
                by_key.entry(key).or_default().insert(step, v);
            }
        }
    }
    if steps == 0 {
        return Err(PlotError::Empty { path });
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    let curves = by_key.into_iter().map(|(k, m)| (k, m.into_iter().map(|(s, v)| (s as f64, v)).collect())).collect();
    Ok(RunCurves { name, curves })
}

/// Reads every run directory; runs whose directory names repeat are named by their paths.
pub fn read_runs(dirs: &[PathBuf]) -> Result<Vec<RunCurves>, PlotError> {
    if dirs.is_empty() {
        return Err(PlotError::NoRuns);
    }
    let mut runs = dirs.iter().map(|d| read_run(d)).collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (r, d) in runs.iter_mut().zip(dirs) {
        if names.iter().filter(|n| **n == r.name).count() > 1 {
            r.name = d.display().to_string();
        }
    }
    Ok(runs)
}

/// What was drawn: the panels (keys of [`PANELS`]) and each run's colour.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub panels: Vec<&'static str>,
    pub colours: Vec<(String, (u8, u8, u8))>,
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is embedded at compile time and known to parse; a failure here is a build defect.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::error!("the embedded font did not parse: the picture will have no text");
        }
    });
}

/// Draws `runs` into a `width × height` PNG at `out` (replacing it whole): panels in a grid three wide.
pub fn plot(runs: &[RunCurves], out: &Path, width: u32, height: u32) -> Result<Drawn, PlotError> {
    if runs.is_empty() {
        return Err(PlotError::NoRuns);
    }
    if width < 320 || height < 240 {
        return Err(PlotError::TooSmall(width, height));
    }
    register_font();
    let panels: Vec<(&'static str, &'static str)> = PANELS
        .iter()
        .copied()
        .filter(|(k, _)| runs.iter().any(|r| r.curves.get(k).is_some_and(|c| !c.is_empty())))
        .collect();
    let colours: Vec<(String, (u8, u8, u8))> =
        runs.iter().enumerate().map(|(i, r)| (r.name.clone(), COLOURS[i % COLOURS.len()])).collect();
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let cols = panels.len().clamp(1, 3);
        let rows = panels.len().div_ceil(cols).max(1);
        let areas = root.split_evenly((rows, cols));
        for ((key, title), area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, key, title, runs, &colours, key == &panels[0].0)?;
        }
        root.present().map_err(draw_err)?;
    }
    let img = image::RgbImage::from_raw(width, height, buf).ok_or_else(|| PlotError::Draw("buffer size".into()))?;
    write_png(&img, out)?;
    Ok(Drawn { panels: panels.iter().map(|(k, _)| *k).collect(), colours })
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    key: &str,
    title: &str,
    runs: &[RunCurves],
    colours: &[(String, (u8, u8, u8))],
    legend: bool,
) -> Result<(), PlotError> {
    let points = runs.iter().filter_map(|r| r.curves.get(key)).flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { (y1 - y0) * 0.05 } else { y0.abs().max(1.0) * 0.05 };
    let (y0, y1) = (y0 - pad, y1 + pad);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_labels(5)
        .y_labels(5)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| tick(*y))
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    for (run, (name, (r, g, b))) in runs.iter().zip(colours) {
        let Some(c) = run.curves.get(key) else { continue };
        let colour = RGBColor(*r, *g, *b);
        // Sparse measures (the health ones, every `run.health_every` steps) are seen as points too.
        if c.len() <= 60 {
            chart.draw_series(c.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(draw_err)?;
        }
        let series = chart.draw_series(LineSeries::new(c.iter().copied(), colour.stroke_width(2))).map_err(draw_err)?;
        if legend {
            series
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(3)));
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// A tick label short enough for the axis: plain for ordinary magnitudes, scientific otherwise.
fn tick(y: f64) -> String {
    let a = y.abs();
    if a == 0.0 || (1e-2..1e4).contains(&a) {
        let s = format!("{y:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{y:.1e}")
    }
}

fn write_png(img: &image::RgbImage, out: &Path) -> Result<(), PlotError> {
    let werr = |source| PlotError::Write { path: out.to_path_buf(), source };
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| werr(std::io::Error::other(e)))?;
    geossl_models::weights::write_atomic(out, &png).map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(lines: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(METRICS_FILE), lines.join("\n")).unwrap();
        d
    }

    #[test]
    fn nested_measures_nulls_and_repeated_steps() {
        let d = run_dir(&[
            r#"{"step":1,"loss":5.0,"geo_top1":null,"lr":0.1}"#,
            r#"{"step":2,"loss":4.0,"geo_top1":null,"lr":0.1,"health":{"std":0.5,"effective_rank":12.0}}"#,
            r#"{"step":2,"loss":3.5,"geo_top1":null,"lr":0.1}"#,
        ]);
        let r = read_run(d.path()).unwrap();
        assert_eq!(r.curves["loss"], vec![(1.0, 5.0), (2.0, 3.5)]);
        assert_eq!(r.curves["health.effective_rank"], vec![(2.0, 12.0)]);
        assert!(!r.curves.contains_key("geo_top1"));
    }

    #[test]
    fn bad_records_are_named_by_line() {
        let d = run_dir(&[r#"{"step":1,"loss":5.0}"#, "{oops"]);
        let e = read_run(d.path()).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("metrics.jsonl"), "{e}");
        let d = run_dir(&[r#"{"loss":5.0}"#]);
        assert!(read_run(d.path()).unwrap_err().to_string().contains("no numeric \"step\""));
        let d = run_dir(&[]);
        assert!(read_run(d.path()).unwrap_err().to_string().contains("no steps yet"));
        let e = read_run(Path::new("/nonexistent-run")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent-run/metrics.jsonl") && e.contains("geossl-train pretrain"), "{e}");
    }

    fn pixels_of(img: &image::RgbImage, (r, g, b): (u8, u8, u8)) -> usize {
        img.pixels().filter(|p| p.0 == [r, g, b]).count()
    }

    #[test]
    fn each_run_is_drawn_in_its_colour_and_only_recorded_measures_get_panels() {
        let curve = |f: fn(f64) -> f64| (0..50).map(|s| (s as f64, f(s as f64))).collect::<Vec<_>>();
        let mut a = RunCurves { name: "a".into(), curves: BTreeMap::new() };
        a.curves.insert("loss", curve(|s| 8.0 - s * 0.1));
        a.curves.insert("health.effective_rank", curve(|s| 10.0 + s));
        let mut b = RunCurves { name: "b".into(), curves: BTreeMap::new() };
        b.curves.insert("loss", curve(|s| 8.0 - s * 0.05));
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("sub/curves.png");
        let drawn = plot(&[a.clone(), b], &out, 900, 400).unwrap();
        assert_eq!(drawn.panels, vec!["loss", "health.effective_rank"]);
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (900, 400));
        // Both runs' lines (2 px wide over most of a panel) are there in their own colours; a colour no run
        // has is not; text was drawn (dark anti-aliased pixels beyond the axes' pure black).
        assert!(pixels_of(&img, COLOURS[0]) > 400, "{}", pixels_of(&img, COLOURS[0]));
        assert!(pixels_of(&img, COLOURS[1]) > 200, "{}", pixels_of(&img, COLOURS[1]));
        assert_eq!(pixels_of(&img, COLOURS[2]), 0);
        let grey_text =
            img.pixels().filter(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2] && (30..200).contains(&p.0[0])).count();
        assert!(grey_text > 100, "no text drawn ({grey_text} grey pixels)");
        // Run b has no effective rank: the second panel holds only a's colour.
        let right = image::imageops::crop_imm(&img, 450, 0, 450, 400).to_image();
        assert!(pixels_of(&right, COLOURS[0]) > 200);
        assert_eq!(pixels_of(&right, COLOURS[1]), 0);
        assert!(matches!(plot(&[a.clone()], &out, 100, 100), Err(PlotError::TooSmall(100, 100))));
        assert!(matches!(plot(&[], &out, 900, 400), Err(PlotError::NoRuns)));
        let left: Vec<_> = std::fs::read_dir(d.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("curves.png")], "no temporary file left");
    }

    #[test]
    fn runs_that_share_a_name_are_named_by_their_paths() {
        let line = [r#"{"step":1,"loss":5.0}"#];
        let (a, b) = (run_dir(&line), run_dir(&line));
        let (ra, rb, rc) = (a.path().join("run"), b.path().join("run"), b.path().join("other"));
        for d in [&ra, &rb, &rc] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join(METRICS_FILE), line[0]).unwrap();
        }
        let runs = read_runs(&[ra.clone(), rb.clone(), rc]).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec![ra.to_str().unwrap(), rb.to_str().unwrap(), "other"]);
    }

    #[test]
    fn ticks_stay_short() {
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(3.0), "3");
        assert_eq!(tick(0.0003), "3.0e-4");
        assert_eq!(tick(0.0), "0");
    }
}
