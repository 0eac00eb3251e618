//! Chip packs and views cut on the training device, on real imagery: the committed 5-date Sentinel-2
//! series (tests/fixtures/eolearn) cut into 48 px chips of 9 places × 5 dates, so temporal partners are
//! real. Checks that a pack holds the chips bit for bit, that the loader over a pack draws what the loader
//! over the files draws (anchors, partners, rank slices, resume, crop boxes), that the batched device crop
//! matches the per-image CPU kernel within a bound derived from the two kernels, that a damaged record is
//! named and nothing else is lost, and that pretraining on a pack resumes exactly.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use geossl_trainer::augment::{crop_resize, crop_resize_batch, crop_resize_grid, AugConfig, Crop};
use geossl_trainer::data::{read_manifest, write_manifest, Format, Sample, TemporalIndex};
use geossl_trainer::fixtures::sentinel2_chips;
use geossl_trainer::image_io::{decode, positional};
use geossl_trainer::loader::{Batch, Loader, LoaderConfig, Recycle, Views};
use geossl_trainer::pack::{write_pack, Pack, PackError, PackOptions};
use tch::{Device, Kind, Tensor};

const SIDE: usize = 48;
const OUT: i64 = 40;

/// The real chips' manifest, read back as the trainer reads it.
fn chips(dir: &Path) -> Vec<Sample> {
    let chips = sentinel2_chips(&geossl_tests::data::fixtures(), &dir.join("s2"), SIDE, 26).unwrap();
    let m = write_manifest(&chips, &dir.join("s2/manifest.csv")).unwrap();
    read_manifest(&m, Format::Csv).unwrap()
}

/// Packs `samples` with about `per_shard` chips per shard.
fn pack(samples: &[Sample], out: &Path, per_shard: u64, bands: usize) -> Arc<Pack> {
    let first = decode(&samples[0].path, &positional(bands)).unwrap();
    let opt = PackOptions { bands: positional(bands), shard_bytes: per_shard * first.bytes() as u64, workers: 2 };
    write_pack(samples, out, &opt, &indicatif::ProgressBar::hidden()).unwrap();
    Pack::open(out).unwrap()
}

fn cfg(
    b: usize,
    pack: Option<Arc<Pack>>,
    device_crop: bool,
    rank: usize,
    world: usize,
    tp: Option<usize>,
) -> LoaderConfig {
    LoaderConfig {
        batch_size: b,
        input_size: OUT,
        bands: positional(3),
        temporal: true,
        seed: 11,
        workers: 2,
        prefetch: 1,
        cache_bytes: 0,
        aug: AugConfig { tp_resize: tp, ..AugConfig::default() },
        rank,
        world,
        pack,
        device_crop,
    }
}

/// Batches `start..end`; geo labels are the sample indices, so `batch.geo` names each row's anchor.
fn batches(samples: &[Sample], c: LoaderConfig, start: u64, end: u64) -> Vec<Batch> {
    let index = TemporalIndex::new(samples);
    let ids: Vec<i64> = (0..samples.len() as i64).collect();
    let mut l = Loader::start(samples.to_vec(), index, ids, c, start, end);
    (start..end).map(|_| l.next_batch().unwrap()).collect()
}

fn cut(v: &Views) -> Tensor {
    match v {
        Views::Cut(t) => t.shallow_clone(),
        Views::Raw { .. } => panic!("expected views cut by the loader"),
    }
}

fn raw(v: &Views) -> (Tensor, Vec<Crop>) {
    match v {
        Views::Raw { chips, boxes, .. } => (chips.shallow_clone(), boxes.clone()),
        Views::Cut(_) => panic!("expected raw chips"),
    }
}

fn anchors(b: &Batch) -> Vec<i64> {
    Vec::<i64>::try_from(&b.geo).unwrap()
}

