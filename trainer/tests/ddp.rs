//! Data-parallel MoCo on two ranks, two processes on 127.0.0.1 (this test
//! binary run again with torchrun's variables), Gloo through libtorch's c10d:
//! ranks that start from different random weights hold identical encoders,
//! BatchNorm buffers and queue after joining and after every step, while each
//! trains on its own real chips (Landsat pixels).

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use geossl_dist::{ProcessGroup, Rendezvous};
use geossl_trainer::moco::info_nce;
use geossl_trainer::moco::Moco;
use tch::{Device, Kind, Tensor};

const ROLE: &str = "GEOSSL_DDP_TEST_ROLE";

/// `n` real 32 × 32 RGB chips of rasterio's Landsat scene, 128 px apart in rows of four from `x0, y0`,
/// scaled to [-0.5, 0.5].
fn chips(n: i64, x0: usize, y0: usize) -> Tensor {
    let path = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let mut r = geossl_raster::Raster::open(&path).unwrap();
    let views: Vec<Tensor> = (0..n as usize)
        .map(|i| {
            let b = r.read_window(x0 + 128 * (i % 4), y0 + 128 * (i / 4), 32, 32, &[0, 1, 2]).unwrap();
            Tensor::from_slice(&b.samples.to_f32()).view([3, 32, 32]) / 255.0 - 0.5
        })
        .collect();
    Tensor::stack(&views, 0)
}

/// The trainable parameters of both encoders (by name) and the queue, as one vector. (BatchNorm buffers:
/// the query encoder's are rank 0's at the start of each step; the key encoder's stay per rank, as in MoCo.)
fn state(m: &Moco) -> Tensor {
    let mut parts = Vec::new();
    for (vs, spec) in [(&m.vs_q, &m.spec), (&m.vs_k, &m.key_spec)] {
        let vars = vs.variables();
        let mut names: Vec<String> =
            spec.parameters().into_iter().filter(|p| p.role.trainable()).map(|p| p.name).collect();
        names.sort();
        parts.extend(names.iter().map(|n| vars[n].detach().flatten(0, -1)));
    }
    parts.push(m.queue.keys.flatten(0, -1));
    Tensor::cat(&parts, 0)
}

fn same_on_every_rank(m: &mut Moco, when: &str) {
    let all = m.gather(&state(m)).unwrap();
    let (rank, world) = m.rank_world();
    for r in 1..world as i64 {
        assert!(all.get(0).equal(&all.get(r)), "rank {rank}: rank {r}'s state differs from rank 0's {when}");
    }
}

