//! Does training with temporal positives make the embeddings of one place on
//! different dates closer than plain MoCo does? Real data: the 5-date
//! Sentinel-2 series (Slovenia, 2015) of the shared test data, cut into
//! overlapping windows; each window on each date is one image.
//!
//! `cargo run --release -p geossl-trainer --example tp_report -- [--steps N] [--seeds 0,1] [--report FILE]`
//!
//! For each preset (`moco`, `moco-tp`) and seed, the same budget is trained
//! from the same initialisation; then every image is embedded (pooled backbone
//! features, eval mode, no augmentation) and we measure
//! * same-place retrieval: the fraction of images whose nearest other image is
//!   the same window on another date;
//! * the cosine gap: mean similarity to the same window on other dates minus
//!   mean similarity to other windows.

use std::path::{Path, PathBuf};

use geossl_trainer::config::PretrainConfig;
use geossl_trainer::data::{read_manifest, Format, Sample};
use geossl_trainer::pretrain::run_spec;
use geossl_trainer::pretrain::{pretrain, RunOptions};
use geossl_trainer::{image_io, load_checkpoint, Model};
use tch::{Device, Tensor};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Pooled features `[N, D]`, L2-normalized, of every sample.
fn embed(model: &Model, samples: &[Sample]) -> Tensor {
    let s = model.spec.input_size[0] as i64;
    let imgs: Vec<Tensor> =
        samples.iter().map(|x| image_io::decode_for(&x.path, &model.spec).expect("decode").tensor()).collect();
    let x = Tensor::stack(&imgs, 0).internal_upsample_bilinear2d_aa([s, s], false, None, None);
    let x = geossl_trainer::supervised::normalize(&x, &model.spec);
    let f = tch::no_grad(|| model.backbone.pooled(&x, false));
    geossl_trainer::model::l2_normalize(&f)
}

/// (same-place top-1 retrieval, cosine gap) of embeddings `[N, D]`.
fn metrics(e: &Tensor, samples: &[Sample]) -> (f64, f64) {
    let sim = e.mm(&e.tr());
    let n = samples.len();
    let v = Vec::<f32>::try_from(sim.reshape([-1])).expect("sim");
    let (mut hits, mut same, mut other, mut ns, mut no) = (0usize, 0f64, 0f64, 0usize, 0usize);
    for i in 0..n {
        let mut best = (usize::MAX, f32::NEG_INFINITY);
        for j in 0..n {
            if i == j {
                continue;
            }
            let s = v[i * n + j];
            if s > best.1 {
                best = (j, s);
            }
            if samples[i].location_id == samples[j].location_id {
                same += s as f64;
                ns += 1;
            } else {
                other += s as f64;
                no += 1;
            }
        }
        hits += (samples[best.0].location_id == samples[i].location_id) as usize;
    }
    (hits as f64 / n as f64, same / ns.max(1) as f64 - other / no.max(1) as f64)
}

fn main() {
    let steps: u64 = arg("--steps", 150);
    let seeds: String = arg("--seeds", "0,1".to_string());
    let report: Option<PathBuf> =
        std::env::args().position(|a| a == "--report").and_then(|i| std::env::args().nth(i + 1)).map(PathBuf::from);
    let data = PathBuf::from(env!("GEOSSL_ROOT")).join("tests/fixtures");
    let work = tempfile::tempdir().expect("tmp");
    let chips = geossl_trainer::fixtures::sentinel2_chips(&data, &work.path().join("s2"), 32, 16).expect("chips");
    let manifest =
        geossl_trainer::data::write_manifest(&chips, &work.path().join("s2/manifest.csv")).expect("manifest");
    let samples = read_manifest(&manifest, Format::Csv).expect("manifest");
    let locations = samples.iter().map(|s| &s.location_id).collect::<std::collections::HashSet<_>>().len();
    println!("{} images, {locations} windows × 5 dates", samples.len());

    let mut rows = Vec::new();
    for seed in seeds.split(',').filter_map(|s| s.trim().parse::<u64>().ok()) {
        for preset in ["moco", "moco-tp"] {
            let (mut cfg, _) = PretrainConfig::load(Path::new(preset)).expect("preset");
            cfg.model.arch = geossl_models::Arch::Resnet18;
            cfg.model.input_size = 64;
            cfg.moco.queue_size = 1024;
            cfg.moco.momentum = 0.99;
            cfg.moco.temperature = 0.2;
            cfg.moco.shuffle_bn_groups = 4;
            cfg.optim.batch_size = 32;
            cfg.optim.max_steps = Some(steps);
            cfg.run.seed = seed;
            cfg.run.checkpoint_every = steps;
            cfg.run.log_every = 25;
            cfg.run.workers = 2;
            if cfg.aug.tp_resize.is_some() {
                cfg.aug.tp_resize = Some(128);
            }
            let text = toml::to_string(&cfg).expect("toml");
            let out = work.path().join(format!("{preset}-{seed}"));
            if preset == "moco" {
                // The shared random initialisation (the trainer seeds the same way), as a baseline.
                tch::manual_seed(seed as i64);
                let vs = tch::nn::VarStore::new(Device::Cpu);
                let m = Model::new(&vs.root(), &run_spec(&cfg, None).expect("spec"));
                let (r, gap) = metrics(&embed(&m, &samples), &samples);
                println!("random init seed {seed}: retrieval {r:.3}, gap {gap:.4}");
                rows.push(("random init", seed, r, gap, 0.0, f64::NAN));
            }
            let opts = RunOptions {
                manifest: manifest.clone(),
                out: out.clone(),
                resume: false,
                device: Device::Cpu,
                max_steps: None,
                stop_after: None,
                progress: false,
                stop_on_collapse: false,
                dist: None,
            };
            let t = std::time::Instant::now();
            let s = pretrain(&cfg, &text, &opts).expect("pretrain");
            let loaded = load_checkpoint(&out.join("checkpoint"), Device::Cpu).expect("checkpoint");
            let (r, gap) = metrics(&embed(&loaded.model, &samples), &samples);
            println!(
                "{preset} seed {seed}: loss {:.3}, partner rate {:.2}, retrieval {r:.3}, gap {gap:.4} ({:.0} s)",
                s.final_loss,
                s.partner_rate,
                t.elapsed().as_secs_f64()
            );
            rows.push((preset, seed, r, gap, s.partner_rate, s.final_loss));
        }
    }
    let mut md = String::new();
    md.push_str(&format!("\n### Run of {} ({steps} steps, batch 32, ResNet-18 at 64 px, CPU)\n\n", chrono_now()));
    md.push_str("| preset | seed | same-place top-1 retrieval | cosine gap (same − other) | temporal partner rate | final loss |\n|---|---|---|---|---|---|\n");
    for (p, s, r, g, pr, l) in &rows {
        md.push_str(&format!("| {p} | {s} | {r:.3} | {g:.4} | {pr:.2} | {l:.3} |\n"));
    }
    for p in ["random init", "moco", "moco-tp"] {
        let v: Vec<_> = rows.iter().filter(|r| r.0 == p).collect();
        let n = v.len().max(1) as f64;
        md.push_str(&format!(
            "| **{p} mean** | | **{:.3}** | **{:.4}** | | |\n",
            v.iter().map(|r| r.2).sum::<f64>() / n,
            v.iter().map(|r| r.3).sum::<f64>() / n
        ));
    }
    println!("{md}");
    if let Some(path) = report {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("report");
        f.write_all(md.as_bytes()).expect("write");
        println!("appended to {}", path.display());
    }
}

fn chrono_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
