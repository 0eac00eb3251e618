//! geossl's HNSW graph (Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
//! Hierarchical Navigable Small World graphs", TPAMI 2018), built as hnswlib builds it: levels drawn with
//! mL = 1/ln M, neighbours chosen by the paper's heuristic (Algorithm 4: keep a candidate only when it is
//! nearer the new row than every neighbour already kept), M links per row on the upper levels and 2M on
//! level 0, rows inserted from several threads at once (a row's links change under its lock; searches
//! read links without one). Unlike hnswlib, each build step ends by linking the rows the heuristic left
//! unreachable ([`Graph::reconnect`]: 0.1-0.4% of the benchmark's real-pixel rows, which no search returned).
//!
//! Rows are cosine-compared: each row is stored (f32, f16 or i8) with the inverse of its stored norm, and a
//! query (a unit f32 vector) scores `q · row / |row|` through [`super::simd`]'s kernels. Rows are keyed
//! `0..len()` in the order they were added.
//!
//! The vectors are contiguous (`len × D` codes), level-0 links too (`len × (2M + 1)`: a count, then the
//! links), so a search walks two flat arrays. Measured beside FAISS's HNSW in docs/benchmarks/search.md.
//!
//! File layout (little-endian): `GSSLHNSW`, file version (u32), quantization (u32: 0 f32, 1 f16, 2 i8),
//! D (u64), rows (u64), M (u32), entry row (u32), top level (u32), then per row its level (u8), its inverse
//! norm (f32), the codes (`rows × D`), the level-0 links (`rows × (2M + 1)` u32), the upper levels' length
//! (u64) and links (per row with level L, L blocks of `M + 1` u32, in row order).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::index::{to_i8, Quantization};
use super::pages;
use super::simd::{self, Simd};

const MAGIC: &[u8; 8] = b"GSSLHNSW";
const FILE_VERSION: u32 = 1;
/// `top` when the graph is empty.
const EMPTY: u64 = u64::MAX;
/// Row locks, shared by stripes of rows (a thread holds one at a time).
const LOCKS: usize = 4096;
/// The highest level a row can draw.
const MAX_LEVEL: usize = 31;

/// A candidate: its distance (the negated similarity) and row.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cand {
    dist: f32,
    id: u32,
}

impl Eq for Cand {}

impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cand {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.dist.total_cmp(&other.dist).then(self.id.cmp(&other.id))
    }
}

/// The stored rows.
#[derive(Debug)]
enum Codes {
    F32(Vec<f32>),
    /// Half-precision bits.
    F16(Vec<u16>),
    /// `round(127 · x / max|x|)` ([`to_i8`]).
    I8(Vec<i8>),
}

/// A search's scratch: the rows it visited (a generation per search, so nothing is cleared between
/// searches) and its heaps.
#[derive(Debug, Default)]
struct Context {
    visited: Vec<u32>,
    generation: u32,
    candidates: BinaryHeap<Reverse<Cand>>,
    found: BinaryHeap<Cand>,
    /// The inserted row (an insertion's query).
    query: Vec<f32>,
    row: Vec<f32>,
    other: Vec<f32>,
    ids: Vec<u32>,
    picked: Vec<u32>,
    pool: Vec<Cand>,
}

