//! Data-parallel collectives for geossl's training, from libtorch's own c10d
//! (not a home-made engine): a `TCPStore` rendezvous (rank 0 serves it, as
//! torchrun's `MASTER_ADDR`/`MASTER_PORT` do) and a process group on it —
//! `ProcessGroupGloo` for CPU tensors, `ProcessGroupNCCL` for CUDA tensors
//! (where built, see [`nccl_built`]) — and DDP's gradient `Reducer`, reached
//! through a small C++ shim (`src/shim.cpp`) on the `at::Tensor`s that tch
//! tensors wrap.
//!
//! Collectives are in place where PyTorch's are; Gloo's are synchronous,
//! NCCL's are ordered on the CUDA stream as in PyTorch (host-synchronous with
//! `TORCH_NCCL_BLOCKING_WAIT=1`). A rank that is gone makes the others' next
//! collective fail within the group's timeout (never a silent hang): an error
//! with c10d's message (Gloo, blocking NCCL), or NCCL's watchdog ending the
//! process.
//!
//! FFI needs `unsafe`: it is confined to this crate, each block states why it holds.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_long, c_void, CString};

use tch::Tensor;

pub mod launch;
pub use launch::{launch_local_ranks, local_rank, rendezvous_from_env};

extern "C" {
    fn geossl_c10d_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_long,
        cuda_device: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn geossl_c10d_free(g: *mut c_void);
    fn geossl_c10d_has_nccl() -> c_int;
    fn geossl_c10d_lost_ranks(g: *mut c_void, wait_ms: c_long, out: *mut c_int, cap: c_int) -> c_int;
    fn geossl_c10d_reducer_new(
        g: *mut c_void,
        params: *mut *mut c_void,
        n: usize,
        bucket_bytes: c_long,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn geossl_c10d_reducer_backward(
        g: *mut c_void,
        r: *mut c_void,
        loss: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn geossl_c10d_reducer_free(r: *mut c_void);
    fn geossl_c10d_all_reduce_sum(g: *mut c_void, t: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn geossl_c10d_broadcast(g: *mut c_void, t: *mut c_void, root: c_int, err: *mut c_char, len: usize) -> c_int;
    fn geossl_c10d_all_gather(
        g: *mut c_void,
        out: *mut c_void,
        inp: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn geossl_c10d_barrier(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
}

/// What went wrong, with c10d's own message.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rendezvous at {addr} as rank {rank} of {world} failed: {message}")]
    Rendezvous { addr: String, rank: usize, world: usize, message: String },
    #[error("{op} failed on rank {rank} of {world}: {message}")]
    Collective { op: &'static str, rank: usize, world: usize, message: String },
    #[error("{0}")]
    Config(String),
}

/// Where and who: torchrun's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// How long a collective (and the rendezvous) may wait for the other ranks.
    pub timeout: std::time::Duration,
}

impl Rendezvous {
    /// From `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE` (as torchrun and PyTorchJob set them).
    pub fn from_env(timeout: std::time::Duration) -> Result<Rendezvous, DistError> {
        let var = |k: &str| std::env::var(k).map_err(|_| DistError::Config(format!("{k} is not set")));
        let num = |k: &str| -> Result<usize, DistError> {
            let v = var(k)?;
            v.parse().map_err(|_| DistError::Config(format!("{k}={v} is not a number")))
        };
        let r = Rendezvous {
            master_addr: var("MASTER_ADDR")?,
            master_port: num("MASTER_PORT")?
                .try_into()
                .map_err(|_| DistError::Config("MASTER_PORT is not a port number".into()))?,
            rank: num("RANK")?,
            world_size: num("WORLD_SIZE")?,
            timeout,
        };
        if r.world_size == 0 || r.rank >= r.world_size {
            return Err(DistError::Config(format!("RANK={} with WORLD_SIZE={}", r.rank, r.world_size)));
        }
        Ok(r)
    }
}

/// Whether this build has ProcessGroupNCCL (libtorch with CUDA and the NCCL/CUDA headers at build time).
pub fn nccl_built() -> bool {
    // SAFETY: a constant function of the shim, no arguments.
    unsafe { geossl_c10d_has_nccl() != 0 }
}

/// Who is gone, after a collective failed (see [`ProcessGroup::lost_ranks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// These ranks stopped beating.
    Ranks(Vec<usize>),
    /// The rendezvous store cannot be reached: rank 0, which hosts it, is gone.
    Store,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Store => write!(f, "rank 0 (the rendezvous host)"),
            Lost::Ranks(r) if r.len() == 1 => write!(f, "rank {}", r[0]),
            Lost::Ranks(r) => {
                write!(f, "ranks {}", r.iter().map(usize::to_string).collect::<Vec<_>>().join(", "))
            }
        }
    }
}

/// Which c10d backend a group runs on; its tensors live where it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors.
    Gloo,
    /// ProcessGroupNCCL on this CUDA device (one GPU per rank).
    Nccl { device: usize },
}