#[test]
fn a_pack_holds_the_manifests_chips_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let samples = chips(d.path());
    assert_eq!(samples.len(), 45, "9 places × 5 dates");
    let p = pack(&samples, &d.path().join("pack"), 8, 3);
    assert_eq!(p.len(), samples.len());
    let shards = std::fs::read_dir(d.path().join("pack"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".gcp"));
    assert_eq!(shards.count(), 6, "45 chips at 8 per shard");
    let got = p.samples();
    for (i, (a, b)) in samples.iter().zip(&got).enumerate() {
        assert_eq!((&a.location_id, &a.timestamp, a.lat, a.lon), (&b.location_id, &b.timestamp, b.lat, b.lon));
        let want = decode(&a.path, &positional(3)).unwrap();
        let have = p.image(i).unwrap();
        assert!(want.tensor().equal(&have.tensor()), "chip {i} differs");
        // The uint8 view the loader resamples is the same memory layout as the file's (channels last).
        assert_eq!(want.raw_tensor().stride(), have.raw_tensor().stride());
    }
    let (n, bad) = p.verify();
    assert_eq!((n, bad.len()), (45, 0));

    // GeoTIFF chips decode band by band (planar): packed pixel-interleaved, they read back the same.
    let opt = geossl_trainer::chips::TileOptions {
        size: 64,
        stride: 64,
        format: geossl_trainer::chips::ChipFormat::Tiff,
        ..Default::default()
    };
    let tifs = geossl_trainer::chips::tile_scene(
        &geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"),
        &d.path().join("tif"),
        &opt,
    )
    .unwrap();
    let tifs = &tifs[..6];
    assert_eq!(decode(&tifs[0].path, &positional(3)).unwrap().layout, geossl_raster::Layout::Planar);
    let pt = pack(tifs, &d.path().join("pack-tif"), 4, 3);
    for (i, s) in tifs.iter().enumerate() {
        assert!(decode(&s.path, &positional(3)).unwrap().tensor().equal(&pt.image(i).unwrap().tensor()), "tif {i}");
    }

    // 16-bit chips (the scenes' reflectance × 10000, bands 4-3-2) keep their samples exactly.
    let a =
        geossl_trainer::npy::read_npy(&geossl_tests::data::fixtures().join("eolearn/REFERENCE_SCENES.npy")).unwrap();
    let (h, w, c) = (a.shape[1], a.shape[2], a.shape[3]);
    let dir16 = d.path().join("u16");
    std::fs::create_dir_all(&dir16).unwrap();
    let mut s16 = Vec::new();
    for (t, s) in samples.iter().enumerate().take(10) {
        let img = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(32, 32, |x, y| {
            let base = (((t % 5) * h + y as usize + 3 * t) * w + x as usize) * c;
            image::Rgb([3, 2, 1].map(|b| (a.data[base + b] * 10000.0).round() as u16))
        });
        let path = dir16.join(format!("{t}.png"));
        img.save(&path).unwrap();
        s16.push(Sample { path, ..s.clone() });
    }
    let p16 = pack(&s16, &d.path().join("pack16"), 3, 3);
    assert_eq!(p16.shape.sample_type, geossl_models::SampleType::U16);
    for (i, s) in s16.iter().enumerate() {
        assert!(decode(&s.path, &positional(3)).unwrap().tensor().equal(&p16.image(i).unwrap().tensor()));
    }
    // Raw 16-bit chips reach the device as their values (they travel as int16 bits).
    let b = batches(&s16, LoaderConfig { batch_size: 4, ..cfg(4, Some(p16.clone()), true, 0, 1, None) }, 0, 1);
    let (chips16, boxes) = raw(&b[0].q);
    let full: Vec<Crop> = boxes.iter().map(|_| Crop { top: 0, left: 0, h: 32, w: 32 }).collect();
    let views =
        Views::Raw { chips: chips16, boxes: full, stored: geossl_models::SampleType::U16, recycle: Recycle::none() }
            .to_device(Device::Cpu, 32);
    for (r, &i) in anchors(&b[0]).iter().enumerate() {
        let want = p16.image(i as usize).unwrap().tensor();
        assert!(views.get(r as i64).allclose(&want, 0.0, 0.5, false), "uint16 row {r} changed on the way");
    }
}

