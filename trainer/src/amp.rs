//! Mixed precision: which reduced type CUDA autocast uses, and dynamic loss
//! scaling for fp16 (bf16 has fp32's exponent range and needs none).
//!
//! tch 0.24 switches autocast on and off but cannot choose its type, which
//! defaults to fp16; [`set_cuda_autocast_dtype`] calls libtorch's
//! `at::autocast::set_autocast_dtype` directly. tch's `autocast` goes through
//! libtorch's deprecated `at::autocast::is_enabled`/`set_enabled`, which print
//! a warning on every call (five lines per training step on a GPU, seen on an
//! H200); [`autocast`] does the same through the per-device functions.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The reduced type of CUDA autocast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmpDtype {
    /// bfloat16: fp32's range, no loss scaling (Ampere and newer).
    #[default]
    Bf16,
    /// float16 with dynamic loss scaling (older GPUs without fast bf16).
    Fp16,
}

impl AmpDtype {
    pub fn kind(self) -> Kind {
        match self {
            Self::Bf16 => Kind::BFloat16,
            Self::Fp16 => Kind::Half,
        }
    }
}

#[allow(unsafe_code)]
mod ffi {
    // c10::DeviceType and c10::ScalarType are `enum class : int8_t`; these are
    // plain C++ free functions exported by libtorch_cpu (linked by torch-sys),
    // so the SysV C calling convention applies with int8 arguments and result.
    extern "C" {
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        fn at_autocast_is_autocast_enabled(device: i8) -> bool;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        fn at_autocast_set_autocast_enabled(device: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        fn at_autocast_increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        fn at_autocast_decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        fn at_autocast_clear_cache();
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        fn at_autocast_set_autocast_dtype(device: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        fn at_autocast_get_autocast_dtype(device: i8) -> i8;
    }
    /// c10::DeviceType::CUDA.
    const CUDA: i8 = 1;

    pub fn set_cuda(dtype: i8) {
        // SAFETY: stores a value in libtorch's (thread-local) autocast settings; any
        // ScalarType code is accepted, and we only pass Half or BFloat16.
        unsafe { at_autocast_set_autocast_dtype(CUDA, dtype) }
    }

    pub fn get_cuda() -> i8 {
        // SAFETY: reads libtorch's autocast setting; no arguments besides the device type.
        unsafe { at_autocast_get_autocast_dtype(CUDA) }
    }

    pub fn cuda_enabled() -> bool {
        // SAFETY: reads libtorch's thread-local autocast flag for CUDA.
        unsafe { at_autocast_is_autocast_enabled(CUDA) }
    }

    pub fn set_cuda_enabled(enabled: bool) {
        // SAFETY: writes libtorch's thread-local autocast flag for CUDA.
        unsafe { at_autocast_set_autocast_enabled(CUDA, enabled) }
    }

    /// Enters an autocast region (libtorch counts the nesting to know when to drop its cast cache).
    pub fn enter() {
        // SAFETY: increments a thread-local counter.
        unsafe {
            at_autocast_increment_nesting();
        }
    }

    /// Leaves an autocast region; the outermost one clears the cache of casted weights.
    pub fn leave() {
        // SAFETY: decrements the thread-local counter entered above; clears libtorch's cast cache.
        unsafe {
            if at_autocast_decrement_nesting() == 0 {
                at_autocast_clear_cache();
            }
        }
    }
}

/// Runs `f` with CUDA autocast `enabled` (as `tch::autocast` does, without libtorch's deprecation
/// warnings); the previous setting comes back afterwards, also if `f` panics. Without CUDA it only runs `f`.
pub fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !tch::Cuda::is_available() {
        return f();
    }
    scoped(enabled, f)
}

/// The autocast region itself (libtorch's flag lives in libtorch_cpu: this runs without a GPU too).
fn scoped<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ffi::leave();
            ffi::set_cuda_enabled(self.0);
        }
    }
    let _restore = Restore(ffi::cuda_enabled());
    ffi::set_cuda_enabled(enabled);
    ffi::enter();
    f()
}

/// c10::ScalarType codes of the two autocast types.
const HALF: i8 = 5;
const BFLOAT16: i8 = 15;