impl Backend {
    /// The backend for tensors on `device`: Gloo for the CPU, NCCL for a CUDA device — refused by name where
    /// this build has no NCCL or the machine has no such GPU.
    pub fn for_device(device: tch::Device) -> Result<Backend, DistError> {
        match device {
            tch::Device::Cpu => Ok(Backend::Gloo),
            tch::Device::Cuda(i) => {
                if !nccl_built() {
                    return Err(DistError::Config(
                        "NCCL was requested (a CUDA device) but this build of geossl-dist has none: it was \
                         compiled without libtorch_cuda or the NCCL/CUDA headers (see the build warning)"
                            .into(),
                    ));
                }
                let n = tch::Cuda::device_count().max(0) as usize;
                if n == 0 {
                    return Err(DistError::Config(
                        "NCCL was requested (a CUDA device) but CUDA is not available on this machine: \
                         train data-parallel on CPU with --device cpu (Gloo)"
                            .into(),
                    ));
                }
                if i >= n {
                    return Err(DistError::Config(format!(
                        "NCCL on cuda:{i} was requested but this machine has {n} CUDA device(s) \
                         (one GPU per rank: LOCAL_RANK must be below the GPU count)"
                    )));
                }
                Ok(Backend::Nccl { device: i })
            }
            other => Err(DistError::Config(format!("no c10d backend for device {other:?}"))),
        }
    }
}

/// A process group: Gloo (CPU tensors) or NCCL (CUDA tensors on its device).
#[derive(Debug)]
pub struct ProcessGroup {
    ptr: *mut c_void,
    rank: usize,
    world: usize,
    backend: Backend,
    host_waits: bool,
}

// The C++ group is used from one thread at a time (&mut self for collectives).
unsafe impl Send for ProcessGroup {}

const ERR_LEN: usize = 2048;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