impl Context {
    /// A new search over `rows` rows: returns its generation.
    fn start(&mut self, rows: usize) -> u32 {
        if self.visited.len() < rows {
            let more = rows - self.visited.len();
            pages::reserve(&mut self.visited, more);
            self.visited.resize(rows, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.visited.fill(0);
            self.generation = 1;
        }
        self.candidates.clear();
        self.found.clear();
        self.generation
    }
}

/// The graph and its rows.
#[derive(Debug)]
pub struct Graph {
    d: usize,
    quantization: Quantization,
    /// Links per row on the upper levels (2M on level 0).
    m: usize,
    simd: Simd,
    codes: Codes,
    inv_norm: Vec<f32>,
    level: Vec<u8>,
    /// Per row: a count, then up to 2M links.
    base: Vec<AtomicU32>,
    /// Per row: where its upper levels' blocks start in `upper` (`len + 1` entries).
    upper_at: Vec<usize>,
    /// Per row with level L: L blocks of a count and up to M links (levels 1..=L).
    upper: Vec<AtomicU32>,
    /// The entry row (low 32 bits) and the top level (high 32), or [`EMPTY`].
    top: AtomicU64,
    locks: Vec<Mutex<()>>,
    /// Held by an insertion that raises the top level, for its whole length (as hnswlib does).
    raising: Mutex<()>,
    contexts: Mutex<Vec<Context>>,
}

fn lock(m: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The level row `key` draws: ⌊−ln(u)·mL⌋ with u uniform from a hash of the key (the same row gets the
/// same level however it was added).
fn draw_level(key: u64, m: usize) -> u8 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let ml = 1.0 / (m as f64).ln();
    ((-u.ln() * ml).floor() as usize).min(MAX_LEVEL) as u8
}

fn atomics(n: usize) -> impl Iterator<Item = AtomicU32> {
    (0..n).map(|_| AtomicU32::new(0))
}

impl Graph {
    /// An empty graph of `d`-dimensional rows stored as `quantization`, with `m` links per row (2m on
    /// level 0).
    pub fn new(d: usize, quantization: Quantization, m: usize) -> Graph {
        let codes = match quantization {
            Quantization::F32 => Codes::F32(Vec::new()),
            Quantization::F16 => Codes::F16(Vec::new()),
            Quantization::I8 => Codes::I8(Vec::new()),
        };
        Graph {
            d,
            quantization,
            m: m.max(2),
            simd: Simd::detect(),
            codes,
            inv_norm: Vec::new(),
            level: Vec::new(),
            base: Vec::new(),
            upper_at: vec![0],
            upper: Vec::new(),
            top: AtomicU64::new(EMPTY),
            locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
            raising: Mutex::new(()),
            contexts: Mutex::new(Vec::new()),
        }
    }

    /// Rows in the graph.
    pub fn len(&self) -> usize {
        self.inv_norm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inv_norm.is_empty()
    }

    pub fn dimensions(&self) -> usize {
        self.d
    }

    /// The kernels this graph's distances run on.
    pub fn simd(&self) -> Simd {
        self.simd
    }

    fn m0(&self) -> usize {
        2 * self.m
    }

    /// `q · row / |row|` for a unit query `q`.
    #[inline]
    fn similarity(&self, q: &[f32], id: u32) -> f32 {
        let (i, d) = (id as usize, self.d);
        let dot = match &self.codes {
            Codes::F32(v) => simd::dot_f32(self.simd, q, &v[i * d..(i + 1) * d]),
            Codes::F16(v) => simd::dot_f16(self.simd, q, &v[i * d..(i + 1) * d]),
            Codes::I8(v) => simd::dot_i8(self.simd, q, &v[i * d..(i + 1) * d]),
        };
        dot * self.inv_norm[i]
    }

    #[inline]
    fn dist(&self, q: &[f32], id: u32) -> f32 {
        -self.similarity(q, id)
    }

    #[inline]
    fn prefetch(&self, id: u32) {
        let (i, d) = (id as usize, self.d);
        match &self.codes {
            Codes::F32(v) => simd::prefetch(&v[i * d..]),
            Codes::F16(v) => simd::prefetch(&v[i * d..]),
            Codes::I8(v) => simd::prefetch(&v[i * d..]),
        }
    }

    /// Writes row `key` as stored (dequantized, not normalized) into `out` (`D` long).
    pub fn stored(&self, key: usize, out: &mut [f32]) {
        let d = self.d;
        let r = key * d..(key + 1) * d;
        match &self.codes {
            Codes::F32(v) => out.copy_from_slice(&v[r]),
            Codes::F16(v) => out.iter_mut().zip(&v[r]).for_each(|(o, &h)| *o = simd::f16_to_f32(h)),
            Codes::I8(v) => out.iter_mut().zip(&v[r]).for_each(|(o, &c)| *o = f32::from(c)),
        }
    }

    /// Row `id` as a unit vector (the query its insertion searches with).
    fn unit_row(&self, id: u32, out: &mut Vec<f32>) {
        out.resize(self.d, 0.0);
        self.stored(id as usize, out);
        let s = self.inv_norm[id as usize];
        out.iter_mut().for_each(|x| *x *= s);
    }

    /// Row `id`'s links on `level`: a count, then the links.
    #[inline]
    fn list(&self, id: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let w = self.m0() + 1;
            &self.base[id as usize * w..(id as usize + 1) * w]
        } else {
            let w = self.m + 1;
            let at = self.upper_at[id as usize] + (level - 1) * w;
            &self.upper[at..at + w]
        }
    }

    /// The links of a list (a count beyond the list's room is cut to it).
    #[inline]
    fn links(list: &[AtomicU32]) -> impl Iterator<Item = u32> + '_ {
        let n = (list[0].load(Ordering::Relaxed) as usize).min(list.len() - 1);
        list[1..=n].iter().map(|a| a.load(Ordering::Relaxed))
    }

    fn set_links(list: &[AtomicU32], ids: &[u32]) {
        for (a, &id) in list[1..].iter().zip(ids) {
            a.store(id, Ordering::Relaxed);
        }
        list[0].store(ids.len() as u32, Ordering::Release);
    }

