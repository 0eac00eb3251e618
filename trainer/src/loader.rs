//! Parallel batch preparation for pretraining: worker threads read images,
//! pick temporal partners and draw the geometric views; the training thread
//! receives batches in step order. Two ways to cut the views:
//!
//! * on the loader threads (files or a pack): each image decoded and each view resampled there, batches
//!   of ready `[B, C, S, S]` views;
//! * on the training device (a chip pack): the threads only read each chip's bytes into `[B, C, H, W]`
//!   and draw the crop boxes (the same draws, in the same order, as the first way); the whole batch is
//!   cut at once on the device ([`crate::augment::crop_resize_batch`]).
//!
//! Everything a batch contains is a function of `(seed, step)`, so a resumed
//! run sees exactly the batches the original run would have seen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use geossl_models::SampleType;

use crate::augment::{
    crop_resize_batch, crop_resize_rows_into, random_view_into, rows_array, view_crop, AugConfig, Crop,
};
use crate::data::{Sample, TemporalIndex};
use crate::image_io::{decode, DecodeError, Image};
use crate::pack::Pack;
use crate::rng::Rng;

/// One side of a batch (query or key), as CPU tensors in stored units.
#[derive(Debug)]
pub enum Views {
    /// Views cut on the loader threads, `[B, C, S, S]`: uint8 when every image of the batch is 8-bit,
    /// else float.
    Cut(Tensor),
    /// Raw chips `[B, C, H, W]` (a channels-last view of the pack's `[B, H, W, C]` bytes) as stored:
    /// uint8; int16 holding uint16 or int16 samples; float. And the crop of each row's view, to cut on the
    /// training device.
    Raw { chips: Tensor, boxes: Vec<Crop>, stored: SampleType, recycle: Recycle },
}

/// uint16 samples travel as int16 bits: widened and masked back to 0..65535 (on the chips' device).
fn widen(chips: &Tensor, stored: SampleType) -> Tensor {
    if stored == SampleType::U16 {
        chips.to_kind(Kind::Int).bitwise_and(0xffff)
    } else {
        chips.shallow_clone()
    }
}

/// Batch arrays a loader reuses: a raw batch's array returns here when its batch is dropped, and the next
/// batch is read into it instead of into fresh memory (whose page faults cost as much CPU time as the reads).
#[derive(Debug, Default)]
struct Pool(Mutex<Vec<Tensor>>);

impl Pool {
    /// A contiguous CPU array of `shape` and `kind` (a returned one, or a new one).
    fn take(&self, shape: [i64; 4], kind: Kind) -> Tensor {
        let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match free.iter().position(|t| t.size() == shape && t.kind() == kind) {
            Some(i) => free.swap_remove(i),
            None => Tensor::empty(shape, (kind, Device::Cpu)),
        }
    }

    /// Hands `t` back for a later [`Pool::take`].
    fn give(&self, t: Tensor) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(t);
    }
}

/// Hands a raw batch's array back to its loader's pool when the batch is dropped. The views of a batch
/// must not be kept past it (`Views::to_device` makes new tensors).
#[derive(Debug, Default)]
pub struct Recycle(Option<(Tensor, std::sync::Weak<Pool>)>);

impl Recycle {
    /// Nothing to hand back (arrays made outside a loader).
    pub fn none() -> Self {
        Self(None)
    }
}

impl Drop for Recycle {
    fn drop(&mut self) {
        if let Some((t, pool)) = self.0.take() {
            if let Some(pool) = pool.upgrade() {
                pool.give(t);
            }
        }
    }
}

impl Views {
    /// The views `[B, C, size, size]` on `dev`: cut ones moved there, raw chips moved and cut there
    /// (float in stored units, or uint8 for 8-bit chips cut on the CPU).
    pub fn to_device(&self, dev: Device, size: i64) -> Tensor {
        match self {
            Views::Cut(t) => t.to_device(dev),
            Views::Raw { chips, boxes, stored, .. } => {
                crop_resize_batch(&widen(&chips.to_device(dev), *stored), boxes, size)
            }
        }
    }