fn rank_body() {
    let r = Rendezvous::from_env(Duration::from_secs(60)).unwrap();
    let (spec, cfg) = geossl_trainer::fixtures::tiny_moco().unwrap();
    // Different random weights and queue on each rank: joining must make them rank 0's.
    tch::manual_seed(100 + r.rank as i64);
    let mut m = Moco::new(&spec, &cfg, Device::Cpu).unwrap();
    let before = state(&m);
    m.join(ProcessGroup::connect(&r, geossl_dist::Backend::Gloo).unwrap()).unwrap();
    assert_eq!(m.rank_world(), (r.rank, 2));
    if r.rank == 1 {
        assert!(!before.equal(&state(&m)), "rank 1 kept its own weights");
    }
    same_on_every_rank(&mut m, "after joining");
    // Each rank its own chips (different places of the scene), views differing by a shift.
    let (x0, y0) = (200 + 40 * r.rank, 250 + 64 * r.rank);
    let mut losses = Vec::new();
    m.keep_gradients = true;
    for step in 0..3 {
        let q = chips(8, x0 + step, y0);
        let k = chips(8, x0 + step + 12, y0 + 9);
        let unit = |p: Tensor| &p / p.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
        // This rank's key views encoded by themselves (BatchNorm over its own 8), before the step; at step 0
        // the key encoder equals the query encoder, so the momentum update leaves it as it is.
        let alone = (step == 0).then(|| {
            tch::no_grad(|| {
                let f = m.key.backbone.pooled(&k, true);
                unit(m.key.projection.as_ref().map(|p| p.forward(&f)).unwrap_or(f))
            })
        });
        // The queries as the step will compute them, and the negatives it will see.
        let queries = tch::no_grad(|| {
            let f = m.query.backbone.pooled(&q, true);
            unit(m.query.projection.as_ref().map(|p| p.forward(&f)).unwrap_or(f))
        });
        let negatives = m.queue.keys.copy();
        let ptr = m.queue.ptr;
        let out = m.step(&q, &k, None, 0.05).unwrap();
        assert!(out.loss.is_finite());
        eprintln!("rank {} step {step}: loss {} nce {} top1 {}", r.rank, out.loss, out.info_nce, out.positive_top1);
        losses.push(out.loss);
        same_on_every_rank(&mut m, &format!("after step {step}"));
        // The applied gradient is the mean of the ranks' own gradients.
        let (local, applied) = m.gradients.take().unwrap();
        let flat = |g: &[Tensor]| {
            Tensor::cat(&g.iter().filter(|t| t.defined()).map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0)
        };
        let mean =
            m.gather(&flat(&local)).unwrap().to_kind(Kind::Double).mean_dim([0i64].as_slice(), false, Kind::Double);
        let (local, applied) = (flat(&local), flat(&applied));
        let rel = (applied.to_kind(Kind::Double) - &mean).norm().double_value(&[]) / mean.norm().double_value(&[]);
        // The f64 mean is the reference; the applied gradient (DDP's Reducer: each rank's divided by 2, exact,
        // then one fp32 sum) is within half an ulp (2^-24 ≈ 6e-8) per element: 1e-5 leaves a margin of ~80×,
        // on any CPU.
        assert!(rel <= 1e-5, "rank {}: step {step}: applied gradient vs the ranks' mean: {rel:e}", r.rank);
        assert!(!local.equal(&applied), "rank {}: the applied gradient is this rank's own", r.rank);
        // The queue took every rank's keys in rank order: this rank's positives are rows ptr+8r..ptr+8r+8,
        // and with them its InfoNCE is the loss the step reported.
        let mine = m.queue.keys.narrow(0, ptr + 8 * r.rank as i64, 8);
        // Same weights, same batch, same kernels: only summation order may differ from the step's own fp32
        // InfoNCE (65 logits of 128-d dot products, ~1e-7 each); keys of the wrong rank move it by ~10 %.
        let (nce, _) = info_nce(&queries, &mine, &negatives, cfg.moco.temperature);
        let rel = (nce.double_value(&[]) - out.info_nce).abs() / out.info_nce.abs();
        assert!(
            rel < 1e-5,
            "rank {}: step {step}: InfoNCE with queue rows of rank order {rel:e} off ({} vs {})",
            r.rank,
            nce.double_value(&[]),
            out.info_nce
        );
        if let Some(alone) = alone {
            // Encoded with BatchNorm over a mix of both ranks' views, the keys differ from those of this
            // rank's views alone.
            let moved = (&mine - &alone).abs().max().double_value(&[]);
            assert!(moved > 1e-3, "rank {}: BatchNorm did not mix the ranks' samples ({moved:e})", r.rank);
        }
    }
    // The queue got both ranks' keys: 3 steps × 2 ranks × 8 keys = 48 unit rows, the rest still the initial ones.
    let norms = m.queue.keys.narrow(0, 0, 48).norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
    assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
    assert_eq!(m.queue.ptr, 48, "the queue advanced by the global batch each step");
    // Geo labels for a model without a geo head: named before any collective (the Reducer needs a gradient for
    // every parameter, so labels and head must match).
    let labels = Tensor::zeros([8], (Kind::Int64, Device::Cpu));
    let e = m.step(&chips(8, x0, y0), &chips(8, x0 + 12, y0 + 9), Some(&labels), 0.05).unwrap_err().to_string();
    assert!(e.contains("geo labels exactly when the model has a geo head"), "{e}");
    // The ranks saw different data: their losses differ.
    let l = m.gather(&Tensor::from_slice(&losses)).unwrap();
    assert!(!l.get(0).equal(&l.get(1)), "both ranks computed the same losses");
    println!("rank {} ok", r.rank);
}

fn spawn(rank: usize, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["two_ranks_train_in_lockstep", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, "rank")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_ranks_train_in_lockstep() {
    if std::env::var(ROLE).as_deref() == Ok("rank") {
        return rank_body();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let kids: Vec<Child> = (0..2).map(|r| spawn(r, port)).collect();
    let outs: Vec<_> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    let texts: Vec<String> = outs
        .iter()
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success() && texts[r].contains(&format!("rank {r} ok")),
            "rank {r} failed:\n{}",
            texts.join("\n---\n")
        );
    }
}
