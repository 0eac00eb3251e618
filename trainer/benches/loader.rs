//! Pretraining data throughput: the loader alone (decode, temporal partner,
//! two geometric views per pair, stacking), no model. It tells how many
//! loader threads a device needs: the GPU target of 3,300 pairs/s end to end
//! needs the loader to deliver at least that.
//!
//! `cargo bench -p geossl-trainer --bench loader -- --manifest CHIPS.csv [--pack PACK --modes files,pack-loader,pack-device --rounds 3 --device cpu --size 224 --batch 256 --tp-resize 448 --workers 1,2 --batches 8 --cache-mib 0 --report FILE]`
//!
//! Each run reports pairs/s delivered with the views ready on `--device` and the CPU seconds per pair of
//! the whole process (every loader thread, and the device-side crop where the device is the CPU).
//!
//! The manifest is a pretraining manifest of real chips (e.g. from
//! `geossl-train chips`); `--cache-mib 0` decodes every image every time, as
//! an archive larger than memory would.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use geossl_tests::server::process_cpu_seconds;
use geossl_trainer::augment::AugConfig;
use geossl_trainer::data::{read_manifest, Format, TemporalIndex};
use geossl_trainer::loader::{Loader, LoaderConfig};
use geossl_trainer::pack::Pack;

struct Args {
    manifest: PathBuf,
    pack: Option<PathBuf>,
    modes: Vec<Mode>,
    size: i64,
    batch: usize,
    tp_resize: Option<usize>,
    workers: Vec<usize>,
    batches: u64,
    rounds: usize,
    cache_mib: usize,
    device: String,
    report: Option<PathBuf>,
}

/// What feeds the step: image files cut on the loader threads (today's default), a pack cut on the loader
/// threads, or a pack whose raw chips are cut on the device.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Files,
    PackLoader,
    PackDevice,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Files => "files, views cut by the loader",
            Mode::PackLoader => "pack, views cut by the loader",
            Mode::PackDevice => "pack, views cut on the device",
        }
    }
}

fn parse() -> Args {
    let mut a = Args {
        manifest: PathBuf::new(),
        pack: None,
        modes: vec![Mode::Files],
        size: 224,
        batch: 256,
        tp_resize: Some(448),
        workers: vec![1, 2],
        batches: 8,
        rounds: 1,
        cache_mib: 0,
        device: "cpu".into(),
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
            "--pack" => a.pack = Some(root.join(v())),
            "--modes" => {
                a.modes = v()
                    .split(',')
                    .map(|m| match m {
                        "files" => Mode::Files,
                        "pack-loader" => Mode::PackLoader,
                        "pack-device" => Mode::PackDevice,
                        o => panic!("--modes: {o} is not files, pack-loader or pack-device"),
                    })
                    .collect()
            }
            "--size" => a.size = v().parse().expect("--size"),
            "--batch" => a.batch = v().parse().expect("--batch"),
            "--tp-resize" => a.tp_resize = Some(v().parse().expect("--tp-resize")).filter(|&r| r > 0),
            "--workers" => a.workers = v().split(',').map(|w| w.parse().expect("--workers")).collect(),
            "--batches" => a.batches = v().parse().expect("--batches"),
            "--rounds" => a.rounds = v().parse().expect("--rounds"),
            "--cache-mib" => a.cache_mib = v().parse().expect("--cache-mib"),
            "--device" => a.device = v(),
            "--report" => a.report = Some(root.join(v())),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!a.manifest.as_os_str().is_empty(), "--manifest CHIPS.csv is required");
    assert!(
        a.pack.is_some() || a.modes == [Mode::Files],
        "--modes pack-loader/pack-device need --pack PACK (geossl-train pack --data CHIPS.csv --out PACK)"
    );
    a
}

struct Row {
    round: usize,
    mode: Mode,
    workers: usize,
    pairs_per_s: f64,
    cpu_ms_per_pair: f64,
}

fn main() {
    let a = parse();
    let dev = geossl_trainer::device::parse_device(&a.device).unwrap_or_else(|e| panic!("{e}"));
    let samples = read_manifest(&a.manifest, Format::Csv).unwrap_or_else(|e| panic!("{e}"));
    let pack = a.pack.as_ref().map(|p| Pack::open(p).unwrap_or_else(|e| panic!("{e}")));
    if let Some(p) = &pack {
        // The pack must hold the manifest's chips in its order: then every mode draws the same pairs and crops.
        let ps = p.samples();
        assert_eq!(ps.len(), samples.len(), "the pack and the manifest hold different chips");
        assert!(ps.iter().zip(&samples).all(|(x, y)| x.location_id == y.location_id && x.timestamp == y.timestamp));
    }
    let index = TemporalIndex::new(&samples);
    assert!(samples.len() >= a.batch, "{} samples for batch {}", samples.len(), a.batch);
    let cpu = common::cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{} samples, {} locations, partner coverage {:.2}; {cores} cores ({cpu}); device {:?}",
        samples.len(),
        index.num_locations(),
        index.partner_coverage(&samples),
        dev
    );
    let mut rows = Vec::new();
    // Rounds alternate the modes (A, B, C, A, B, C, …) so the machine's drift hits each alike.
    for round in 0..a.rounds {
        for &workers in &a.workers {
            for &mode in &a.modes {
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
                    pack: if mode == Mode::Files { None } else { pack.clone() },
                    device_crop: mode == Mode::PackDevice,
                };
                // Timed from the start: batches prefetched during a warm-up would be counted for free. The
                // views are made ready on the device (for a pack cut there, the crop runs here, counted).
                let (t, c0) = (Instant::now(), process_cpu_seconds("self"));
                let mut loader =
                    Loader::start(samples.clone(), index.clone(), vec![0; samples.len()], cfg, 0, a.batches);
                let mut partners = 0;
                for _ in 0..a.batches {
                    let b = loader.next_batch().unwrap_or_else(|e| panic!("{e}"));
                    // As the step takes them: each side's views made on the device and used once.
                    for side in [&b.q, &b.k] {
                        let size = side.with_device(dev, a.size, |v| v.size());
                        assert_eq!(size, [a.batch as i64, 3, a.size, a.size]);
                    }
                    if let tch::Device::Cuda(_) = dev {
                        tch::Cuda::synchronize(0);
                    }
                    partners += b.with_partner;
                }
                let (secs, cpu_s) = (t.elapsed().as_secs_f64(), process_cpu_seconds("self") - c0);
                let n = (a.batches as usize * a.batch) as f64;
                let share = partners as f64 / n;
                let row = Row { round, mode, workers, pairs_per_s: n / secs, cpu_ms_per_pair: cpu_s * 1e3 / n };
                println!(
                    "round {round} {:<32} workers {workers}: {:.1} pairs/s, {:.3} CPU-ms per pair, temporal partner share {share:.2}",
                    mode.name(),
                    row.pairs_per_s,
                    row.cpu_ms_per_pair
                );
                rows.push(row);
            }
        }
    }
    if let Some(path) = &a.report {
        use std::io::Write;
        let when = common::utc_now();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("report file");
        for r in rows {
            let line = format!(
                "| {when} | {cores} × {cpu} | {:?} | {} | {}×{}, tp_resize {} | batch {} | {} | round {} | {:.1} | {:.3} |",
                dev,
                r.mode.name(),
                a.size,
                a.size,
                a.tp_resize.map_or_else(|| "off".to_string(), |r| r.to_string()),
                a.batch,
                r.workers,
                r.round,
                r.pairs_per_s,
                r.cpu_ms_per_pair,
            );
            writeln!(f, "{line}").expect("write report");
        }
    }
}