    /// `f` applied to [`Self::to_device`]'s views. On the CPU a raw batch's views are cut into an array of
    /// the loader's pool, reused by a later batch once `f` returns: `f` must not keep the views or a view of
    /// them (its result must own its memory, as the step's normalization does).
    pub fn with_device<R>(&self, dev: Device, size: i64, f: impl FnOnce(&Tensor) -> R) -> R {
        match self {
            Views::Raw { chips, boxes, stored, recycle } if dev == Device::Cpu => {
                let x = widen(chips, *stored);
                let (shape, kind) = rows_array(&x, size);
                let pool = recycle.0.as_ref().and_then(|(_, p)| p.upgrade());
                let array = pool.as_ref().map_or_else(|| Tensor::empty(shape, (kind, dev)), |p| p.take(shape, kind));
                let views = array.permute([0, 3, 1, 2]);
                crop_resize_rows_into(&x, boxes, &views);
                let out = f(&views);
                drop(views);
                if let Some(p) = pool {
                    p.give(array);
                }
                out
            }
            _ => f(&self.to_device(dev, size)),
        }
    }

    /// Rows of the batch.
    pub fn len(&self) -> i64 {
        match self {
            Views::Cut(t) | Views::Raw { chips: t, .. } => t.size()[0],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One training batch.
#[derive(Debug)]
pub struct Batch {
    pub step: u64,
    /// Query views of the anchors.
    pub q: Views,
    /// Key views (as `q`): the temporal partner's, or a second view of the anchor.
    pub k: Views,
    /// Geo-cluster label of each anchor `[B]` (int64; zeros without geo).
    pub geo: Tensor,
    pub with_partner: u64,
    /// Images that could not be read and were replaced by others.
    pub bad_images: u64,
}

/// Why the loader could not produce a batch.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// More than a bounded number of images in a row could not be read (the data, not a glitch).
    #[error("too many unreadable images in a row; last: {0}")]
    Unreadable(#[source] DecodeError),
    /// A worker thread ended (it panicked or could not start).
    #[error("loader thread stopped")]
    Stopped,
}

/// What the loader needs to know.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub input_size: i64,
    /// Band names in channel order (TIFF bands are picked by them).
    pub bands: Vec<String>,
    pub temporal: bool,
    pub seed: u64,
    pub workers: usize,
    pub prefetch: usize,
    pub cache_bytes: usize,
    pub aug: AugConfig,
    /// Data-parallel: this process's rank and the world size. Every rank draws the same epoch permutation
    /// and takes its own `batch_size` of each global batch of `world × batch_size` (DistributedSampler).
    pub rank: usize,
    pub world: usize,
    /// The chip pack the samples come from (in its order); `None`: decode the samples' files.
    pub pack: Option<Arc<Pack>>,
    /// Hand raw chips and crop boxes to the training device instead of cut views (needs `pack`).
    pub device_crop: bool,
}

/// Decoded-image cache shared by the workers, bounded in bytes.
#[derive(Debug, Default)]
struct Cache {
    map: Mutex<HashMap<usize, Image>>,
    bytes: AtomicUsize,
}

#[derive(Debug)]
struct Shared {
    samples: Vec<Sample>,
    index: TemporalIndex,
    geo_labels: Vec<i64>,
    cfg: LoaderConfig,
    cache: Cache,
    pool: Arc<Pool>,
}

impl Shared {
    fn image(&self, i: usize) -> Result<Image, DecodeError> {
        // A poisoned cache only means another worker panicked mid-insert: its map is still usable.
        if let Some(img) = self.cache.map.lock().unwrap_or_else(|p| p.into_inner()).get(&i) {
            return Ok(img.clone());
        }
        let s = &self.samples[i];
        if let Some(p) = &self.cfg.pack {
            return p.image(i).map_err(|e| DecodeError::Record(e.to_string()));
        }
        let mut img = decode(&s.path, &self.cfg.bands)?;
        if let Some(c) = s.crop {
            img = img.crop(c).map_err(|e| DecodeError::Window(format!("{}: {e}", s.path.display())))?;
        }
        if self.cache.bytes.load(Ordering::Relaxed) + img.bytes() <= self.cfg.cache_bytes {
            self.cache.bytes.fetch_add(img.bytes(), Ordering::Relaxed);
            self.cache.map.lock().unwrap_or_else(|p| p.into_inner()).insert(i, img.clone());
        }
        Ok(img)
    }

    /// The anchor indices of `step` (epoch-wise permutation, last partial batch dropped).
    fn anchors(&self, step: u64) -> Vec<usize> {
        let n = self.samples.len();
        let b = self.cfg.batch_size;
        let global = b * self.cfg.world.max(1);
        let per_epoch = (n / global) as u64;
        let (epoch, pos) = (step / per_epoch, (step % per_epoch) as usize);
        let mut perm: Vec<usize> = (0..n).collect();
        Rng::new(self.cfg.seed ^ epoch.wrapping_mul(0x2545_f491_4f6c_dd1d)).shuffle(&mut perm);
        let at = pos * global + self.cfg.rank * b;
        perm[at..at + b].to_vec()
    }

    /// The random stream of `step` (each rank its own augmentations; rank 0's are a single process's).
    fn rng(&self, step: u64) -> Rng {
        let rank = (self.cfg.rank as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
        Rng::new(self.cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5151 ^ rank)
    }

    /// Reads a readable anchor for `a`: unreadable ones are replaced by random others, a bounded number
    /// of times (`bad` counts them).
    fn readable<T>(
        &self,
        mut a: usize,
        rng: &mut Rng,
        bad: &mut u64,
        mut read: impl FnMut(usize) -> Result<T, DecodeError>,
    ) -> Result<(usize, T), LoaderError> {
        let mut tries = 0;
        loop {
            match read(a) {
                Ok(x) => return Ok((a, x)),
                Err(e) => {
                    tracing::warn!("skipping unreadable image: {e}");
                    *bad += 1;
                    tries += 1;
                    if tries > 16 {
                        return Err(LoaderError::Unreadable(e));
                    }
                    a = rng.below(self.samples.len());
                }
            }
        }
    }

    fn batch(&self, step: u64) -> Result<Batch, LoaderError> {
        match &self.cfg.pack {
            Some(p) if self.cfg.device_crop => self.raw_batch(step, p),
            _ => self.cut_batch(step),
        }
    }

    /// Raw chips and crop boxes: the same anchors, partners and crop draws as [`Self::cut_batch`], read
    /// straight into the batch arrays.
    fn raw_batch(&self, step: u64, pack: &Pack) -> Result<Batch, LoaderError> {
        let mut rng = self.rng(step);
        let sh = &pack.shape;
        let kind = match sh.sample_type {
            SampleType::U8 => Kind::Uint8,
            SampleType::U16 | SampleType::I16 => Kind::Int16,
            _ => Kind::Float,
        };
        let (b, n) = (self.cfg.batch_size, sh.record_bytes() as usize);
        let shape = [b as i64, sh.height as i64, sh.width as i64, sh.channels as i64];
        // Each chip is read straight into its row of the batch (one positioned read; no decoding, no copy).
        let (mut q, mut k) = (self.pool.take(shape, kind), self.pool.take(shape, kind));
        let recycle = |t: &Tensor| Recycle(Some((t.shallow_clone(), Arc::downgrade(&self.pool))));
        let (q_back, k_back) = (recycle(&q), recycle(&k));
        let (qbuf, kbuf) = (bytes_mut(&mut q), bytes_mut(&mut k));
        let read = |i: usize, dst: &mut [u8]| pack.read_into(i, dst).map_err(|e| DecodeError::Record(e.to_string()));
        let (mut qb, mut kb, mut geo) = (Vec::with_capacity(b), Vec::with_capacity(b), Vec::with_capacity(b));
        let (mut with_partner, mut bad) = (0u64, 0u64);
        let (h, w) = (sh.height as i64, sh.width as i64);
        let rows = qbuf.chunks_exact_mut(n).zip(kbuf.chunks_exact_mut(n));
        for (a, (qrow, krow)) in self.anchors(step).into_iter().zip(rows) {
            let (a, ()) = self.readable(a, &mut rng, &mut bad, |i| read(i, qrow))?;
            let partner = if self.cfg.temporal { self.index.partner(a, &self.samples, &mut rng) } else { None };
            match partner.map(|p| read(p, krow)) {
                Some(Ok(())) => with_partner += 1,
                Some(Err(e)) => {
                    tracing::warn!("temporal partner unreadable, using the anchor: {e}");
                    bad += 1;
                    krow.copy_from_slice(qrow);
                }
                None => krow.copy_from_slice(qrow),
            }
            qb.push(view_crop(h, w, &self.cfg.aug, &mut rng));
            kb.push(view_crop(h, w, &self.cfg.aug, &mut rng));
            geo.push(self.geo_labels[a]);
        }
        let (q, k) = (q.permute([0, 3, 1, 2]), k.permute([0, 3, 1, 2]));
        let stored = sh.sample_type;
        Ok(Batch {
            step,
            q: Views::Raw { chips: q, boxes: qb, stored, recycle: q_back },
            k: Views::Raw { chips: k, boxes: kb, stored, recycle: k_back },
            geo: Tensor::from_slice(&geo).to_kind(Kind::Int64),
            with_partner,
            bad_images: bad,
        })
    }

    fn cut_batch(&self, step: u64) -> Result<Batch, LoaderError> {
        let mut rng = self.rng(step);
        let s = self.cfg.input_size;
        let b = self.cfg.batch_size as i64;
        // Views are resampled straight into their batch rows: uint8 while every
        // image so far is 8-bit (libtorch resamples uint8 fastest, and the batch
        // is a quarter of the bytes to move), float from the first that is not.
        let shape = [b, self.cfg.bands.len() as i64, s, s];
        let (mut q, mut k) =
            (Tensor::empty(shape, (Kind::Uint8, Device::Cpu)), Tensor::empty(shape, (Kind::Uint8, Device::Cpu)));
        let mut geo = Vec::new();
        let (mut with_partner, mut bad) = (0u64, 0u64);
        for (row, a) in self.anchors(step).into_iter().enumerate() {
            let (a, anchor_img) = self.readable(a, &mut rng, &mut bad, |i| self.image(i))?;
            let partner = if self.cfg.temporal { self.index.partner(a, &self.samples, &mut rng) } else { None };
            let key_img = match partner.map(|p| self.image(p)) {
                Some(Ok(img)) => {
                    with_partner += 1;
                    img
                }
                Some(Err(e)) => {
                    tracing::warn!("temporal partner unreadable, using the anchor: {e}");
                    bad += 1;
                    anchor_img.clone()
                }
                None => anchor_img.clone(),
            };
            let (mut at, mut kt) = (anchor_img.raw_tensor(), key_img.raw_tensor());
            if q.kind() == Kind::Uint8 && (at.kind() != Kind::Uint8 || kt.kind() != Kind::Uint8) {
                (q, k) = (q.to_kind(Kind::Float), k.to_kind(Kind::Float));
            }
            if q.kind() == Kind::Float {
                (at, kt) = (at.to_kind(Kind::Float), kt.to_kind(Kind::Float));
            }
            random_view_into(&at, &q.narrow(0, row as i64, 1), &self.cfg.aug, &mut rng);
            random_view_into(&kt, &k.narrow(0, row as i64, 1), &self.cfg.aug, &mut rng);
            geo.push(self.geo_labels[a]);
        }
        Ok(Batch {
            step,
            q: Views::Cut(q),
            k: Views::Cut(k),
            geo: Tensor::from_slice(&geo).to_kind(Kind::Int64),
            with_partner,
            bad_images: bad,
        })
    }
}

/// The bytes of `t`, a contiguous CPU tensor that nothing else reads or writes meanwhile, to fill in place.
#[allow(unsafe_code)]
fn bytes_mut(t: &mut Tensor) -> &mut [u8] {
    assert!(t.is_contiguous() && t.device() == Device::Cpu, "a contiguous CPU tensor");
    let n = t.numel() * t.kind().elt_size_in_bytes();
    // SAFETY: `t` is a contiguous CPU tensor of `n` bytes starting at `data_ptr` (a whole array from
    // `Pool::take`, never a view with an offset); the slice borrows `t` mutably, so it cannot outlive it.
    // The only other handle to the storage is the batch's `Recycle`, untouched until the batch is dropped.
    // Any byte pattern is a valid value of the integer and float kinds written through it.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<u8>(), n) }
}

/// The running loader.
#[derive(Debug)]
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch, LoaderError>>>,
    next: u64,
    first: u64,
}

impl Loader {
    /// Starts `cfg.workers` threads producing batches `start..end`; `index` groups `samples` by location.
    pub fn start(
        samples: Vec<Sample>,
        index: TemporalIndex,
        geo_labels: Vec<i64>,
        cfg: LoaderConfig,
        start: u64,
        end: u64,
    ) -> Self {
        let workers = cfg.workers.max(1);
        let shared = Arc::new(Shared {
            samples,
            index,
            geo_labels,
            cfg: cfg.clone(),
            cache: Cache::default(),
            pool: Arc::default(),
        });
        let mut receivers = Vec::new();
        for w in 0..workers as u64 {
            let (tx, rx) = sync_channel(cfg.prefetch.max(1));
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("geossl-loader-{w}"))
                .spawn(move || {
                    let mut step = start + w;
                    while step < end {
                        if tx.send(shared.batch(step)).is_err() {
                            return; // trainer stopped
                        }
                        step += workers as u64;
                    }
                })
                .map(|_| ())
                .unwrap_or_else(|e| tracing::error!("cannot start loader thread: {e}"));
            receivers.push(rx);
        }
        Self { receivers, next: start, first: start }
    }

    /// The next batch in step order.
    pub fn next_batch(&mut self) -> Result<Batch, LoaderError> {
        let w = ((self.next - self.first) % self.receivers.len() as u64) as usize;
        let b = self.receivers[w].recv().map_err(|_| LoaderError::Stopped)??;
        debug_assert_eq!(b.step, self.next);
        self.next += 1;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn sample(path: PathBuf, loc: &str, time: &str) -> Sample {
        Sample {
            path,
            lat: 0.0,
            lon: 0.0,
            timestamp: Some(time.into()),
            location_id: loc.into(),
            label: None,
            crop: None,
        }
    }

    fn first_batch(samples: Vec<Sample>) -> Batch {
        let cfg = LoaderConfig {
            batch_size: samples.len(),
            input_size: 16,
            bands: crate::image_io::positional(3),
            temporal: true,
            seed: 7,
            workers: 1,
            prefetch: 1,
            cache_bytes: 0,
            aug: AugConfig::default(),
            rank: 0,
            world: 1,
            pack: None,
            device_crop: false,
        };
        let index = TemporalIndex::new(&samples);
        let n = samples.len();
        Loader::start(samples, index, vec![0; n], cfg, 0, 1).next_batch().unwrap()
    }

    /// An 8-bit PNG and the same pixels ×257 as a 16-bit PNG (so 16-bit/257 = 8-bit values).
    fn pair_of_depths(dir: &Path) -> (PathBuf, PathBuf) {
        let (w, h) = (40u32, 30u32);
        let px = |x: u32, y: u32| [(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8];
        let img8 = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(px(x, y)));
        let img16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(w, h, |x, y| {
            image::Rgb(px(x, y).map(|v| u16::from(v) * 257))
        });
        let (p8, p16) = (dir.join("a8.png"), dir.join("a16.png"));
        img8.save(&p8).unwrap();
        img16.save(&p16).unwrap();
        (p8, p16)
    }

    #[test]
    fn eight_bit_batches_stay_uint8_and_mixed_batches_become_float() {
        let dir = tempfile::tempdir().unwrap();
        let (p8, p16) = pair_of_depths(dir.path());
        let cut = |v: &Views| match v {
            Views::Cut(t) => t.shallow_clone(),
            Views::Raw { .. } => panic!("views cut on the device without a pack"),
        };
        let eight = first_batch(vec![sample(p8.clone(), "a", "2020"), sample(p8.clone(), "a", "2021")]);
        let (eight_q, eight_k) = (cut(&eight.q), cut(&eight.k));
        assert_eq!((eight_q.kind(), eight_k.kind()), (Kind::Uint8, Kind::Uint8));
        assert_eq!(eight_q.size(), [2, 3, 16, 16]);
        assert_eq!(eight.with_partner, 2);
        // With a 16-bit image in the batch, the whole batch is float (stored units).
        let mixed = first_batch(vec![sample(p8.clone(), "a", "2020"), sample(p16.clone(), "a", "2021")]);
        assert_eq!((cut(&mixed.q).kind(), cut(&mixed.k).kind()), (Kind::Float, Kind::Float));
        // The same draws on 8-bit pixels resample alike in uint8 and in float (to rounding).
        let sixteen = first_batch(vec![sample(p16.clone(), "a", "2020"), sample(p16, "a", "2021")]);
        assert_eq!(cut(&sixteen.q).kind(), Kind::Float);
        let diff = (eight_q.to_kind(Kind::Float) - cut(&sixteen.q) / 257.0).abs().max().double_value(&[]);
        assert!(diff <= 1.0, "uint8 vs float resampling differ by {diff}");
    }
}