#[test]
fn loaders_over_a_pack_and_over_the_files_draw_the_same_batches() {
    let d = tempfile::tempdir().unwrap();
    let samples = chips(d.path());
    let p = pack(&samples, &d.path().join("pack"), 7, 3);
    for tp in [None, Some(64)] {
        let files = batches(&samples, cfg(8, None, false, 0, 1, tp), 0, 3);
        let packed = batches(&samples, cfg(8, Some(p.clone()), false, 0, 1, tp), 0, 3);
        let device = batches(&samples, cfg(8, Some(p.clone()), true, 0, 1, tp), 0, 3);
        let mut partners = 0;
        for ((f, pk), dv) in files.iter().zip(&packed).zip(&device) {
            // Same anchors, same temporal partners, same views.
            assert_eq!(anchors(f), anchors(pk));
            assert_eq!(anchors(f), anchors(dv));
            assert_eq!((f.with_partner, f.bad_images), (pk.with_partner, pk.bad_images));
            assert_eq!((f.with_partner, f.bad_images), (dv.with_partner, dv.bad_images));
            partners += f.with_partner;
            assert!(cut(&f.q).equal(&cut(&pk.q)) && cut(&f.k).equal(&cut(&pk.k)), "tp {tp:?}: pack views differ");
            // Raw chips are the anchors' (and partners') pixels, and each box is the draw the CPU path made:
            // the CPU kernel applied to the raw chip at that box gives the loader's view exactly.
            for (views, side) in [(&f.q, &dv.q), (&f.k, &dv.k)] {
                let (chips, boxes) = raw(side);
                let want = cut(views);
                for (r, b) in boxes.iter().enumerate() {
                    assert_eq!(chips.get(r as i64).stride(), [1, 3 * SIDE as i64, 3], "channels-last rows");
                    let chip = chips.get(r as i64).contiguous().permute([1, 2, 0]).contiguous().permute([2, 0, 1]);
                    assert!(crop_resize(&chip, *b, OUT).equal(&want.get(r as i64)), "tp {tp:?}: row {r} box {b:?}");
                }
            }
            // On the CPU the device crop is the loader's kernel: the views are the loader's, exactly.
            assert!(dv.q.to_device(Device::Cpu, OUT).equal(&cut(&f.q)), "tp {tp:?}: device-cut query views");
            assert!(dv.k.to_device(Device::Cpu, OUT).equal(&cut(&f.k)), "tp {tp:?}: device-cut key views");
            // The same through the step's door (views cut into a reused array, used, handed back), twice.
            for _ in 0..2 {
                assert!(dv.q.with_device(Device::Cpu, OUT, |v| v.equal(&cut(&f.q))), "tp {tp:?}: with_device");
            }
            for (r, &a) in anchors(dv).iter().enumerate() {
                let (chips, _) = raw(&dv.q);
                assert!(chips.get(r as i64).equal(&p.image(a as usize).unwrap().tensor().to_kind(Kind::Uint8)));
            }
        }
        assert!(partners > 12, "real temporal partners drawn: {partners} of 24");
    }
}

#[test]
fn rank_slices_and_resume_are_unchanged_with_a_pack() {
    let d = tempfile::tempdir().unwrap();
    let samples = chips(d.path());
    let p = pack(&samples, &d.path().join("pack"), 10, 3);
    // DistributedSampler: each rank takes its own slice of the global batch, the same as over the files.
    let whole = batches(&samples, cfg(8, Some(p.clone()), true, 0, 1, Some(64)), 0, 2);
    let whole_files = batches(&samples, cfg(8, None, false, 0, 1, Some(64)), 0, 2);
    for step in 0..2 {
        assert_eq!(anchors(&whole[step]), anchors(&whole_files[step]));
    }
    let ranks: Vec<Vec<Batch>> =
        (0..2).map(|r| batches(&samples, cfg(4, Some(p.clone()), true, r, 2, Some(64)), 0, 4)).collect();
    let files0 = batches(&samples, cfg(4, None, false, 0, 2, Some(64)), 0, 4);
    for step in 0..4 {
        let (a0, a1) = (anchors(&ranks[0][step]), anchors(&ranks[1][step]));
        assert_eq!(a0, anchors(&files0[step]), "rank 0 step {step}");
        assert!(a0.iter().all(|x| !a1.contains(x)), "ranks overlap at step {step}");
    }
    // Global batches of 8 per epoch of 45: the two ranks of step s together hold the world-1 run's step s.
    for step in 0..2 {
        let mut both = [anchors(&ranks[0][step]), anchors(&ranks[1][step])].concat();
        let mut one = anchors(&whole[step]);
        both.sort_unstable();
        one.sort_unstable();
        assert_eq!(both, one, "step {step}");
    }
    // Batch arrays are reused once their batch is dropped: a consumer that drops each batch as it goes gets
    // exactly the chips of one that keeps them all (no reuse).
    let kept = batches(&samples, cfg(8, Some(p.clone()), true, 0, 1, Some(64)), 0, 12);
    let ids: Vec<i64> = (0..samples.len() as i64).collect();
    let c = cfg(8, Some(p.clone()), true, 0, 1, Some(64));
    let mut l = Loader::start(samples.clone(), TemporalIndex::new(&samples), ids, c, 0, 12);
    for want in &kept {
        let b = l.next_batch().unwrap();
        for (x, y) in [(&b.q, &want.q), (&b.k, &want.k)] {
            let ((cx, bx), (cy, by)) = (raw(x), raw(y));
            assert!(cx.equal(&cy) && bx == by, "step {} with reused arrays", b.step);
            // Views cut into the pool's arrays (handed back after each use) are the freshly cut ones.
            assert!(x.with_device(Device::Cpu, OUT, |v| v.equal(&y.to_device(Device::Cpu, OUT))), "step {}", b.step);
        }
    }
    // Resume: a loader started at step 3 hands out exactly the batches of one that started at 0.
    let straight = batches(&samples, cfg(8, Some(p.clone()), true, 0, 1, Some(64)), 0, 6);
    let resumed = batches(&samples, cfg(8, Some(p.clone()), true, 0, 1, Some(64)), 3, 6);
    for (a, b) in straight[3..].iter().zip(&resumed) {
        assert_eq!(a.step, b.step);
        assert_eq!(anchors(a), anchors(b));
        for (x, y) in [(&a.q, &b.q), (&a.k, &b.k)] {
            let ((cx, bx), (cy, by)) = (raw(x), raw(y));
            assert!(cx.equal(&cy) && bx == by, "step {}", a.step);
        }
    }
}

