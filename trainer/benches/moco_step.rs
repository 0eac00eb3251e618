//! MoCo step throughput: geossl (tch) vs the identical step in PyTorch eager
//! (`scripts/reference/moco_step.py`, the venv's torch), same machine, same run.
//!
//! `cargo bench -p geossl-trainer --bench moco_step [-- --arch resnet50 --size 224 --batch 256 --queue 65536 --groups 8 --device cuda --amp [--amp-dtype bf16|fp16] --channels-last --report FILE]`
//!
//! Steps alternate between the two implementations (ABAB…) so load changes on
//! the machine hit both alike; the report gives the median of the rounds.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use geossl_models::Arch;
use geossl_trainer::amp::AmpDtype;
use geossl_trainer::config::PretrainConfig;
use geossl_trainer::moco::Moco;
use geossl_trainer::pretrain::run_spec;
use tch::{Device, Kind, Tensor};

struct Args {
    arch: Arch,
    size: i64,
    batch: i64,
    queue: usize,
    groups: usize,
    warmup: usize,
    steps: usize,
    rounds: usize,
    device: String,
    amp: bool,
    amp_dtype: AmpDtype,
    channels_last: bool,
    report: Option<PathBuf>,
}

fn parse() -> Args {
    let mut a = Args {
        arch: Arch::Resnet18,
        size: 64,
        batch: 32,
        queue: 4096,
        groups: 4,
        warmup: 2,
        steps: 6,
        rounds: 3,
        device: "cpu".into(),
        amp: false,
        amp_dtype: AmpDtype::Bf16,
        channels_last: false,
        report: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--arch" => a.arch = v().parse().unwrap_or_else(|e| panic!("{e}")),
            "--size" => a.size = v().parse().expect("--size"),
            "--batch" => a.batch = v().parse().expect("--batch"),
            "--queue" => a.queue = v().parse().expect("--queue"),
            "--groups" => a.groups = v().parse().expect("--groups"),
            "--warmup" => a.warmup = v().parse().expect("--warmup"),
            "--steps" => a.steps = v().parse().expect("--steps"),
            "--rounds" => a.rounds = v().parse().expect("--rounds"),
            "--device" => a.device = v(),
            "--amp" => a.amp = true,
            "--amp-dtype" => {
                a.amp_dtype = match v().as_str() {
                    "bf16" => AmpDtype::Bf16,
                    "fp16" => AmpDtype::Fp16,
                    o => panic!("--amp-dtype {o}: bf16 or fp16"),
                }
            }
            "--channels-last" => a.channels_last = true,
            // Relative to the repository root (cargo runs benches in the package folder).
            "--report" => a.report = Some(PathBuf::from(env!("GEOSSL_ROOT")).join(v())),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn ours(a: &Args) -> f64 {
    let (mut cfg, _) = PretrainConfig::load(std::path::Path::new("moco")).expect("preset");
    cfg.model.arch = a.arch;
    cfg.model.input_size = a.size as usize;
    cfg.moco.queue_size = a.queue;
    cfg.moco.shuffle_bn_groups = a.groups;
    cfg.moco.temperature = 0.2;
    cfg.optim.batch_size = a.batch as usize;
    cfg.run.amp = a.amp;
    cfg.run.amp_dtype = a.amp_dtype;
    cfg.run.channels_last = a.channels_last;
    let dev = geossl_trainer::device::parse_device(&a.device).expect("device");
    tch::manual_seed(0);
    let spec = run_spec(&cfg, None).expect("spec");
    let mut moco = Moco::new(&spec, &cfg, dev).expect("moco");
    let xq = Tensor::randn([a.batch, 3, a.size, a.size], (Kind::Float, dev));
    let xk = Tensor::randn([a.batch, 3, a.size, a.size], (Kind::Float, dev));
    for _ in 0..a.warmup {
        moco.step(&xq, &xk, None, 0.03).expect("a single-process step");
    }
    sync(dev);
    let t = Instant::now();
    for _ in 0..a.steps {
        moco.step(&xq, &xk, None, 0.03).expect("a single-process step");
    }
    sync(dev);
    a.steps as f64 / t.elapsed().as_secs_f64()
}

fn sync(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

fn reference(a: &Args) -> (f64, String) {
    let root = std::env::var("GEOSSL_ROOT").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("GEOSSL_ROOT")));
    let py = std::env::var("GEOSSL_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv/bin/python"));
    let mut c = Command::new(py);
    c.arg(root.join("scripts/reference/moco_step.py")).args([
        "--arch",
        a.arch.name(),
        "--size",
        &a.size.to_string(),
        "--batch",
        &a.batch.to_string(),
        "--queue",
        &a.queue.to_string(),
        "--groups",
        &a.groups.to_string(),
        "--warmup",
        &a.warmup.to_string(),
        "--steps",
        &a.steps.to_string(),
        "--device",
        if a.device.starts_with("cuda") { "cuda" } else { "cpu" },
    ]);
    if a.amp {
        c.args(["--amp", "--amp-dtype", if a.amp_dtype == AmpDtype::Fp16 { "fp16" } else { "bf16" }]);
    }
    if a.channels_last {
        c.arg("--channels-last");
    }
    let out = c.output().expect("run the PyTorch reference");
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let v: serde_json::Value = serde_json::from_str(&line).expect("reference JSON");
    (v["steps_per_s"].as_f64().expect("steps_per_s"), line)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let a = parse();
    let (mut ours_v, mut ref_v, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut ref_line = String::new();
    for r in 0..a.rounds {
        let o = ours(&a);
        let (p, line) = reference(&a);
        ref_line = line;
        println!("round {r}: geossl {o:.3} steps/s, pytorch {p:.3} steps/s, ratio {:.3}", o / p);
        ours_v.push(o);
        ref_v.push(p);
        ratios.push(o / p);
    }
    let (o, p, r) = (median(ours_v), median(ref_v), median(ratios));
    let host = common::cpu_model();
    let when = common::utc_now();
    let amp = match (a.amp, a.amp_dtype) {
        (false, _) => "off",
        (true, AmpDtype::Bf16) => "bf16",
        (true, AmpDtype::Fp16) => "fp16",
    };
    let layout = if a.channels_last { ", channels-last" } else { "" };
    let report = format!(
        "| {when} | {} | {} | {}×{} | batch {} | queue {} | groups {} | amp {amp}{layout} | {:.3} ({:.1} pairs/s) | {:.3} ({:.1} pairs/s) | **{r:.3}** |\n",
        a.device, a.arch, a.size, a.size, a.batch, a.queue, a.groups, o, o * a.batch as f64, p, p * a.batch as f64
    );
    println!("median of {} rounds: geossl {o:.3} steps/s, pytorch eager {p:.3} steps/s, ratio {r:.3}", a.rounds);
    println!("machine: {host}, {} threads; reference: {ref_line}", tch::get_num_threads());
    if let Some(path) = a.report {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("report file");
        f.write_all(report.as_bytes()).expect("write report");
        println!("appended to {}", path.display());
    }
}