/// Makes CUDA autocast on this thread compute in `dtype` (libtorch's setting
/// is per thread: call it on the thread that runs the steps).
pub fn set_cuda_autocast_dtype(dtype: AmpDtype) {
    ffi::set_cuda(match dtype {
        AmpDtype::Bf16 => BFLOAT16,
        AmpDtype::Fp16 => HALF,
    });
}

/// The type CUDA autocast uses on this thread, if it is one of ours.
pub fn cuda_autocast_dtype() -> Option<AmpDtype> {
    match ffi::get_cuda() {
        BFLOAT16 => Some(AmpDtype::Bf16),
        HALF => Some(AmpDtype::Fp16),
        _ => None,
    }
}

/// Dynamic loss scaling (PyTorch's GradScaler policy): the loss is multiplied
/// by `scale` before backward so small fp16 gradients don't flush to zero;
/// a step whose gradients overflowed is skipped and the scale halved; after
/// `growth_interval` good steps in a row the scale doubles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u32,
    pub growth_interval: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        Self { scale: 65536.0, good_steps: 0, growth_interval: 2000 }
    }
}

impl LossScale {
    /// Records whether this step's gradients were finite; true when the
    /// optimizer should step (with gradients divided by the scale in use).
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// True when every defined gradient is finite (one device sync for all).
pub fn all_finite(grads: &[Tensor]) -> bool {
    let sums: Vec<Tensor> = grads.iter().filter(|g| g.defined()).map(|g| g.sum(Kind::Float)).collect();
    if sums.is_empty() {
        return true;
    }
    // Any inf or NaN makes the total non-finite (inf - inf is NaN).
    Tensor::stack(&sums, 0).sum(Kind::Float).double_value(&[]).is_finite()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn cuda_autocast_dtype_is_set_and_read_back() {
        // The setting lives in libtorch_cpu and works without a GPU.
        set_cuda_autocast_dtype(AmpDtype::Bf16);
        assert_eq!(cuda_autocast_dtype(), Some(AmpDtype::Bf16));
        set_cuda_autocast_dtype(AmpDtype::Fp16);
        assert_eq!(cuda_autocast_dtype(), Some(AmpDtype::Fp16));
        // Per thread: a new thread starts from libtorch's default (fp16).
        set_cuda_autocast_dtype(AmpDtype::Bf16);
        let other = std::thread::spawn(cuda_autocast_dtype).join().ok().flatten();
        assert_eq!(other, Some(AmpDtype::Fp16));
        assert_eq!(cuda_autocast_dtype(), Some(AmpDtype::Bf16));
    }

    #[test]
    fn an_autocast_region_sets_the_flag_and_restores_it_even_after_a_panic() {
        assert!(!ffi::cuda_enabled(), "off by default");
        let inside = scoped(true, || (ffi::cuda_enabled(), scoped(false, ffi::cuda_enabled), ffi::cuda_enabled()));
        assert_eq!(inside, (true, false, true), "nested regions set and restore");
        assert!(!ffi::cuda_enabled());
        let r = std::panic::catch_unwind(|| scoped(true, || panic!("inside")));
        assert!(r.is_err());
        assert!(!ffi::cuda_enabled(), "restored after a panic");
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_grows_after_good_steps() {
        let mut s = LossScale { growth_interval: 3, ..LossScale::default() };
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        let mut tiny = LossScale { scale: 1.0, ..LossScale::default() };
        tiny.update(false);
        assert_eq!(tiny.scale, 1.0, "the scale never drops below 1");
    }

    #[test]
    fn all_finite_sees_inf_and_nan_anywhere() {
        let ok = Tensor::ones([3, 3], (Kind::Float, Device::Cpu));
        assert!(all_finite(&[ok.shallow_clone(), Tensor::new(), ok.shallow_clone()]));
        for bad in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            let b = ok.copy();
            let _ = b.get(1).get(2).fill_(bad);
            assert!(!all_finite(&[ok.shallow_clone(), b]), "{bad}");
        }
        // +inf and -inf in different tensors still count as overflow.
        let p = Tensor::from(f32::INFINITY);
        let n = Tensor::from(f32::NEG_INFINITY);
        assert!(!all_finite(&[p, n]));
    }
}
