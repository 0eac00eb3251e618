// The HNSW prototype measured in docs/benchmarks/search.md ("An HNSW of geossl's own"): not part of the
// workspace; a standalone binary (cargo new, this as src/main.rs; RUSTFLAGS="-C target-feature=+avx2,+fma",
// PREFETCH=1 at build time for the prefetching variant) over the benchmark's 100k unit vectors, queries and
// exact answers written as raw little-endian files by scripts/bench/search_bench.py's pool (see the report).
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;
const PREFETCH: bool = option_env!("PREFETCH").is_some();

#[derive(Clone, Copy, PartialEq, PartialOrd)]
struct C(f32, u32);
impl Eq for C {}
impl Ord for C {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering { self.0.total_cmp(&o.0).then(self.1.cmp(&o.1)) }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0;
    for v in acc { s += v; }
    s
}

struct Hnsw {
    d: usize,
    m: usize,
    m0: usize,
    vecs: Vec<f32>,
    base: Vec<u32>, // n * (m0 + 1): [len, links..]
    upper: Vec<Vec<Vec<u32>>>, // per node: levels 1..=level
    level: Vec<u8>,
    entry: u32,
    max_level: usize,
}

struct Ctx { visited: Vec<u32>, gen: u32 }
impl Ctx {
    fn new(n: usize) -> Ctx { Ctx { visited: vec![0; n], gen: 0 } }
    fn next(&mut self) { self.gen += 1; if self.gen == u32::MAX { self.visited.fill(0); self.gen = 1; } }
}

impl Hnsw {
    fn v(&self, i: u32) -> &[f32] { &self.vecs[i as usize * self.d..(i as usize + 1) * self.d] }
    fn dist(&self, q: &[f32], i: u32) -> f32 { 1.0 - dot(q, self.v(i)) }
    fn links(&self, i: u32, l: usize) -> &[u32] {
        if l == 0 {
            let s = i as usize * (self.m0 + 1);
            let n = self.base[s] as usize;
            &self.base[s + 1..s + 1 + n]
        } else {
            &self.upper[i as usize][l - 1]
        }
    }
    fn set_links(&mut self, i: u32, l: usize, v: &[u32]) {
        if l == 0 {
            let s = i as usize * (self.m0 + 1);
            self.base[s] = v.len() as u32;
            self.base[s + 1..s + 1 + v.len()].copy_from_slice(v);
        } else {
            self.upper[i as usize][l - 1] = v.to_vec();
        }
    }
    fn greedy(&self, q: &[f32], mut cur: u32, mut d: f32, l: usize) -> (u32, f32) {
        loop {
            let mut changed = false;
            for &n in self.links(cur, l) {
                let dn = self.dist(q, n);
                if dn < d { d = dn; cur = n; changed = true; }
            }
            if !changed { return (cur, d); }
        }
    }
    /// ef-search at level l from ep: the best `ef` as a max-heap.
    fn search_layer(&self, q: &[f32], ep: C, ef: usize, l: usize, ctx: &mut Ctx) -> BinaryHeap<C> {
        ctx.next();
        let g = ctx.gen;
        ctx.visited[ep.1 as usize] = g;
        let mut cand = BinaryHeap::with_capacity(ef * 2);
        cand.push(Reverse(ep));
        let mut top = BinaryHeap::with_capacity(ef + 1);
        top.push(ep);
        while let Some(Reverse(c)) = cand.pop() {
            if c.0 > top.peek().unwrap().0 && top.len() >= ef { break; }
            let ls = self.links(c.1, l);
            if PREFETCH {
                for &n in ls {
                    if ctx.visited[n as usize] != g {
                        let p = self.vecs[n as usize * self.d..].as_ptr() as *const i8;
                        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) };
                    }
                }
            }
            for &n in ls {
                if ctx.visited[n as usize] == g { continue; }
                ctx.visited[n as usize] = g;
                let dn = self.dist(q, n);
                if top.len() < ef || dn < top.peek().unwrap().0 {
                    cand.push(Reverse(C(dn, n)));
                    top.push(C(dn, n));
                    if top.len() > ef { top.pop(); }
                }
            }
        }
        top
    }
    fn heuristic(&self, mut cands: Vec<C>, m: usize) -> Vec<u32> {
        cands.sort();
        let mut out: Vec<u32> = Vec::with_capacity(m);
        for c in cands {
            if out.len() >= m { break; }
            let v = self.v(c.1);
            if out.iter().all(|&o| 1.0 - dot(v, self.v(o)) > c.0) { out.push(c.1); }
        }
        out
    }
    fn insert(&mut self, i: u32, lvl: usize, efc: usize, ctx: &mut Ctx) {
        if i == 0 { self.entry = 0; self.max_level = lvl; return; }
        let q: Vec<f32> = self.v(i).to_vec();
        let mut cur = self.entry;
        let mut d = self.dist(&q, cur);
        for l in (lvl + 1..=self.max_level).rev() {
            (cur, d) = self.greedy(&q, cur, d, l);
        }
        for l in (0..=lvl.min(self.max_level)).rev() {
            let top = self.search_layer(&q, C(d, cur), efc, l, ctx);
            let cands: Vec<C> = top.into_vec();
            let best = *cands.iter().min().unwrap();
            let mmax = if l == 0 { self.m0 } else { self.m };
            let sel = self.heuristic(cands, self.m);
            self.set_links(i, l, &sel);
            for &n in &sel {
                let mut nl: Vec<u32> = self.links(n, l).to_vec();
                nl.push(i);
                if nl.len() > mmax {
                    let vn = self.v(n).to_vec();
                    let cs: Vec<C> = nl.iter().map(|&x| C(1.0 - dot(&vn, self.v(x)), x)).collect();
                    nl = self.heuristic(cs, mmax);
                }
                self.set_links(n, l, &nl);
            }
            cur = best.1; d = best.0;
        }
        if lvl > self.max_level { self.max_level = lvl; self.entry = i; }
    }
    fn search(&self, q: &[f32], k: usize, ef: usize, ctx: &mut Ctx) -> Vec<u32> {
        let mut cur = self.entry;
        let mut d = self.dist(q, cur);
        for l in (1..=self.max_level).rev() { (cur, d) = self.greedy(q, cur, d, l); }
        let mut v = self.search_layer(q, C(d, cur), ef.max(k), 0, ctx).into_sorted_vec();
        v.truncate(k);
        v.into_iter().map(|c| c.1).collect()
    }
}

