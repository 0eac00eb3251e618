//! The HNSW graph's distance kernels: the dot product of a query (f32) with a stored row (f32, f16 bits or
//! i8 codes), chosen once per process by what the CPU has.
//!
//! A portable body for the target's baseline (SSE2 on x86-64), and AVX2 + FMA (+ F16C) kernels used when the
//! CPU has them (`#[target_feature]`, chosen at run time). Calling a
//! `#[target_feature]` function is `unsafe` only because the CPU must have the features: [`Simd::Avx2Fma`]
//! holds a token made nowhere but in [`Simd::detect`], after the CPU said it has them. This module, `pages.rs`
//! and one call in `rerank.rs` (mapping the float32 copy) are the search's exceptions to
//! `unsafe_code = "deny"`: here for those calls and the prefetch hint.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// Proof that the CPU has AVX2, FMA and F16C: made only by [`Simd::detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected(());

/// Which kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// The target's baseline (SSE2 on x86-64).
    Portable,
    /// AVX2 with fused multiply-add and F16C (x86-64, detected at run time).
    Avx2Fma(Detected),
}

impl Simd {
    /// The best kernels this CPU runs (detected once).
    pub fn detect() -> Simd {
        static DETECTED: OnceLock<Simd> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Simd::Avx2Fma(Detected(()));
            }
            Simd::Portable
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2Fma(_) => "avx2+fma",
        }
    }
}

/// An IEEE half's bits as f32, exactly for every finite half (normal or subnormal): the exponent and
/// mantissa shifted into an f32 and scaled by 2¹¹² (the exponent biases' difference). Infinities and NaNs
/// come out finite; a normalized row has none. Branch-free, so the kernels' loops vectorize.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let magnitude = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
    f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
}

