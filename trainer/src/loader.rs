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

use tch::{Kind, Tensor};

use crate::augment::{random_view, AugConfig};
use crate::data::{Sample, TemporalIndex};
use crate::image_io::{decode, Image};
use crate::rng::Rng;

/// One training batch (CPU tensors, stored units).
#[derive(Debug)]
pub struct Batch {
    pub step: u64,
    /// Query views `[B, C, S, S]`.
    pub q: Tensor,
    /// Key views `[B, C, S, S]`: the temporal partner's, or a second view of the anchor.
    pub k: Tensor,
    /// Geo-cluster label of each anchor `[B]` (int64; zeros without geo).
    pub geo: Tensor,
    pub with_partner: u64,
    /// Images that could not be read and were replaced by others.
    pub bad_images: u64,
}

/// What the loader needs to know.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub input_size: i64,
    pub bands: usize,
    pub temporal: bool,
    pub seed: u64,
    pub workers: usize,
    pub prefetch: usize,
    pub cache_bytes: usize,
    pub aug: AugConfig,
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
    fn image(&self, i: usize) -> Result<Image, String> {
        if let Some(img) = self.cache.map.lock().map_err(|_| "cache poisoned")?.get(&i) {
            return Ok(img.clone());
        }
        let s = &self.samples[i];
        let mut img = decode(&s.path, self.cfg.bands)?;
        if let Some(c) = s.crop {
            img = img.crop(c).map_err(|e| format!("{}: {e}", s.path.display()))?;
        }
        if self.cache.bytes.load(Ordering::Relaxed) + img.bytes() <= self.cfg.cache_bytes {
            self.cache.bytes.fetch_add(img.bytes(), Ordering::Relaxed);
            self.cache.map.lock().map_err(|_| "cache poisoned")?.insert(i, img.clone());
        }
        Ok(img)
    }

    /// The anchor indices of `step` (epoch-wise permutation, last partial batch dropped).
    fn anchors(&self, step: u64) -> Vec<usize> {
        let n = self.samples.len();
        let b = self.cfg.batch_size;
        let per_epoch = (n / b) as u64;
        let (epoch, pos) = (step / per_epoch, (step % per_epoch) as usize);
        let mut perm: Vec<usize> = (0..n).collect();
        Rng::new(self.cfg.seed ^ epoch.wrapping_mul(0x2545_f491_4f6c_dd1d)).shuffle(&mut perm);
        perm[pos * b..(pos + 1) * b].to_vec()
    }

    fn batch(&self, step: u64) -> Result<Batch, String> {
        let mut rng = Rng::new(self.cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5151);
        let s = self.cfg.input_size;
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut geo = Vec::new();
        let (mut with_partner, mut bad) = (0u64, 0u64);
        for mut a in self.anchors(step) {
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
                            return Err(format!("too many unreadable images in a row; last: {e}"));
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
            let (at, kt) = (anchor_img.tensor(), key_img.tensor());
            qs.push(random_view(&at, s, &self.cfg.aug, &mut rng));
            ks.push(random_view(&kt, s, &self.cfg.aug, &mut rng));
            geo.push(self.geo_labels[a]);
        }
        Ok(Batch {
            step,
            q: Tensor::stack(&qs, 0),
            k: Tensor::stack(&ks, 0),
            geo: Tensor::from_slice(&geo).to_kind(Kind::Int64),
            with_partner,
            bad_images: bad,
        })
    }
}

/// The running loader.
#[derive(Debug)]
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch, String>>>,
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
    pub fn next_batch(&mut self) -> Result<Batch, String> {
        let w = ((self.next - self.first) % self.receivers.len() as u64) as usize;
        let b = self.receivers[w].recv().map_err(|_| "loader thread stopped".to_string())??;
        debug_assert_eq!(b.step, self.next);
        self.next += 1;
        Ok(b)
    }
}