fn read_f32(p: &str) -> Vec<f32> { std::fs::read(p).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() }

fn main() {
    let d = 512;
    let vecs = read_f32("/tmp/proto-base.f32");
    let qs = read_f32("/tmp/proto-q.f32");
    let truth: Vec<i64> = std::fs::read("/tmp/proto-truth.i64").unwrap().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let n = vecs.len() / d;
    let (m, efc) = (16, 128);
    let ml = 1.0 / (m as f64).ln();
    let mut rng: u64 = 0x9E3779B97F4A7C15;
    let mut level = Vec::with_capacity(n);
    for _ in 0..n {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        let u = ((rng >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        level.push(((-u.ln()) * ml).floor().min(15.0) as u8);
    }
    let upper = level.iter().map(|&l| vec![Vec::new(); l as usize]).collect();
    let mut h = Hnsw { d, m, m0: 2 * m, vecs, base: vec![0; n * (2 * m + 1)], upper, level, entry: 0, max_level: 0 };
    let mut ctx = Ctx::new(n);
    let t = Instant::now();
    for i in 0..n { let l = h.level[i] as usize; h.insert(i as u32, l, efc, &mut ctx); }
    eprintln!("build {:.1} s (1 thread)", t.elapsed().as_secs_f64());
    let nq = qs.len() / d;
    for ef in [64, 128, 256] {
        let mut found = 0;
        for qi in 0..nq {
            let got = h.search(&qs[qi * d..(qi + 1) * d], 10, ef, &mut ctx);
            let want = &truth[qi * 10..qi * 10 + 10];
            found += got.iter().filter(|&&g| want.contains(&(g as i64))).count();
        }
        let t = Instant::now();
        let mut cnt = 0;
        while t.elapsed().as_secs_f64() < 3.0 {
            for qi in 0..nq { h.search(&qs[qi * d..(qi + 1) * d], 10, ef, &mut ctx); cnt += 1; }
        }
        eprintln!("ef {ef}: recall {:.4}, {:.0} QPS 1 thread", found as f64 / (10 * nq) as f64, cnt as f64 / t.elapsed().as_secs_f64());
    }
}