impl ProcessGroup {
    /// Joins the group on `backend`: blocks until all `world_size` ranks have joined, or fails after the
    /// timeout.
    pub fn connect(r: &Rendezvous, backend: Backend) -> Result<ProcessGroup, DistError> {
        let addr = format!("{}:{}", r.master_addr, r.master_port);
        let fail =
            |message: String| DistError::Rendezvous { addr: addr.clone(), rank: r.rank, world: r.world_size, message };
        let host = CString::new(r.master_addr.clone()).map_err(|_| fail("the address has a NUL byte".into()))?;
        let mut err = vec![0u8; ERR_LEN];
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `host` and `err` outlive the call; `err` has ERR_LEN bytes; `ptr` is written only on success.
        let rc = unsafe {
            geossl_c10d_new(
                host.as_ptr(),
                c_int::from(r.master_port),
                r.rank as c_int,
                r.world_size as c_int,
                r.timeout.as_millis().min(c_long::MAX as u128) as c_long,
                match backend {
                    Backend::Gloo => -1,
                    Backend::Nccl { device } => device as c_int,
                },
                &mut ptr,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if rc != 0 || ptr.is_null() {
            return Err(fail(message(&err)));
        }
        // Gloo's wait() blocks the host; NCCL's only with TORCH_NCCL_BLOCKING_WAIT (as in PyTorch).
        let host_waits = match backend {
            Backend::Gloo => true,
            Backend::Nccl { .. } => {
                matches!(std::env::var("TORCH_NCCL_BLOCKING_WAIT").as_deref(), Ok("1") | Ok("true") | Ok("True"))
            }
        };
        Ok(ProcessGroup { ptr, rank: r.rank, world: r.world_size, backend, host_waits })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether a collective returns only once it completed: Gloo, and NCCL with `TORCH_NCCL_BLOCKING_WAIT=1`.
    /// By default (as in PyTorch) NCCL collectives return once queued on the GPU, and a rank lost for longer
    /// than the timeout surfaces through NCCL's watchdog, which ends the process with its message.
    pub fn host_waits(&self) -> bool {
        self.host_waits
    }

    /// Which ranks are gone, for naming them after a collective failed: every rank's heartbeat (a counter in
    /// the rendezvous store, advanced each second by a thread of that rank) is read twice, 2.5 s apart; the
    /// ranks whose counter stood still are lost, or rank 0 when the store itself cannot be reached. The first
    /// rank to find lost ranks records them in the store and later callers get that finding (survivors that
    /// stopped after it are not counted). `None` when every other rank still beats (the failure was something
    /// else, such as a timeout).
    pub fn lost_ranks(&self) -> Option<Lost> {
        let mut out = vec![0 as c_int; self.world];
        // SAFETY: `self.ptr` is a live group; `out` has room for `world` entries and outlives the call.
        let n = unsafe { geossl_c10d_lost_ranks(self.ptr, 2500, out.as_mut_ptr(), self.world as c_int) };
        match n {
            n if n < 0 => Some(Lost::Store),
            0 => None,
            n => Some(Lost::Ranks(out[..n as usize].iter().map(|&r| r as usize).collect())),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    fn check(&self, op: &'static str, rc: c_int, err: &[u8]) -> Result<(), DistError> {
        if rc == 0 {
            return Ok(());
        }
        Err(DistError::Collective { op, rank: self.rank, world: self.world, message: message(err) })
    }

    /// `t` ← Σ over ranks of `t` (every rank passes a tensor of one shape and dtype).
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: `self.ptr` is a live group; `t.as_mut_ptr()` is the `at::Tensor*` tch owns, valid during the call.
        let rc =
            unsafe { geossl_c10d_all_reduce_sum(self.ptr, t.as_mut_ptr().cast(), err.as_mut_ptr().cast(), ERR_LEN) };
        self.check("all_reduce", rc, &err)
    }

    /// `t` ← rank `root`'s `t`.
    pub fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: as in `all_reduce_sum`.
        let rc = unsafe {
            geossl_c10d_broadcast(self.ptr, t.as_mut_ptr().cast(), root as c_int, err.as_mut_ptr().cast(), ERR_LEN)
        };
        self.check("broadcast", rc, &err)
    }

    /// Every rank's `t`, stacked in rank order: `[world, ...t.size()]`.
    pub fn all_gather(&mut self, t: &Tensor) -> Result<Tensor, DistError> {
        let mut shape = vec![self.world as i64];
        shape.extend(t.size());
        let mut out = Tensor::empty(shape.as_slice(), (t.kind(), t.device()));
        let mut inp = t.contiguous();
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: as in `all_reduce_sum`; `out` and `inp` live through the call.
        let rc = unsafe {
            geossl_c10d_all_gather(
                self.ptr,
                out.as_mut_ptr().cast(),
                inp.as_mut_ptr().cast(),
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        self.check("all_gather", rc, &err)?;
        Ok(out)
    }

    /// Waits until every rank gets here.
    pub fn barrier(&mut self) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: `self.ptr` is a live group.
        let rc = unsafe { geossl_c10d_barrier(self.ptr, err.as_mut_ptr().cast(), ERR_LEN) };
        self.check("barrier", rc, &err)
    }
}

/// DDP's C++ `Reducer` on a group (made by [`ProcessGroup::reducer`]): backward through it leaves in each
/// parameter's `.grad` the mean over the ranks, all-reduced in buckets while backward still runs.
#[derive(Debug)]
pub struct Reducer {
    ptr: *mut c_void,
    params: Vec<Tensor>,
}

// Used from one thread at a time (&mut self), like the group.
unsafe impl Send for Reducer {}

/// DDP's default bucket size.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

impl ProcessGroup {
    /// A Reducer over `params` (leaf tensors that require grad, all on this group's device), with buckets
    /// of at most `bucket_bytes` ([`BUCKET_BYTES`] as in DDP). Every parameter must get a gradient in every
    /// backward (DDP's `find_unused_parameters=False`): one that does not makes the next backward fail.
    pub fn reducer(&mut self, params: &[Tensor], bucket_bytes: usize) -> Result<Reducer, DistError> {
        let params: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        let mut ptrs: Vec<*mut c_void> = params.iter().map(|p| p.as_ptr() as *mut c_void).collect();
        let mut err = vec![0u8; ERR_LEN];
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `self.ptr` is a live group; `ptrs` holds `params.len()` `at::Tensor*` that `params` keeps alive
        // (the C++ side copies the tensors, sharing their storage); `ptr` is written only on success.
        let rc = unsafe {
            geossl_c10d_reducer_new(
                self.ptr,
                ptrs.as_mut_ptr(),
                ptrs.len(),
                bucket_bytes.min(c_long::MAX as usize) as c_long,
                &mut ptr,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        self.check("reducer", rc, &err)?;
        Ok(Reducer { ptr, params })
    }
}

impl Reducer {
    /// Backward from `loss` (a scalar of this rank's graph); afterwards the parameters' gradients
    /// ([`Reducer::gradients`]) are the mean over the ranks. Every rank must call it once per step.
    pub fn backward(&mut self, pg: &mut ProcessGroup, loss: &Tensor) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        let mut loss = loss.shallow_clone();
        // SAFETY: `pg.ptr` and `self.ptr` are live (the reducer was made on a group of this process and `pg` is
        // borrowed for the call); `loss` is a tch tensor alive during the call.
        let rc = unsafe {
            geossl_c10d_reducer_backward(pg.ptr, self.ptr, loss.as_mut_ptr().cast(), err.as_mut_ptr().cast(), ERR_LEN)
        };
        pg.check("backward all-reduce", rc, &err)
    }

    /// The parameters' gradients after [`Reducer::backward`], in the order given to
    /// [`ProcessGroup::reducer`] (undefined where no rank had one).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::grad).collect()
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from geossl_c10d_reducer_new and is freed once.
        unsafe { geossl_c10d_reducer_free(self.ptr) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from geossl_c10d_new and is freed once.
        unsafe { geossl_c10d_free(self.ptr) }
    }
}
