//! Data-parallel collectives for geossl's training, from libtorch's own c10d
//! (not a home-made engine): a `TCPStore` rendezvous (rank 0 serves it, as
//! torchrun's `MASTER_ADDR`/`MASTER_PORT` do) and a `ProcessGroupGloo` on it,
//! reached through a small C++ shim (`src/shim.cpp`) on the `at::Tensor`s
//! that tch tensors wrap.
//!
//! Collectives are synchronous and in place where PyTorch's are; a rank that
//! is gone makes the others' next collective fail within the group's timeout
//! (never a silent hang), with Gloo's message.
//!
//! FFI needs `unsafe`: it is confined to this crate, each block states why it holds.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_long, c_void, CString};

use tch::Tensor;

extern "C" {
    fn geossl_c10d_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_long,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn geossl_c10d_free(g: *mut c_void);
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

/// A Gloo process group (CPU tensors).
#[derive(Debug)]
pub struct ProcessGroup {
    ptr: *mut c_void,
    rank: usize,
    world: usize,
}

// The C++ group is used from one thread at a time (&mut self for collectives).
unsafe impl Send for ProcessGroup {}

const ERR_LEN: usize = 2048;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

impl ProcessGroup {
    /// Joins the group: blocks until all `world_size` ranks have joined, or fails after the timeout.
    pub fn connect(r: &Rendezvous) -> Result<ProcessGroup, DistError> {
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
                &mut ptr,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if rc != 0 || ptr.is_null() {
            return Err(fail(message(&err)));
        }
        Ok(ProcessGroup { ptr, rank: r.rank, world: r.world_size })
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

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from geossl_c10d_new and is freed once.
        unsafe { geossl_c10d_free(self.ptr) }
    }
}