    fn row_lock(&self, id: u32) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.locks[id as usize % LOCKS])
    }

    fn context(&self) -> Context {
        self.contexts.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
    }

    fn give_back(&self, ctx: Context) {
        self.contexts.lock().unwrap_or_else(|e| e.into_inner()).push(ctx);
    }

    /// Walks `level` from `cur` to the row nearest `q` that no link improves on.
    fn greedy(&self, q: &[f32], mut cur: Cand, level: usize) -> Cand {
        loop {
            let mut changed = false;
            for id in Self::links(self.list(cur.id, level)) {
                let dist = self.dist(q, id);
                if dist < cur.dist {
                    cur = Cand { dist, id };
                    changed = true;
                }
            }
            if !changed {
                return cur;
            }
        }
    }

    /// The best-first search of `level` from `entry`, keeping the `ef` nearest rows `admit` accepts in
    /// `ctx.found` (hnswlib's filtered search: rows the filter refuses are walked through, never kept).
    fn search_level(
        &self,
        q: &[f32],
        entry: Cand,
        ef: usize,
        level: usize,
        admit: Option<&dyn Fn(u64) -> bool>,
        ctx: &mut Context,
    ) {
        let generation = ctx.start(self.len());
        let Context { visited, candidates, found, .. } = ctx;
        let admitted = |id: u32| admit.is_none_or(|f| f(u64::from(id)));
        visited[entry.id as usize] = generation;
        let mut bound = f32::INFINITY;
        if admitted(entry.id) {
            found.push(entry);
            bound = entry.dist;
        }
        candidates.push(Reverse(entry));
        while let Some(Reverse(c)) = candidates.pop() {
            if c.dist > bound && (found.len() >= ef || admit.is_none()) {
                break;
            }
            let list = self.list(c.id, level);
            for id in Self::links(list) {
                if visited[id as usize] != generation {
                    self.prefetch(id);
                }
            }
            for id in Self::links(list) {
                let seen = &mut visited[id as usize];
                if *seen == generation {
                    continue;
                }
                *seen = generation;
                let dist = self.dist(q, id);
                if found.len() < ef || dist < bound {
                    candidates.push(Reverse(Cand { dist, id }));
                    if admitted(id) {
                        found.push(Cand { dist, id });
                        if found.len() > ef {
                            found.pop();
                        }
                    }
                    if let Some(w) = found.peek() {
                        bound = w.dist;
                    }
                }
            }
        }
    }

    /// Up to `count` rows nearest the unit vector `q` among those `admit` accepts (all when `None`), keeping
    /// `max(ef, count)` candidates: (key, cosine similarity), most similar first.
    pub fn search(&self, q: &[f32], count: usize, ef: usize, admit: Option<&dyn Fn(u64) -> bool>) -> Vec<(u64, f32)> {
        let top = self.top.load(Ordering::Acquire);
        if top == EMPTY || count == 0 {
            return Vec::new();
        }
        let (entry, top_level) = ((top & 0xffff_ffff) as u32, (top >> 32) as usize);
        let mut ctx = self.context();
        let mut cur = Cand { dist: self.dist(q, entry), id: entry };
        for level in (1..=top_level).rev() {
            cur = self.greedy(q, cur, level);
        }
        self.search_level(q, cur, ef.max(count), 0, admit, &mut ctx);
        let mut found: Vec<Cand> = ctx.found.drain().collect();
        self.give_back(ctx);
        found.sort_unstable();
        found.truncate(count);
        found.into_iter().map(|c| (u64::from(c.id), -c.dist)).collect()
    }

    /// The paper's neighbour heuristic over `pool` (sorted nearest first): up to `m` rows, each nearer the
    /// base row than every row kept before it. Into `picked`.
    fn pick(&self, pool: &[Cand], m: usize, picked: &mut Vec<u32>, row: &mut Vec<f32>) {
        picked.clear();
        if pool.len() <= m {
            picked.extend(pool.iter().map(|c| c.id));
            return;
        }
        for c in pool {
            if picked.len() >= m {
                break;
            }
            self.unit_row(c.id, row);
            if picked.iter().all(|&o| self.dist(row, o) >= c.dist) {
                picked.push(c.id);
            }
        }
    }

    /// Adds link `id` to `to`'s list on `level`, re-choosing `to`'s links by the heuristic when full.
    fn connect(&self, to: u32, id: u32, level: usize, ctx: &mut Context) {
        let room = if level == 0 { self.m0() } else { self.m };
        let _held = self.row_lock(to);
        let list = self.list(to, level);
        ctx.ids.clear();
        ctx.ids.extend(Self::links(list));
        if ctx.ids.contains(&id) {
            return;
        }
        if ctx.ids.len() < room {
            ctx.ids.push(id);
            Self::set_links(list, &ctx.ids);
            return;
        }
        let mut base = std::mem::take(&mut ctx.other);
        self.unit_row(to, &mut base);
        ctx.pool.clear();
        ctx.pool.extend(ctx.ids.iter().chain([&id]).map(|&o| Cand { dist: self.dist(&base, o), id: o }));
        ctx.pool.sort_unstable();
        let pool = std::mem::take(&mut ctx.pool);
        self.pick(&pool, room, &mut ctx.picked, &mut ctx.row);
        ctx.pool = pool;
        ctx.other = base;
        Self::set_links(list, &ctx.picked);
    }

    /// The level-0 links into each row, as compressed rows: row `i`'s are `from[at[i]..at[i + 1]]`.
    fn in_links(&self) -> (Vec<usize>, Vec<u32>) {
        let n = self.len();
        let mut at = vec![0usize; n + 1];
        for i in 0..n as u32 {
            for j in Self::links(self.list(i, 0)) {
                at[j as usize + 1] += 1;
            }
        }
        for i in 0..n {
            at[i + 1] += at[i];
        }
        let mut from = vec![0u32; at[n]];
        let mut next = at.clone();
        for i in 0..n as u32 {
            for j in Self::links(self.list(i, 0)) {
                from[next[j as usize]] = i;
                next[j as usize] += 1;
            }
        }
        (at, from)
    }

    /// Marks `start` and every row `step` leads to from it, through unmarked rows.
    fn mark(marked: &mut [bool], start: u32, mut step: impl FnMut(u32, &mut Vec<u32>)) {
        let mut stack = vec![start];
        let mut next = Vec::new();
        marked[start as usize] = true;
        while let Some(x) = stack.pop() {
            next.clear();
            step(x, &mut next);
            for &y in &next {
                if !marked[y as usize] {
                    marked[y as usize] = true;
                    stack.push(y);
                }
            }
        }
    }

    /// The rows a level-0 search for row `u` from the entry finds (among those `admit` accepts), nearest
    /// first, without `u`.
    fn near(&self, u: u32, entry: u32, admit: Option<&dyn Fn(u64) -> bool>, ctx: &mut Context) -> Vec<Cand> {
        let mut q = std::mem::take(&mut ctx.query);
        self.unit_row(u, &mut q);
        self.search_level(&q, Cand { dist: self.dist(&q, entry), id: entry }, 64, 0, admit, ctx);
        ctx.query = q;
        let mut found: Vec<Cand> = ctx.found.drain().filter(|c| c.id != u).collect();
        found.sort_unstable();
        found
    }

    /// Puts link `to` into `host`'s level-0 list: appended when there is room, else in place of the link
    /// farthest from `host` among those whose row `keep` does not need (all when it needs every one).
    /// Returns the link replaced.
    fn put_link(&self, host: u32, to: u32, keep: impl Fn(u32) -> bool, row: &mut Vec<f32>) -> Option<u32> {
        let list = self.list(host, 0);
        let mut ids: Vec<u32> = Self::links(list).collect();
        if ids.contains(&to) {
            return None;
        }
        if ids.len() < self.m0() {
            ids.push(to);
            Self::set_links(list, &ids);
            return None;
        }
        self.unit_row(host, row);
        let farthest = |pool: &mut dyn Iterator<Item = (usize, u32)>| {
            pool.max_by(|a, b| self.dist(row, a.1).total_cmp(&self.dist(row, b.1))).map(|(at, _)| at)
        };
        let at = farthest(&mut ids.iter().copied().enumerate().filter(|&(_, id)| !keep(id)))
            .or_else(|| farthest(&mut ids.iter().copied().enumerate()))?;
        let gone = std::mem::replace(&mut ids[at], to);
        Self::set_links(list, &ids);
        Some(gone)
    }

    /// Makes every row reachable on level 0, and the entry reachable from every row. The neighbour heuristic
    /// can leave a row that no list links to any more (its neighbours' lists were re-chosen without it), and a
    /// group of near-duplicate rows linked only among themselves: no search finds the first, none walks out of
    /// the second (hnswlib leaves both). Each such row is linked: a row the entry's walks miss gets a link from
    /// the nearest row they reach with room in its list (else in place of that row's farthest link to a row
    /// linked from elsewhere too), and a row that cannot walk to the entry links to the nearest row that can.
    /// Repeated until a pass changes nothing (a replaced link can cut off another row). Returns the links put.
    fn reconnect(&self) -> usize {
        let n = self.len();
        let top = self.top.load(Ordering::Acquire);
        if n < 2 || top == EMPTY {
            return 0;
        }
        let entry = (top & 0xffff_ffff) as u32;
        let mut ctx = self.context();
        let mut row = Vec::new();
        let mut put = 0;
        for _ in 0..8 {
            let before = put;
            let (at, from) = self.in_links();
            let mut links_in: Vec<u32> = at.windows(2).map(|w| (w[1] - w[0]) as u32).collect();
            let mut reaches = vec![false; n];
            let back = |x: u32, out: &mut Vec<u32>| out.extend_from_slice(&from[at[x as usize]..at[x as usize + 1]]);
            Self::mark(&mut reaches, entry, back);
            for u in 0..n as u32 {
                if reaches[u as usize] {
                    continue;
                }
                let seen = &reaches;
                let to = self.near(u, entry, Some(&|k| seen[k as usize]), &mut ctx).first().map_or(entry, |c| c.id);
                if let Some(gone) = self.put_link(u, to, |id| links_in[id as usize] < 2, &mut row) {
                    links_in[gone as usize] -= 1;
                }
                links_in[to as usize] += 1;
                put += 1;
                Self::mark(&mut reaches, u, back);
            }
            let mut reached = vec![false; n];
            let forward = |x: u32, out: &mut Vec<u32>| out.extend(Self::links(self.list(x, 0)));
            Self::mark(&mut reached, entry, forward);
            for u in 0..n as u32 {
                if reached[u as usize] {
                    continue;
                }
                let hosts = self.near(u, entry, None, &mut ctx);
                let host = hosts
                    .iter()
                    .find(|c| (self.list(c.id, 0)[0].load(Ordering::Relaxed) as usize) < self.m0())
                    .or(hosts.first())
                    .map_or(entry, |c| c.id);
                if let Some(gone) = self.put_link(host, u, |id| links_in[id as usize] < 2, &mut row) {
                    links_in[gone as usize] -= 1;
                }
                links_in[u as usize] += 1;
                put += 1;
                Self::mark(&mut reached, u, forward);
            }
            if put == before {
                break;
            }
        }
        self.give_back(ctx);
        put
    }

    /// Links row `id` (stored, not yet linked) into the graph, searching `ef` candidates per level.
    fn insert(&self, id: u32, ef: usize, ctx: &mut Context) {
        let level = self.level[id as usize] as usize;
        let mut q = std::mem::take(&mut ctx.query);
        self.unit_row(id, &mut q);
        let mut raising = None;
        let mut top = self.top.load(Ordering::Acquire);
        if top == EMPTY || ((top >> 32) as usize) < level {
            raising = Some(lock(&self.raising));
            top = self.top.load(Ordering::Acquire);
            if top == EMPTY {
                self.top.store(u64::from(id) | ((level as u64) << 32), Ordering::Release);
                ctx.query = q;
                return;
            }
        }
        let (entry, top_level) = ((top & 0xffff_ffff) as u32, (top >> 32) as usize);
        let mut cur = Cand { dist: self.dist(&q, entry), id: entry };
        for l in (level + 1..=top_level).rev() {
            cur = self.greedy(&q, cur, l);
        }
        for l in (0..=level.min(top_level)).rev() {
            self.search_level(&q, cur, ef, l, None, ctx);
            let mut pool: Vec<Cand> = std::mem::take(&mut ctx.pool);
            pool.clear();
            pool.extend(ctx.found.drain().filter(|c| c.id != id));
            pool.sort_unstable();
            if let Some(&nearest) = pool.first() {
                cur = nearest;
            }
            let mut picked = std::mem::take(&mut ctx.picked);
            let mut row = std::mem::take(&mut ctx.row);
            self.pick(&pool, self.m, &mut picked, &mut row);
            ctx.pool = pool;
            ctx.row = row;
            {
                let _held = self.row_lock(id);
                Self::set_links(self.list(id, l), &picked);
            }
            for &n in &picked {
                self.connect(n, id, l, ctx);
            }
            ctx.picked = picked;
        }
        if level > top_level {
            self.top.store(u64::from(id) | ((level as u64) << 32), Ordering::Release);
        }
        drop(raising);
        ctx.query = q;
    }

    /// Appends `rows` (`n × D`, unit vectors) as keys `len()..len() + n` and links them in from `threads`
    /// threads, searching `ef` candidates per insertion.
    pub fn add(&mut self, rows: &[f32], threads: usize, ef: usize) -> Result<(), String> {
        let d = self.d;
        if d == 0 || !rows.len().is_multiple_of(d) {
            return Err(format!("{} values are not rows of {d}", rows.len()));
        }
        let first = self.len();
        let n = rows.len() / d;
        if first + n >= u32::MAX as usize {
            return Err(format!("{} rows: an index holds fewer than 2³² rows", first + n));
        }
        match &mut self.codes {
            Codes::F32(v) => pages::reserve(v, n * d),
            Codes::F16(v) => pages::reserve(v, n * d),
            Codes::I8(v) => pages::reserve(v, n * d),
        }
        pages::reserve(&mut self.inv_norm, n);
        let links = n * (self.m0() + 1);
        pages::reserve(&mut self.base, links);
        for row in rows.chunks_exact(d) {
            let norm_sq = match &mut self.codes {
                Codes::F32(v) => {
                    v.extend_from_slice(row);
                    row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>()
                }
                Codes::F16(v) => {
                    let at = v.len();
                    v.extend(row.iter().map(|&x| half::f16::from_f32(x).to_bits()));
                    v[at..].iter().map(|&h| f64::from(simd::f16_to_f32(h)).powi(2)).sum()
                }
                Codes::I8(v) => {
                    let at = v.len();
                    v.extend(to_i8(row));
                    v[at..].iter().map(|&c| f64::from(c).powi(2)).sum()
                }
            };
            self.inv_norm.push(if norm_sq > 0.0 { (1.0 / norm_sq.sqrt()) as f32 } else { 0.0 });
            let key = self.level.len() as u64;
            let level = draw_level(key, self.m);
            self.level.push(level);
            let at = self.upper_at[self.upper_at.len() - 1] + usize::from(level) * (self.m + 1);
            self.upper_at.push(at);
        }
        self.base.extend(atomics(links));
        self.upper.extend(atomics(self.upper_at[self.upper_at.len() - 1] - self.upper.len()));
        // Rows go in spread out (j ↦ j·p mod n, p a prime not dividing n): a dataset's neighbouring rows are
        // neighbouring windows, nearly alike, and two of them inserted at once would not see each other.
        let step = [1_000_003u64, 998_244_353, 2_147_483_647]
            .into_iter()
            .find(|&p| !(n as u64).is_multiple_of(p))
            .unwrap_or(1);
        let graph = &*self;
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    let mut ctx = Context::default();
                    loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        if j >= n {
                            break;
                        }
                        let id = first + ((j as u64 * step) % n as u64) as usize;
                        graph.insert(id as u32, ef, &mut ctx);
                    }
                });
            }
        });
        let put = self.reconnect();
        tracing::debug!(rows = self.len(), links = put, "rows no search reached, or that reached no other, linked");
        Ok(())
    }

    /// Keeps rows `0..rows` and drops the rest with every link to them (the rows of a build that stopped
    /// before its manifest was written: the manifest says what the index holds).
    pub fn truncate(&mut self, rows: usize) {
        if rows >= self.len() {
            return;
        }
        let d = self.d;
        match &mut self.codes {
            Codes::F32(v) => v.truncate(rows * d),
            Codes::F16(v) => v.truncate(rows * d),
            Codes::I8(v) => v.truncate(rows * d),
        }
        self.inv_norm.truncate(rows);
        self.level.truncate(rows);
        self.upper_at.truncate(rows + 1);
        self.base.truncate(rows * (self.m0() + 1));
        self.upper.truncate(self.upper_at[rows]);
        let mut kept = Vec::new();
        for lists in [self.base.chunks(self.m0() + 1), self.upper.chunks(self.m + 1)] {
            for list in lists {
                kept.clear();
                kept.extend(Self::links(list).filter(|&id| (id as usize) < rows));
                Self::set_links(list, &kept);
            }
        }
        let top = (0..rows).max_by_key(|&i| (self.level[i], std::cmp::Reverse(i)));
        let top = top.map_or(EMPTY, |i| i as u64 | (u64::from(self.level[i]) << 32));
        self.top.store(top, Ordering::Release);
        self.reconnect();
    }

    /// Writes the graph in the file layout above.
    pub fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let q = match self.quantization {
            Quantization::F32 => 0u32,
            Quantization::F16 => 1,
            Quantization::I8 => 2,
        };
        let top = self.top.load(Ordering::Acquire);
        let (entry, top_level) = if top == EMPTY { (u32::MAX, 0) } else { (top as u32, (top >> 32) as u32) };
        w.write_all(MAGIC)?;
        w.write_all(&FILE_VERSION.to_le_bytes())?;
        w.write_all(&q.to_le_bytes())?;
        w.write_all(&(self.d as u64).to_le_bytes())?;
        w.write_all(&(self.len() as u64).to_le_bytes())?;
        w.write_all(&(self.m as u32).to_le_bytes())?;
        w.write_all(&entry.to_le_bytes())?;
        w.write_all(&top_level.to_le_bytes())?;
        w.write_all(&self.level)?;
        w.write_all(bytemuck::cast_slice(&self.inv_norm))?;
        match &self.codes {
            Codes::F32(v) => w.write_all(bytemuck::cast_slice(v))?,
            Codes::F16(v) => w.write_all(bytemuck::cast_slice(v))?,
            Codes::I8(v) => w.write_all(bytemuck::cast_slice(v))?,
        }
        let write_links = |w: &mut dyn Write, links: &[AtomicU32]| -> std::io::Result<()> {
            let mut buf = Vec::with_capacity(1 << 16);
            for chunk in links.chunks(1 << 16) {
                buf.clear();
                buf.extend(chunk.iter().map(|a| a.load(Ordering::Acquire)));
                w.write_all(bytemuck::cast_slice(&buf))?;
            }
            Ok(())
        };
        write_links(w, &self.base)?;
        w.write_all(&(self.upper.len() as u64).to_le_bytes())?;
        write_links(w, &self.upper)
    }

    /// Reads a graph written by [`Graph::write`], checking it holds together (every link a row, every count
    /// within its list).
    pub fn read(r: &mut impl Read) -> Result<Graph, String> {
        if cfg!(target_endian = "big") {
            return Err("index files are little-endian; this host is big-endian".into());
        }
        let io = |e: std::io::Error| format!("truncated or unreadable ({e})");
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(io)?;
        if &magic != MAGIC {
            return Err("not a geossl HNSW file".into());
        }
        let mut u32s = [0u32; 2];
        r.read_exact(bytemuck::cast_slice_mut(&mut u32s)).map_err(io)?;
        if u32s[0] != FILE_VERSION {
            return Err(format!("HNSW file version {} (this geossl reads {FILE_VERSION})", u32s[0]));
        }
        let quantization = match u32s[1] {
            0 => Quantization::F32,
            1 => Quantization::F16,
            2 => Quantization::I8,
            q => return Err(format!("unknown quantization code {q}")),
        };
        let mut sizes = [0u64; 2];
        r.read_exact(bytemuck::cast_slice_mut(&mut sizes)).map_err(io)?;
        let mut params = [0u32; 3];
        r.read_exact(bytemuck::cast_slice_mut(&mut params)).map_err(io)?;
        let (d, n, m) = (sizes[0] as usize, sizes[1] as usize, params[0] as usize);
        if d == 0 || m < 2 || n >= u32::MAX as usize || d.checked_mul(n).is_none_or(|x| x > 1 << 40) {
            return Err(format!("implausible sizes: {n} rows of {d}, M = {m}"));
        }
        let mut g = Graph::new(d, quantization, m);
        g.level = vec![0u8; n];
        r.read_exact(&mut g.level).map_err(io)?;
        if let Some(l) = g.level.iter().find(|&&l| usize::from(l) > MAX_LEVEL) {
            return Err(format!("a row at level {l}"));
        }
        pages::reserve(&mut g.inv_norm, n);
        g.inv_norm.resize(n, 0.0);
        r.read_exact(bytemuck::cast_slice_mut(&mut g.inv_norm)).map_err(io)?;
        match &mut g.codes {
            Codes::F32(v) => {
                pages::reserve(v, n * d);
                v.resize(n * d, 0.0);
                r.read_exact(bytemuck::cast_slice_mut(v)).map_err(io)?;
            }
            Codes::F16(v) => {
                pages::reserve(v, n * d);
                v.resize(n * d, 0);
                r.read_exact(bytemuck::cast_slice_mut(v)).map_err(io)?;
            }
            Codes::I8(v) => {
                pages::reserve(v, n * d);
                v.resize(n * d, 0);
                r.read_exact(bytemuck::cast_slice_mut(v)).map_err(io)?;
            }
        }
        for &l in &g.level {
            let at = g.upper_at[g.upper_at.len() - 1] + usize::from(l) * (m + 1);
            g.upper_at.push(at);
        }
        let read_links = |r: &mut dyn Read, len: usize, width: usize| -> Result<Vec<AtomicU32>, String> {
            let mut out = Vec::new();
            pages::reserve(&mut out, len);
            let mut buf = vec![0u32; 1 << 16];
            while out.len() < len {
                let take = (len - out.len()).min(buf.len());
                r.read_exact(bytemuck::cast_slice_mut(&mut buf[..take])).map_err(io)?;
                out.extend(buf[..take].iter().map(|&x| AtomicU32::new(x)));
            }
            for list in out.chunks(width) {
                let count = list[0].load(Ordering::Relaxed) as usize;
                if count >= width || list[1..=count].iter().any(|a| a.load(Ordering::Relaxed) as usize >= n) {
                    return Err("a link list that does not hold together".into());
                }
            }
            Ok(out)
        };
        g.base = read_links(r, n * (g.m0() + 1), g.m0() + 1)?;
        let mut len = [0u64; 1];
        r.read_exact(bytemuck::cast_slice_mut(&mut len)).map_err(io)?;
        let upper_len = g.upper_at[n];
        if len[0] as usize != upper_len {
            return Err(format!("{} upper-level links; the rows' levels make {upper_len}", len[0]));
        }
        g.upper = read_links(r, upper_len, m + 1)?;
        if r.read(&mut [0u8; 1]).map_err(io)? != 0 {
            return Err("bytes after the end of the graph".into());
        }
        let (entry, top_level) = (params[1], params[2]);
        if n > 0 {
            if entry as usize >= n || top_level as usize != usize::from(g.level[entry as usize]) {
                return Err(format!("entry row {entry} at level {top_level} is not a row of that level"));
            }
            g.top.store(u64::from(entry) | (u64::from(top_level) << 32), Ordering::Release);
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut v: Vec<f32> = (0..n * d).map(|_| next()).collect();
        for row in v.chunks_exact_mut(d) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    /// Rows a walk from the entry misses, and rows from which no walk gets to the entry (level 0).
    fn cut_off(g: &Graph) -> (usize, usize) {
        let n = g.len();
        let entry = (g.top.load(Ordering::Acquire) & 0xffff_ffff) as u32;
        let (at, from) = g.in_links();
        let (mut reached, mut reaches) = (vec![false; n], vec![false; n]);
        Graph::mark(&mut reached, entry, |x, out| out.extend(Graph::links(g.list(x, 0))));
        Graph::mark(&mut reaches, entry, |x, out| out.extend_from_slice(&from[at[x as usize]..at[x as usize + 1]]));
        (reached.iter().filter(|&&r| !r).count(), reaches.iter().filter(|&&r| !r).count())
    }

    /// No row of `g` is cut off, and for every fifth row a search that may keep all rows (so walks the whole
    /// graph) finds as best row the best of a scan of all rows with the same scores.
    fn exhaustive_equals_scan(g: &Graph, rows: &[f32], what: &str) {
        let (n, d) = (g.len(), g.d);
        assert_eq!(cut_off(g), (0, 0), "{what}: rows cut off from the entry (to, from)");
        for i in (0..n).step_by(5) {
            let q = &rows[i * d..(i + 1) * d];
            let walked = g.search(q, 1, n, None)[0];
            let scanned = (0..n as u32).map(|j| Cand { dist: g.dist(q, j), id: j }).min().unwrap();
            assert_eq!(walked, (u64::from(scanned.id), -scanned.dist), "{what}: row {i}");
        }
    }

    /// Mechanics only (random rows): the index's recall on real embeddings is tested in serve/tests/search.rs.
    #[test]
    fn a_graph_finds_each_row_and_survives_its_file() {
        let (n, d) = (3000, 24);
        let rows = unit_rows(n, d, 7);
        for q in [Quantization::F32, Quantization::F16, Quantization::I8] {
            let mut g = Graph::new(d, q, 8);
            g.add(&rows[..1000 * d], 2, 64).unwrap();
            exhaustive_equals_scan(&g, &rows, &format!("{q:?}, 1,000 rows"));
            g.add(&rows[1000 * d..], 2, 64).unwrap();
            assert_eq!(g.len(), n);
            exhaustive_equals_scan(&g, &rows, &format!("{q:?}, 3,000 rows"));
            let mut bytes = Vec::new();
            g.write(&mut bytes).unwrap();
            let back = Graph::read(&mut bytes.as_slice()).unwrap();
            let mut again = Vec::new();
            back.write(&mut again).unwrap();
            assert_eq!(bytes, again, "{q:?}: the file reads back as written");
            let found = (0..n)
                .filter(|&i| back.search(&rows[i * d..(i + 1) * d], 1, 64, None).first().map(|h| h.0) == Some(i as u64))
                .count();
            // A loose bound on the greedy walk (2,997-3,000 measured): a broken graph misses far more.
            assert!(found * 100 >= 95 * n, "{q:?}: {found} of {n} rows found themselves at ef 64");
            let odd = |k: u64| k % 2 == 1;
            let hits = back.search(&rows[..d], 10, 64, Some(&odd));
            assert_eq!(hits.len(), 10);
            assert!(hits.iter().all(|h| h.0 % 2 == 1), "{q:?}: {hits:?}");
            assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1), "most similar first");
            let mut cut = Graph::read(&mut bytes.as_slice()).unwrap();
            cut.truncate(1000);
            assert_eq!(cut.len(), 1000);
            exhaustive_equals_scan(&cut, &rows, &format!("{q:?}, cut to 1,000 rows"));
            let found =
                (0..1000).filter(|&i| cut.search(&rows[i * d..(i + 1) * d], 1, 64, None)[0].0 == i as u64).count();
            assert!(found >= 950, "{q:?}: cut to 1,000 rows, {found} found themselves at ef 64");
            assert!(cut.search(&rows[1500 * d..1501 * d], 50, 64, None).iter().all(|h| h.0 < 1000));
            let mut cut = bytes.clone();
            cut.truncate(bytes.len() - 3);
            assert!(Graph::read(&mut cut.as_slice()).unwrap_err().contains("truncated"));
        }
        assert!(Graph::read(&mut &b"GSSLHNSX"[..]).unwrap_err().contains("not a geossl HNSW file"));
    }
}