/// The weights `[(first index, weight)]` each kernel gives output `i` along an axis of `n` source pixels
/// resized to `out`: plain bilinear (what the device crop samples) and PyTorch's antialiased bilinear
/// (what `crop_resize` uses when the crop shrinks: a triangle widened by the scale, normalized).
fn weights(n: i64, out: i64, i: i64, antialias: bool) -> Vec<(i64, f64)> {
    let s = n as f64 / out as f64;
    if antialias && s > 1.0 {
        let centre = s * (i as f64 + 0.5);
        let lo = ((centre - s + 0.5).floor() as i64).max(0);
        let hi = ((centre + s + 0.5).floor() as i64).min(n);
        let w: Vec<(i64, f64)> =
            (lo..hi).map(|j| (j, (1.0 - ((j as f64 - centre + 0.5) / s).abs()).max(0.0))).collect();
        let total: f64 = w.iter().map(|x| x.1).sum();
        w.into_iter().map(|(j, x)| (j, x / total)).collect()
    } else {
        let src = (s * (i as f64 + 0.5) - 0.5).max(0.0);
        let i0 = (src.floor() as i64).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        let l = src - i0 as f64;
        vec![(i0, 1.0 - l), (i1, l)]
    }
}

fn l1_diff(a: &[(i64, f64)], b: &[(i64, f64)]) -> f64 {
    let mut m = std::collections::BTreeMap::new();
    for (j, w) in a {
        *m.entry(*j).or_insert(0.0) += w;
    }
    for (j, w) in b {
        *m.entry(*j).or_insert(0.0) -= w;
    }
    m.values().map(|v: &f64| v.abs()).sum()
}

