//! Pretraining data throughput: the loader alone (decode, temporal partner,
//! two geometric views per pair, stacking), no model. It tells how many
//! loader threads a device needs: the GPU target of 3,300 pairs/s end to end
//! needs the loader to deliver at least that.
//!
//! `cargo bench -p geossl-trainer --bench loader -- --manifest CHIPS.csv [--size 224 --batch 256 --tp-resize 448 --workers 1,2 --batches 8 --cache-mib 0 --report FILE]`
//!
//! The manifest is a pretraining manifest of real chips (e.g. from
//! `geossl-train chips`); `--cache-mib 0` decodes every image every time, as
//! an archive larger than memory would.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use geossl_trainer::augment::AugConfig;
use geossl_trainer::data::{read_manifest, Format, TemporalIndex};
use geossl_trainer::loader::{Loader, LoaderConfig};

struct Args {
    manifest: PathBuf,
    size: i64,
    batch: usize,
    tp_resize: Option<usize>,
    workers: Vec<usize>,
    batches: u64,
    cache_mib: usize,
    report: Option<PathBuf>,
}

fn parse() -> Args {
    let mut a = Args {
        manifest: PathBuf::new(),
        size: 224,
        batch: 256,
        tp_resize: Some(448),
        workers: vec![1, 2],
        batches: 8,
        cache_mib: 0,
        report: None,
    };
    // The repository root: at run time when set (a binary carried to another host), else where it was built.
    let root = std::env::var_os("GEOSSL_ROOT").map_or_else(|| PathBuf::from(env!("GEOSSL_ROOT")), PathBuf::from);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            // Paths relative to the repository root (cargo runs benches in the package folder).
            "--manifest" => a.manifest = root.join(v()),
            "--size" => a.size = v().parse().expect("--size"),
            "--batch" => a.batch = v().parse().expect("--batch"),
            "--tp-resize" => a.tp_resize = Some(v().parse().expect("--tp-resize")).filter(|&r| r > 0),
            "--workers" => a.workers = v().split(',').map(|w| w.parse().expect("--workers")).collect(),
            "--batches" => a.batches = v().parse().expect("--batches"),
            "--cache-mib" => a.cache_mib = v().parse().expect("--cache-mib"),
            "--report" => a.report = Some(root.join(v())),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!a.manifest.as_os_str().is_empty(), "--manifest CHIPS.csv is required");
    a
}

fn main() {
    let a = parse();
    let samples = read_manifest(&a.manifest, Format::Csv).unwrap_or_else(|e| panic!("{e}"));
    let index = TemporalIndex::new(&samples);
    assert!(samples.len() >= a.batch, "{} samples for batch {}", samples.len(), a.batch);
    let cpu = common::cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{} samples, {} locations, partner coverage {:.2}; {cores} cores ({cpu})",
        samples.len(),
        index.num_locations(),
        index.partner_coverage(&samples)
    );
    let mut rows = Vec::new();
    for &workers in &a.workers {
        let cfg = LoaderConfig {
            batch_size: a.batch,
            input_size: a.size,
            bands: geossl_trainer::image_io::positional(3),
            temporal: true,
            seed: 0,
            workers,
            prefetch: 2,
            cache_bytes: a.cache_mib << 20,
            aug: AugConfig { tp_resize: a.tp_resize, ..AugConfig::default() },
            rank: 0,
            world: 1,
        };
        // Timed from the start: batches prefetched during a warm-up would be counted for free.
        let t = Instant::now();
        let mut loader = Loader::start(samples.clone(), index.clone(), vec![0; samples.len()], cfg, 0, a.batches);
        let mut partners = 0;
        for _ in 0..a.batches {
            let b = loader.next_batch().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(b.q.size(), [a.batch as i64, 3, a.size, a.size]);
            partners += b.with_partner;
        }
        let secs = t.elapsed().as_secs_f64();
        let pairs = (a.batches as usize * a.batch) as f64 / secs;
        let share = partners as f64 / (a.batches as usize * a.batch) as f64;
        println!(
            "workers {workers}: {pairs:.1} pairs/s ({:.1} per worker), temporal partner share {share:.2}",
            pairs / workers as f64
        );
        rows.push((workers, pairs));
    }
    if let Some(path) = &a.report {
        use std::io::Write;
        let when = common::utc_now();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("report file");
        for (workers, pairs) in rows {
            let line = format!(
                "| {when} | {cores} × {cpu} | {}×{}, tp_resize {} | batch {} | cache {} MiB | {workers} | {pairs:.1} | {:.1} | {:.0} |",
                a.size,
                a.size,
                a.tp_resize.map_or_else(|| "off".to_string(), |r| r.to_string()),
                a.batch,
                a.cache_mib,
                pairs / workers as f64,
                (3300.0 / (pairs / workers as f64)).ceil()
            );
            writeln!(f, "{line}").expect("write report");
        }
    }
}
