//! Starting ranks: torchrun's environment read as a rendezvous, the GPU a rank gets, and a local launcher
//! that runs a program again as N ranks of one run (what `torchrun --nproc-per-node N` does).

use std::ffi::OsString;

use crate::{DistError, Rendezvous};

/// This process as one rank of a data-parallel run, from torchrun's variables: when `WORLD_SIZE` > 1, or
/// when `WORLD_SIZE` and `MASTER_ADDR` are both set (a one-rank run through the distributed path). `None`:
/// a single process.
pub fn rendezvous_from_env(timeout: std::time::Duration) -> Result<Option<Rendezvous>, DistError> {
    match std::env::var("WORLD_SIZE").ok().map(|w| w.parse::<usize>()) {
        Some(Ok(w)) if w > 1 || std::env::var_os("MASTER_ADDR").is_some() => Rendezvous::from_env(timeout).map(Some),
        Some(Err(_)) => Err(DistError::Config(format!(
            "WORLD_SIZE={:?} is not a number",
            std::env::var("WORLD_SIZE").unwrap_or_default()
        ))),
        _ => Ok(None),
    }
}

/// The GPU of this rank on its machine: `LOCAL_RANK` (0 when unset), one GPU per rank as torchrun does it.
pub fn local_rank() -> Result<usize, DistError> {
    match std::env::var("LOCAL_RANK") {
        Ok(v) => v.parse::<usize>().map_err(|_| DistError::Config(format!("LOCAL_RANK={v:?} is not a number"))),
        Err(_) => Ok(0),
    }
}

/// Runs this program again as ranks 0..`n` of one run on this machine (`MASTER_ADDR` 127.0.0.1, a free
/// port, `WORLD_SIZE`, `RANK`, `LOCAL_RANK`), with the same arguments less `flag` (and its value) and with
/// `child_env` set; waits for them and stops the others as soon as one fails, naming it.
pub fn launch_local_ranks(n: usize, flag: &str, child_env: &[(&str, &str)]) -> Result<(), DistError> {
    let launch = |m: String| DistError::Config(m);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| launch(format!("no free local port for the rendezvous: {e}")))?
        .port();
    let exe = std::env::current_exe().map_err(|e| launch(format!("cannot find this program: {e}")))?;
    // The same arguments less the launching flag (each rank is one process).
    let mut args: Vec<OsString> = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        let t = a.to_string_lossy();
        if skip {
            skip = false;
        } else if t == flag {
            skip = true;
        } else if !t.starts_with(&format!("{flag}=")) {
            args.push(a);
        }
    }
    let mut running = Vec::with_capacity(n);
    for rank in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .envs(child_env.iter().copied())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .spawn()
            .map_err(|e| launch(format!("starting rank {rank}: {e}")))?;
        running.push((rank, child));
    }
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait().map_err(|e| launch(format!("waiting for rank {}: {e}", running[i].0)))? {
                Some(status) => {
                    let (rank, _) = running.swap_remove(i);
                    if !status.success() && failed.is_none() {
                        failed = Some((rank, status));
                        for (_, k) in running.iter_mut() {
                            let _ = k.kill();
                        }
                    }
                }
                None => i += 1,
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match failed {
        Some((rank, status)) => {
            Err(launch(format!("rank {rank} of {n} failed ({status}); the other ranks were stopped")))
        }
        None => Ok(()),
    }
}
