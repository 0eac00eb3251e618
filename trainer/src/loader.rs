//! Parallel batch preparation for pretraining: worker threads decode images,
//! pick temporal partners and cut the geometric views; the training thread
//! receives ready `[B, C, S, S]` batches in step order.
//!
//! Everything a batch contains is a function of `(seed, step)`, so a resumed
//! run sees exactly the batches the original run would have seen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use crate::augment::{random_view_into, AugConfig};
use crate::data::{Sample, TemporalIndex};
use crate::image_io::{decode, DecodeError, Image};
use crate::rng::Rng;

/// One training batch (CPU tensors, stored units).
#[derive(Debug)]
pub struct Batch {
    pub step: u64,
    /// Query views `[B, C, S, S]`: uint8 when every image of the batch is
    /// 8-bit, else float.
    pub q: Tensor,
    /// Key views `[B, C, S, S]` (as `q`): the temporal partner's, or a second view of the anchor.
    pub k: Tensor,
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
}

impl Shared {
    fn image(&self, i: usize) -> Result<Image, DecodeError> {
        // A poisoned cache only means another worker panicked mid-insert: its map is still usable.
        if let Some(img) = self.cache.map.lock().unwrap_or_else(|p| p.into_inner()).get(&i) {
            return Ok(img.clone());
        }
        let s = &self.samples[i];
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

    fn batch(&self, step: u64) -> Result<Batch, LoaderError> {
        // Each rank its own augmentations (rank 0's are a single process's).
        let rank = (self.cfg.rank as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
        let mut rng = Rng::new(self.cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5151 ^ rank);
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
        for (row, mut a) in self.anchors(step).into_iter().enumerate() {
            // Unreadable images are replaced by random others, a bounded number of times.
            let mut tries = 0;
            let anchor_img = loop {
                match self.image(a) {
                    Ok(img) => break img,
                    Err(e) => {
                        tracing::warn!("skipping unreadable image: {e}");
                        bad += 1;
                        tries += 1;
                        if tries > 16 {
                            return Err(LoaderError::Unreadable(e));
                        }
                        a = rng.below(self.samples.len());
                    }
                }
            };
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
        Ok(Batch { step, q, k, geo: Tensor::from_slice(&geo).to_kind(Kind::Int64), with_partner, bad_images: bad })
    }
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
        let shared = Arc::new(Shared { samples, index, geo_labels, cfg: cfg.clone(), cache: Cache::default() });
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
        let eight = first_batch(vec![sample(p8.clone(), "a", "2020"), sample(p8.clone(), "a", "2021")]);
        assert_eq!((eight.q.kind(), eight.k.kind()), (Kind::Uint8, Kind::Uint8));
        assert_eq!(eight.q.size(), [2, 3, 16, 16]);
        assert_eq!(eight.with_partner, 2);
        // With a 16-bit image in the batch, the whole batch is float (stored units).
        let mixed = first_batch(vec![sample(p8.clone(), "a", "2020"), sample(p16.clone(), "a", "2021")]);
        assert_eq!((mixed.q.kind(), mixed.k.kind()), (Kind::Float, Kind::Float));
        // The same draws on 8-bit pixels resample alike in uint8 and in float (to rounding).
        let sixteen = first_batch(vec![sample(p16.clone(), "a", "2020"), sample(p16, "a", "2021")]);
        assert_eq!(sixteen.q.kind(), Kind::Float);
        let diff = (eight.q.to_kind(Kind::Float) - sixteen.q / 257.0).abs().max().double_value(&[]);
        assert!(diff <= 1.0, "uint8 vs float resampling differ by {diff}");
    }
}
