//! Data-parallel pretraining from the command line on real chips: two ranks
//! (`--nproc-per-node 2`, Gloo on 127.0.0.1) train, checkpoint (rank 0) and
//! resume exactly; a 1-rank run through the distributed path equals the
//! single-process run bit for bit; a changed world size on resume, different
//! configs on the ranks, a rank that dies and NCCL without a GPU are errors
//! that say so.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use geossl_models::StateDict;

/// A tiny `moco-tp-geo` (one loader thread per rank) with queue `queue`, as `dir/<name>.toml`.
fn config(dir: &Path, name: &str, queue: usize) -> PathBuf {
    common::small_config(dir, name, "moco-tp-geo", queue, 1)
}

fn pretrain(cfg: &Path, data: &Path, out: &Path, stop: u64, extra: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
    c.args(["pretrain", "--no-progress", "--dist-timeout-s", "60", "--config"]).arg(cfg);
    c.arg("--data").arg(data).arg("--out").arg(out).args(["--stop-after", &stop.to_string()]).args(extra);
    for k in ["WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"] {
        c.env_remove(k);
    }
    c.envs(env.iter().map(|(k, v)| (*k, v.as_str()))).env("OMP_NUM_THREADS", "1");
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn state(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("checkpoint/state.json")).unwrap()).unwrap()
}