/// Σ qᵢ·f(vᵢ) in 16 running sums, then the tail.
#[inline(always)]
fn dot_body<const FMA: bool, T: Copy>(q: &[f32], v: &[T], f: impl Fn(T) -> f32) -> f32 {
    assert_eq!(q.len(), v.len(), "a query and a row of different lengths");
    let (qc, qr) = q.as_chunks::<16>();
    let (vc, vr) = v.as_chunks::<16>();
    let mut acc = [0f32; 16];
    for (a, b) in qc.iter().zip(vc) {
        for i in 0..16 {
            let x = f(b[i]);
            acc[i] = if FMA { a[i].mul_add(x, acc[i]) } else { acc[i] + a[i] * x };
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, &b) in qr.iter().zip(vr) {
        sum += a * f(b);
    }
    sum
}

/// The AVX2 kernels, written with intrinsics (the auto-vectorizer made 2-lane code of the portable body):
/// 8-lane fused multiply-adds into four running sums. No `unsafe` inside: values move into
/// registers by `bytemuck::cast` of arrays, and the intrinsics are safe in a function with their features.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Σ q·f(v) over 16-value blocks (`load` turns a row block into two 8-lane registers), then the tail.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot<T: Copy>(q: &[f32], v: &[T], load: impl Fn(&[T; 16]) -> [__m256; 2], f: impl Fn(T) -> f32) -> f32 {
        assert_eq!(q.len(), v.len(), "a query and a row of different lengths");
        let (qc, qr) = q.as_chunks::<16>();
        let (vc, vr) = v.as_chunks::<16>();
        // Four running sums (two blocks in flight): a fused multiply-add's latency is four of its issue slots.
        let (mut s0, mut s1, mut s2, mut s3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let (qp, vp) = (qc.chunks_exact(2), vc.chunks_exact(2));
        let (qo, vo) = (qp.remainder(), vp.remainder());
        for (a, b) in qp.zip(vp) {
            let [a0, a1, a2, a3]: [[f32; 8]; 4] = bytemuck::cast([a[0], a[1]]);
            let ([b0, b1], [b2, b3]) = (load(&b[0]), load(&b[1]));
            s0 = _mm256_fmadd_ps(bytemuck::cast(a0), b0, s0);
            s1 = _mm256_fmadd_ps(bytemuck::cast(a1), b1, s1);
            s2 = _mm256_fmadd_ps(bytemuck::cast(a2), b2, s2);
            s3 = _mm256_fmadd_ps(bytemuck::cast(a3), b3, s3);
        }
        for (a, b) in qo.iter().zip(vo) {
            let [a0, a1]: [[f32; 8]; 2] = bytemuck::cast(*a);
            let [b0, b1] = load(b);
            s0 = _mm256_fmadd_ps(bytemuck::cast(a0), b0, s0);
            s1 = _mm256_fmadd_ps(bytemuck::cast(a1), b1, s1);
        }
        let mut total = sum(_mm256_add_ps(_mm256_add_ps(s0, s2), _mm256_add_ps(s1, s3)));
        for (a, &b) in qr.iter().zip(vr) {
            total += a * f(b);
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn dot_f32(q: &[f32], v: &[f32]) -> f32 {
        dot(
            q,
            v,
            |b| {
                let [b0, b1]: [[f32; 8]; 2] = bytemuck::cast(*b);
                [bytemuck::cast(b0), bytemuck::cast(b1)]
            },
            |x| x,
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_f16(q: &[f32], v: &[u16]) -> f32 {
        dot(
            q,
            v,
            |b| {
                let [b0, b1]: [[u16; 8]; 2] = bytemuck::cast(*b);
                [_mm256_cvtph_ps(bytemuck::cast(b0)), _mm256_cvtph_ps(bytemuck::cast(b1))]
            },
            super::f16_to_f32,
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn dot_i8(q: &[f32], v: &[i8]) -> f32 {
        dot(
            q,
            v,
            |b| {
                let b: __m128i = bytemuck::cast(*b);
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
                [lo, hi]
            },
            f32::from,
        )
    }
}

/// `q · v`.
#[inline]
pub fn dot_f32(simd: Simd, q: &[f32], v: &[f32]) -> f32 {
    match simd {
        // SAFETY: `Avx2Fma` exists only where `detect` found AVX2, FMA and F16C on this CPU.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2Fma(_) => unsafe { avx2::dot_f32(q, v) },
        _ => dot_body::<false, f32>(q, v, |x| x),
    }
}

/// `q · v` of a row stored as half-precision bits.
#[inline]
pub fn dot_f16(simd: Simd, q: &[f32], v: &[u16]) -> f32 {
    match simd {
        // SAFETY: as in `dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2Fma(_) => unsafe { avx2::dot_f16(q, v) },
        _ => dot_body::<false, u16>(q, v, f16_to_f32),
    }
}

/// `q · v` of a row stored as i8 codes.
#[inline]
pub fn dot_i8(simd: Simd, q: &[f32], v: &[i8]) -> f32 {
    match simd {
        // SAFETY: as in `dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2Fma(_) => unsafe { avx2::dot_i8(q, v) },
        _ => dot_body::<false, i8>(q, v, f32::from),
    }
}

/// Asks the CPU to bring the start of `s` into cache (a hint: it reads nothing and faults on nothing).
#[inline(always)]
pub fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch instruction has no architectural effect; any address is allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(s.as_ptr().cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_convert_exactly() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h);
            if want.is_finite() {
                assert_eq!(f16_to_f32(h).to_bits(), want.to_f32().to_bits(), "half bits {h:#06x}");
            }
        }
    }

    /// Every kernel on every path within the f32 summation bound of the f64 dot product: |error| ≤ γ_n·Σ|qᵢvᵢ|
    /// with γ_n = n·u/(1 − n·u), u = 2⁻²⁴ (Higham, any summation order, with or without fused multiply-add).
    #[test]
    fn kernels_agree_with_f64_within_the_summation_bound() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let paths = [Some(Simd::Portable), (Simd::detect() != Simd::Portable).then(Simd::detect)];
        for n in [1usize, 7, 16, 33, 512, 2048] {
            let q: Vec<f32> = (0..n).map(|_| next()).collect();
            let v: Vec<f32> = (0..n).map(|_| next()).collect();
            let h: Vec<u16> = v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
            let c: Vec<i8> = v.iter().map(|&x| (x * 127.0).round() as i8).collect();
            let u = f64::from(f32::EPSILON) / 2.0;
            let gamma = n as f64 * u / (1.0 - n as f64 * u);
            let check = |got: f32, row: &dyn Fn(usize) -> f64, what: &str| {
                let exact: f64 = (0..n).map(|i| f64::from(q[i]) * row(i)).sum();
                let abs: f64 = (0..n).map(|i| (f64::from(q[i]) * row(i)).abs()).sum();
                assert!((f64::from(got) - exact).abs() <= gamma * abs, "{what}, n = {n}: {got} vs {exact}");
            };
            for simd in paths.iter().flatten().copied() {
                let name = simd.name();
                check(dot_f32(simd, &q, &v), &|i| f64::from(v[i]), &format!("{name} f32"));
                check(
                    dot_f16(simd, &q, &h),
                    &|i| f64::from(half::f16::from_bits(h[i]).to_f32()),
                    &format!("{name} f16"),
                );
                check(dot_i8(simd, &q, &c), &|i| f64::from(c[i]), &format!("{name} i8"));
            }
        }
    }
}