#[test]
fn device_views_match_the_cpu_kernel_within_the_derived_bound() {
    let d = tempfile::tempdir().unwrap();
    let samples = chips(d.path());
    // Crops that grow (every side ≤ 40), shrink (sides up to 48), touch every edge, and are thin.
    let boxes = [
        Crop { top: 0, left: 0, h: 20, w: 31 },
        Crop { top: 5, left: 17, h: 40, w: 22 },
        Crop { top: 0, left: 0, h: 48, w: 48 },
        Crop { top: 3, left: 1, h: 45, w: 44 },
        Crop { top: 28, left: 40, h: 20, w: 8 },
        Crop { top: 47, left: 0, h: 1, w: 48 },
    ];
    let imgs: Vec<Tensor> =
        samples.iter().take(boxes.len()).map(|s| decode(&s.path, &positional(3)).unwrap().tensor()).collect();
    let batch = Tensor::stack(&imgs, 0);
    // The GPU's kernel (one batched grid_sampler_2d), run here on the CPU.
    let dev = crop_resize_grid(&batch, &boxes, OUT);
    assert_eq!(dev.size(), [boxes.len() as i64, 3, OUT, OUT]);
    // Float rounding of the sampling positions: a few operations on coordinates up to 48, each off by at
    // most half an ulp, times the largest step between neighbouring samples (255), plus the blend's own.
    let eps = f64::from(f32::EPSILON);
    let rounding = 8.0 * SIDE as f64 * eps * 255.0 + 8.0 * 255.0 * eps;
    for (r, b) in boxes.iter().enumerate() {
        let cpu = crop_resize(&imgs[r], *b, OUT);
        let (got, want) = (
            Vec::<f32>::try_from(dev.get(r as i64).flatten(0, -1)).unwrap(),
            Vec::<f32>::try_from(cpu.flatten(0, -1)).unwrap(),
        );
        let px = Vec::<f32>::try_from(imgs[r].flatten(0, -1)).unwrap();
        let grows = b.h <= OUT && b.w <= OUT;
        let mut worst = 0.0f64;
        for y in 0..OUT {
            let (wy_b, wy_a) = (weights(b.h, OUT, y, false), weights(b.h, OUT, y, true));
            for x in 0..OUT {
                let (wx_b, wx_a) = (weights(b.w, OUT, x, false), weights(b.w, OUT, x, true));
                // |Σ(a − b)·v| ≤ ½‖a − b‖₁ · (max − min of v over both supports), separable: the 2-D weight
                // difference is at most the sum of the axes' ‖·‖₁.
                let half_l1 = 0.5 * (l1_diff(&wy_a, &wy_b) + l1_diff(&wx_a, &wx_b));
                for c in 0..3 {
                    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
                    for &(j, _) in wy_a.iter().chain(&wy_b) {
                        for &(i, _) in wx_a.iter().chain(&wx_b) {
                            let v = f64::from(px[((c * SIDE as i64 + b.top + j) * SIDE as i64 + b.left + i) as usize]);
                            (lo, hi) = (lo.min(v), hi.max(v));
                        }
                    }
                    let bound = half_l1 * (hi - lo) + rounding;
                    let k = ((c * OUT + y) * OUT + x) as usize;
                    let diff = f64::from((got[k] - want[k]).abs());
                    assert!(
                        diff <= bound,
                        "box {b:?} ({}) c{c} y{y} x{x}: {diff} > {bound}",
                        if grows { "grows" } else { "shrinks" }
                    );
                    if grows {
                        assert!(diff <= rounding, "a growing crop is the same kernel: {diff}");
                    }
                    worst = worst.max(diff);
                }
            }
        }
        eprintln!("box {b:?}: largest |device − CPU| {worst:.4}");
    }
    // A flat image stays flat whatever the kernel.
    let flat = Tensor::full([2, 3, 48, 48], 77.0, (Kind::Float, Device::Cpu));
    let v = crop_resize_grid(&flat, &boxes[2..4], OUT);
    assert!((v - 77.0).abs().max().double_value(&[]) < 1e-4);
    // On the CPU the batch is cut row by row with the per-image kernel: the same views exactly.
    let rows = crop_resize_batch(&batch, &boxes, OUT);
    for (r, b) in boxes.iter().enumerate() {
        assert!(rows.get(r as i64).equal(&crop_resize(&imgs[r], *b, OUT)));
    }
}