fn same_weights(a: &Path, b: &Path, what: &str) {
    for file in ["model.safetensors", "key.safetensors", "optimizer.safetensors", "queue.safetensors"] {
        let (x, y) = (
            StateDict::read(&a.join("checkpoint").join(file)).unwrap(),
            StateDict::read(&b.join("checkpoint").join(file)).unwrap(),
        );
        for t in &x.tensors {
            assert_eq!(t.data, y.get(&t.name).unwrap().data, "{what}: {file}:{} differs", t.name);
        }
    }
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

#[test]
fn two_ranks_train_checkpoint_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data =
        geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &tmp.path().join("chips")).unwrap();
    let cfg = config(tmp.path(), "ddp", 32);
    let two = ["--nproc-per-node", "2"];
    let a = tmp.path().join("a");
    let o = pretrain(&cfg, &data, &a, 4, &two, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!((state(&a)["step"].as_u64(), state(&a)["world_size"].as_u64()), (Some(4), Some(2)));
    // Stopped at 2 and resumed on two ranks: the same weights, optimizer and queue as the straight run.
    let b = tmp.path().join("b");
    assert!(pretrain(&cfg, &data, &b, 2, &two, &[]).status.success());
    assert_eq!(state(&b)["step"], 2);
    let o = pretrain(&cfg, &data, &b, 4, &["--nproc-per-node", "2", "--resume"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    same_weights(&a, &b, "2 ranks, straight vs resumed");
    // One process cannot resume a 2-rank run.
    let o = pretrain(&cfg, &data, &b, 4, &["--resume"], &[]);
    assert!(!o.status.success() && text(&o).contains("trained on 2 rank(s); this run has 1"), "{}", text(&o));
    // Rank 0 killed (SIGKILL) while writing the step-4 checkpoint: the launcher stops the other rank and names
    // the failed one; the step-2 checkpoint stays; resumed (as a retried Job would, --auto-resume), the run
    // continues from step 2 and ends exactly as the straight run.
    let c = tmp.path().join("c");
    assert!(pretrain(&cfg, &data, &c, 2, &two, &[]).status.success());
    let started = Instant::now();
    let kill = [("GEOSSL_TEST_KILL_AT", "after-weights".to_string())];
    let o = pretrain(&cfg, &data, &c, 4, &["--nproc-per-node", "2", "--resume"], &kill);
    assert!(!o.status.success() && text(&o).contains("rank 0 of 2 failed"), "{}", text(&o));
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    assert_eq!(state(&c)["step"], 2);
    let o = pretrain(&cfg, &data, &c, 4, &["--nproc-per-node", "2", "--auto-resume"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    same_weights(&a, &c, "2 ranks, straight vs killed and resumed");
}

#[test]
fn one_rank_through_the_distributed_path_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data =
        geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &tmp.path().join("chips")).unwrap();
    let cfg = config(tmp.path(), "one", 32);
    let plain = tmp.path().join("plain");
    assert!(pretrain(&cfg, &data, &plain, 4, &[], &[]).status.success());
    let dist = tmp.path().join("dist");
    let env = [
        ("WORLD_SIZE", "1".to_string()),
        ("RANK", "0".to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", free_port()),
    ];
    let o = pretrain(&cfg, &data, &dist, 4, &[], &env);
    assert!(o.status.success() && text(&o).contains("data-parallel"), "{}", text(&o));
    same_weights(&plain, &dist, "1 rank through c10d vs one process");
}

#[test]
fn different_configs_an_undivided_queue_and_a_lost_rank_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data =
        geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &tmp.path().join("chips")).unwrap();
    let (c0, c1) = (config(tmp.path(), "r0", 32), config(tmp.path(), "r1", 64));
    let port = free_port();
    let env = move |rank: usize| {
        vec![
            ("WORLD_SIZE", "2".to_string()),
            ("RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.clone()),
        ]
    };
    let (d0, d1) = (data.clone(), data.clone());
    let (o0, o1) = (tmp.path().join("o0"), tmp.path().join("o1"));
    let (e0, e1) = (env(0), env(1));
    let r1 = std::thread::spawn(move || pretrain(&c1, &d1, &o1, 4, &[], &e1));
    let o = pretrain(&c0, &d0, &o0, 4, &[], &e0);
    let o1 = r1.join().unwrap();
    assert!(!o.status.success() && text(&o).contains("runs another config"), "rank 0: {}", text(&o));
    assert!(!o1.status.success() && text(&o1).contains("runs another config"), "rank 1: {}", text(&o1));
    // Two ranks started on their own (as Kubernetes starts them): rank 0 dies (SIGKILL while writing its
    // step-2 checkpoint); rank 1 stops with an error instead of waiting for it.
    let port = free_port();
    let env = move |rank: usize| {
        let mut e = vec![
            ("WORLD_SIZE", "2".to_string()),
            ("RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.clone()),
        ];
        if rank == 0 {
            e.push(("GEOSSL_TEST_KILL_AT", "after-weights".to_string()));
        }
        e
    };
    let (e0, e1) = (env(0), env(1));
    let (d1, o1) = (data.clone(), tmp.path().join("lost"));
    let c = config(tmp.path(), "lost", 32);
    let c1 = c.clone();
    let started = Instant::now();
    let r1 = std::thread::spawn(move || pretrain(&c1, &d1, &o1, 4, &[], &e1));
    let o0 = pretrain(&c, &data, &tmp.path().join("lost"), 4, &[], &e0);
    let o1 = r1.join().unwrap();
    assert!(!o0.status.success(), "rank 0 should have been killed");
    assert!(
        !o1.status.success() && text(&o1).contains("rank 1 of 2 lost rank 0 (the rendezvous host) at step 3"),
        "{}",
        text(&o1)
    );
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    // A queue that the global batch does not divide is named before anything starts.
    let cfg = config(tmp.path(), "q", 24);
    let o = pretrain(&cfg, &data, &tmp.path().join("q"), 4, &["--nproc-per-node", "2"], &[]);
    assert!(!o.status.success() && text(&o).contains("not a multiple of the global batch 16"), "{}", text(&o));
    // NCCL (a CUDA device) on a machine without a GPU is named before any model is built.
    if !tch::Cuda::is_available() {
        let env = [("WORLD_SIZE", "1".to_string()), ("RANK", "0".to_string())];
        let env = [&env[..], &[("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", free_port())]].concat();
        let o = pretrain(&cfg, &data, &tmp.path().join("nccl"), 4, &["--device", "cuda"], &env);
        assert!(
            !o.status.success()
                && text(&o).contains("NCCL was requested")
                && text(&o).contains("CUDA is not available"),
            "{}",
            text(&o)
        );
        assert!(!tmp.path().join("nccl/checkpoint").exists());
    }
}

/// The training Job as rendered (`kubectl kustomize k8s/train/overlays/cpu`; the GPU overlay differs only in
/// device and resources, checked) runs here: one process per
/// completion index with the container's args and env from the manifest (RANK as the completion-index
/// annotation gives it, MASTER_ADDR pod 0's name → 127.0.0.1, the volumes → local folders, the preset swapped
/// for a CPU-sized config); the manifest's wiring (headless Service, subdomain, /dev/shm) is checked first.
#[test]
fn the_rendered_training_job_runs_here() {
    use serde_json::Value;
    let render = |overlay: &str| -> Vec<Value> {
        let o = Command::new("kubectl")
            .arg("kustomize")
            .arg(common::repo_root().join(overlay))
            .output()
            .unwrap_or_else(|e| panic!("kubectl (with kustomize) is needed to render {overlay}: {e}"));
        assert!(o.status.success(), "kubectl kustomize {overlay}: {}", text(&o));
        let script = "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))";
        let mut py = Command::new(common::python())
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(py.stdin.as_mut().unwrap(), &o.stdout).unwrap();
        serde_json::from_slice(&py.wait_with_output().unwrap().stdout).unwrap()
    };
    let objects = render("k8s/train/overlays/cpu");
    // The GPU overlay is the same Job (so what runs below holds for it too) with one GPU per rank, CUDA (NCCL)
    // and a larger /dev/shm.
    let gpu = render("k8s/train/overlays/gpu");
    let job_of = |objs: &[Value]| objs.iter().find(|o| o["kind"] == "Job").expect("a Job").clone();
    let (cpu_job, gpu_job) = (job_of(&objects), job_of(&gpu));
    let (cpu_c, gpu_c) =
        (&cpu_job["spec"]["template"]["spec"]["containers"][0], &gpu_job["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(gpu_c["resources"]["limits"]["nvidia.com/gpu"].as_i64(), Some(1), "one GPU per rank");
    assert!(cpu_c["resources"]["limits"].get("nvidia.com/gpu").is_none());
    let device = |c: &Value| c["env"].as_array().unwrap().iter().find(|e| e["name"] == "GEOSSL_DEVICE").cloned();
    assert_eq!(device(gpu_c).unwrap()["value"], "cuda");
    assert_eq!(device(cpu_c).unwrap()["value"], "cpu");
    let wiring = |j: &Value| {
        let mut c = j["spec"]["template"]["spec"]["containers"][0].clone();
        let env = c["env"].as_array_mut().unwrap();
        env.retain(|e| e["name"] != "GEOSSL_DEVICE");
        (j["spec"]["completions"].clone(), c["args"].clone(), c["env"].clone(), c["volumeMounts"].clone())
    };
    assert_eq!(wiring(&cpu_job), wiring(&gpu_job), "the GPU overlay changes only the device and resources");
    let job = objects.iter().find(|o| o["kind"] == "Job").expect("a Job");
    let svc = objects.iter().find(|o| o["kind"] == "Service").expect("a Service");
    assert_eq!(svc["spec"]["clusterIP"], "None", "a headless Service");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
    let (job_name, svc_name) = (job["metadata"]["name"].as_str().unwrap(), svc["metadata"]["name"].as_str().unwrap());
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(pod["subdomain"], svc_name);
    let c = &pod["containers"][0];
    let env: Vec<(String, Value)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.get("value").cloned().unwrap_or(e["valueFrom"].clone())))
        .collect();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no {k}")).1.clone();
    let world = get("WORLD_SIZE").as_str().unwrap().parse::<u64>().unwrap();
    assert_eq!(job["spec"]["completions"].as_u64(), Some(world), "one rank per completion index");
    assert_eq!(
        get("RANK")["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    assert_eq!(get("MASTER_ADDR"), format!("{job_name}-0.{svc_name}"), "pod 0's hostname under the Service");
    let shm = pod["volumes"].as_array().unwrap().iter().find(|v| v["emptyDir"]["medium"] == "Memory").expect("shm");
    assert!(c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"] == "/dev/shm" && m["name"] == shm["name"]));
    let args: Vec<String> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    let help = Command::new(env!("CARGO_BIN_EXE_geossl-train")).args(&args).arg("--help").output().unwrap();
    for (k, _) in env.iter().filter(|(k, _)| k.starts_with("GEOSSL_")) {
        assert!(text(&help).contains(&format!("env: {k}")), "{k} is not a flag of geossl-train {args:?}");
    }
    // Run every index here.
    let tmp = tempfile::tempdir().unwrap();
    let chips = tmp.path().join("chips");
    geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &chips).unwrap();
    let runs = tmp.path().join("runs");
    let small = config(tmp.path(), "k8s", 32);
    let port = free_port();
    let kids: Vec<_> = (0..world)
        .map(|index| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
            cmd.args(&args).env("OMP_NUM_THREADS", "1").env("GEOSSL_MAX_STEPS", "2");
            for (k, v) in &env {
                let v = match (k.as_str(), v.as_str()) {
                    ("RANK", _) => index.to_string(), // what the completion-index annotation holds
                    ("MASTER_ADDR", _) => "127.0.0.1".into(),
                    ("MASTER_PORT", _) => port.clone(),
                    ("GEOSSL_CONFIG", _) => small.display().to_string(),
                    (_, Some(v)) => {
                        v.replace("/data", &chips.display().to_string()).replace("/runs", &runs.display().to_string())
                    }
                    (k, None) => panic!("{k}: neither a value nor the completion index"),
                };
                cmd.env(k, v);
            }
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (index, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "index {index}: {}", text(&o));
    }
    let out = PathBuf::from(get("GEOSSL_OUT").as_str().unwrap().replace("/runs", &runs.display().to_string()));
    let st = state(&out);
    assert_eq!((st["step"].as_u64(), st["world_size"].as_u64()), (Some(2), Some(world)));
}
