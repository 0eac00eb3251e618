//! Model repositories made from real exported models, and a running
//! `geossl-serve` on `127.0.0.1:0` that is stopped (SIGTERM) on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{bin, run, text};

/// Writes a random-init ResNet-18 checkpoint (`size`×`size` input) with a
/// 3-class classifier and segmentation head (labels water, forest, urban),
/// and exports `heads` (`(model name, head, extra export args)`) into
/// `repo/<name>/1/model.onnx`.
pub fn make_repository(repo: &Path, size: usize, heads: &[(&str, &str, &[&str])]) {
    let ck = repo.join(".checkpoint");
    let s = size.to_string();
    let o = run(
        "geossl-train",
        &[
            "init",
            "--arch",
            "resnet18",
            "--input-size",
            &s,
            "--num-classes",
            "3",
            "--segmentation-classes",
            "3",
            "--labels",
            "water,forest,urban",
            "--seed",
            "7",
            "--out",
            ck.to_str().expect("utf-8 path"),
        ],
    );
    assert!(o.status.success(), "init: {}", text(&o));
    for (name, head, extra) in heads {
        let dir = repo.join(name).join("1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let out = dir.join("model.onnx");
        let mut args = vec!["onnx", "--checkpoint", ck.to_str().expect("utf-8"), "--head", head, "--out"];
        args.push(out.to_str().expect("utf-8"));
        args.extend_from_slice(extra);
        let o = run("geossl-export", &args);
        assert!(o.status.success(), "export {name}: {}", text(&o));
    }
}

/// A running server; SIGTERM and wait on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub stderr_log: PathBuf,
}

impl Server {
    /// Starts `geossl-serve serve --model-repository repo` with `extra`
    /// flags on free ports and waits (≤ 120 s) for its "listening" line.
    pub fn start(repo: &Path, extra: &[&str]) -> Server {
        // One log per server: tests of one process share a repository and run at once.
        static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = repo.join(format!(".serve-{}-{n}.log", std::process::id()));
        let mut args: Vec<String> =
            ["serve", "--model-repository", repo.to_str().expect("utf-8"), "--host", "127.0.0.1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(["--port", "0", "--metrics-port", "0"].iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(&args, None, log)
    }

    /// Runs `geossl-serve ARGS` (in `cwd` when given), its stderr to `log`, and waits (≤ 120 s) for its
    /// "listening" line.
    pub fn spawn(args: &[String], cwd: Option<&Path>, log: PathBuf) -> Server {
        Server::spawn_env(args, cwd, log, &[])
    }

    /// [`Server::spawn`] with `env` set (e.g. an object store's endpoint and credentials).
    pub fn spawn_env(args: &[String], cwd: Option<&Path>, log: PathBuf, env: &[(&str, String)]) -> Server {
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin("geossl-serve"));
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn geossl-serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("listening ") => {
                    let field = |k: &str| -> SocketAddr {
                        line.split_whitespace()
                            .find_map(|f| f.strip_prefix(k))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or_else(|| panic!("bad listening line {line:?}"))
                    };
                    return Server { addr: field("http="), metrics: field("metrics="), child, stderr_log: log };
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server process in KiB (Linux; 0 when unreadable).
    pub fn rss_kib(&self) -> u64 {
        process_rss_kib(&self.pid().to_string()).unwrap_or(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Sum and count of a Prometheus histogram for a label set substring.
pub fn histogram(metrics_text: &str, name: &str, label: &str) -> (f64, f64) {
    let get = |suffix: &str| {
        metrics_text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_{suffix}")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (get("sum"), get("count"))
}

/// CPU time (user + system, every thread) of process `pid` ("self" for this one) so far, in seconds, from
/// `/proc/PID/stat` (fields 14 and 15, in the kernel ABI's fixed 100 ticks a second). Panics, naming the
/// process, where it cannot be read: a measurement must not go on with a zero.
pub fn process_cpu_seconds(pid: &str) -> f64 {
    let (user, system) = process_user_system_seconds(pid);
    user + system
}

/// Resident memory of process `pid` (its number, or `self`) in KiB, from `/proc/PID/status` (Linux); `None`
/// when it cannot be read.
pub fn process_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// [`process_cpu_seconds`] as (user, system): the system part is the kernel's work for the process (its
/// system calls, and softirq work run on their way out, such as a loopback peer's receive path).
pub fn process_user_system_seconds(pid: &str) -> (f64, f64) {
    let at = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&at).unwrap_or_else(|e| panic!("{at}: {e} (has the process exited?)"));
    // The command name (field 2) may hold spaces: the fields after it follow its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap_or_else(|| panic!("{at}: no command name in {stat:?}")) + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize, name: &str| -> f64 {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{at}: no {name} (field {}) in {stat:?}", i + 3))
    };
    (ticks(11, "utime") / 100.0, ticks(12, "stime") / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_count_this_process_work() {
        let before = process_cpu_seconds("self");
        // Spin until the kernel's tick accounting (10 ms steps) has seen it.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while process_cpu_seconds("self") - before < 0.05 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            assert!(t.elapsed().as_secs() < 30, "50 ms of CPU not counted in 30 s");
        }
        std::hint::black_box(x);
        let (user, system) = process_user_system_seconds("self");
        assert!(user > 0.0 && system >= 0.0 && user + system >= before + 0.05);
    }

    #[test]
    #[should_panic(expected = "/proc/0/stat")]
    fn an_unreadable_process_is_named_not_counted_as_zero() {
        process_cpu_seconds("0");
    }
}