#[test]
fn a_damaged_record_is_named_and_the_rest_of_the_shard_is_used() {
    let d = tempfile::tempdir().unwrap();
    let samples = chips(d.path());
    let dir = d.path().join("pack");
    let p = pack(&samples, &dir, 10, 3);
    // A record the first batch draws as an anchor: flip one byte in the middle of its pixels.
    let first = batches(&samples, cfg(8, Some(p.clone()), true, 0, 1, None), 0, 1);
    let victim = anchors(&first[0])[2] as usize;
    let (shard, rec) = (victim / 10, victim % 10);
    let path = dir.join(format!("shard-{shard:05}.gcp"));
    let mut bytes = std::fs::read(&path).unwrap();
    let record = 3 * SIDE * SIDE;
    let at = 64 + rec * record.div_ceil(64) * 64 + record / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let p = Pack::open(&dir).unwrap();
    let (n, bad) = p.verify();
    assert_eq!((n, bad.len()), (45, 1), "only the damaged chip is lost");
    let msg = bad[0].to_string();
    assert!(msg.contains(&format!("shard-{shard:05}.gcp")) && msg.contains(&format!("record {rec}")), "{msg}");
    assert!(msg.contains(&samples[victim].path.file_name().unwrap().to_string_lossy().to_string()), "{msg}");
    assert!(matches!(bad[0], PackError::Record { .. }));
    // The loader replaces it like an unreadable image; the batch is whole and counts it.
    let b = batches(&samples, cfg(8, Some(p.clone()), true, 0, 1, None), 0, 1);
    assert!(b[0].bad_images >= 1);
    assert!(!anchors(&b[0]).contains(&(victim as i64)));
    let cli = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_geossl-train")).args(args).output().unwrap();
    let o = cli(&["pack", "--verify", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("1 of 45 chips damaged") && err.contains(&format!("record {rec}")),
        "{err}"
    );

    // A truncated shard is named when the pack is opened.
    let last = dir.join("shard-00004.gcp");
    let len = std::fs::metadata(&last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(len - 100).unwrap();
    let e = Pack::open(&dir).unwrap_err().to_string();
    assert!(e.contains("shard-00004.gcp") && e.contains("truncated"), "{e}");

    // Packing into a pack, or chips of two sizes, is refused naming the cause; nothing is overwritten.
    let opt = PackOptions { bands: positional(3), shard_bytes: 1 << 20, workers: 1 };
    let e = write_pack(&samples, &dir, &opt, &indicatif::ProgressBar::hidden()).unwrap_err().to_string();
    assert!(e.contains("already holds a pack"), "{e}");
    let small = sentinel2_chips(&geossl_tests::data::fixtures(), &d.path().join("s2small"), 32, 40).unwrap();
    let mixed = [samples[..3].to_vec(), small[..1].to_vec()].concat();
    let e =
        write_pack(&mixed, &d.path().join("mixed"), &opt, &indicatif::ProgressBar::hidden()).unwrap_err().to_string();
    assert!(e.contains(&small[0].path.display().to_string()) && e.contains("32×32") && e.contains("48×48"), "{e}");
    let left: Vec<_> = std::fs::read_dir(d.path().join("mixed")).unwrap().collect();
    assert!(left.is_empty(), "a refused pack leaves nothing behind: {left:?}");
    // A pack for other bands is refused by name.
    let e = p.check_bands(&["red".into(), "green".into(), "blue".into(), "nir".into()]).unwrap_err().to_string();
    assert!(e.contains("the model takes [red, green, blue, nir]"), "{e}");
}

#[test]
fn pretraining_on_a_pack_cuts_on_the_device_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let samples = chips(d.path());
    let manifest = write_manifest(&samples, &d.path().join("s2/manifest.csv")).unwrap();
    let packdir = d.path().join("pack");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_geossl-train")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let out =
        run(&["pack", "--data", manifest.to_str().unwrap(), "--out", packdir.to_str().unwrap(), "--shard-mib", "1"]);
    assert!(out.contains("packed 45 chips (3 band(s) of 48×48 U8)"), "{out}");
    let cfg = common::small_config(d.path(), "tp", "moco-tp", 32, 2);
    let train = |out: &PathBuf, stop: &str, resume: bool| {
        let mut a = vec!["pretrain", "--no-progress", "--config", cfg.to_str().unwrap(), "--data"];
        a.extend([packdir.to_str().unwrap(), "--out", out.to_str().unwrap(), "--stop-after", stop]);
        if resume {
            a.push("--resume");
        }
        run(&a)
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    train(&a, "4", false);
    train(&b, "2", false);
    train(&b, "4", true);
    for file in ["model.safetensors", "queue.safetensors"] {
        let x = geossl_models::StateDict::read(&a.join("checkpoint").join(file)).unwrap();
        let y = geossl_models::StateDict::read(&b.join("checkpoint").join(file)).unwrap();
        for t in &x.tensors {
            assert_eq!(t.data, y.get(&t.name).unwrap().data, "{file}:{} differs after resuming", t.name);
        }
    }
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(
        last["loss"].as_f64().unwrap().is_finite() && last["temporal_partner_rate"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    // `geometric = "device"` without a pack is refused by name.
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("geometric = \"auto\""), "{text}");
    let text = text.replace("geometric = \"auto\"", "geometric = \"device\"");
    let dev_cfg = d.path().join("dev.toml");
    std::fs::write(&dev_cfg, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_geossl-train"))
        .args([
            "pretrain",
            "--no-progress",
            "--config",
            dev_cfg.to_str().unwrap(),
            "--data",
            manifest.to_str().unwrap(),
        ])
        .args(["--out", d.path().join("c").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is not a chip pack"), "{err}");
}
