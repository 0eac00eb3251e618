//! Similarity-search benchmark (run by `scripts/bench/search_bench.sh`, not a test): recall@10, QPS at 1 and 8
//! threads in process, and QPS and p50/p99 latency at 1 and 8 clients over HTTP, of an index from `geossl-serve
//! index build`, for each HNSW expansion. Queries and their exact neighbours come from the driver (FAISS's exact
//! search on the same vectors). Prints one JSON object.
//!
//! Env: GEOSSL_BENCH_INDEX (index directory), GEOSSL_BENCH_QUERIES (`.npy`, float32 `[Q, D]`),
//! GEOSSL_BENCH_TRUTH (`.npy`, int64 `[Q, ≥10]`: row numbers of the exact neighbours, best first),
//! GEOSSL_BENCH_EF (comma-separated expansions, default 16,32,64,128,256), GEOSSL_BENCH_SECONDS (per
//! measurement, default 5), GEOSSL_BENCH_HTTP (0: in process only). Served over HTTP at the smallest
//! expansion reaching recall@10 ≥ 0.95 (the index's manifest is rewritten: give it a scratch index), with the
//! query embedding as a raw little-endian float32 body (1 and 8 clients) and as JSON (8 clients), in
//! GEOSSL_BENCH_ROUNDS rounds (default 3). A round measures the same search in process beside the served one,
//! in GEOSSL_BENCH_SLICES pairs of short slices (default 10, i.e. 0.5 s each) whose order alternates, so both
//! see the machine's drift alike; the served/in-process ratio reported is the median round's.
//! CPU time a query in process and a request served (of the server process, with its kernel part, and of this
//! load generator, from `/proc/PID/stat`), and the server's own clock of its searches (its
//! `geossl_search_duration_seconds`), say what the server spends beyond the search; a readiness request at 8
//! clients gives the HTTP stack's own cost (the floor).
//! GEOSSL_BENCH_SERVER_CPUS and GEOSSL_BENCH_CLIENT_CPUS (`taskset` CPU lists, e.g. `0` and `1`): the server
//! and the in-process search beside it on the first, the load generator on the others, so the clients take no
//! CPU from the server (as clients on other machines would not); the server's HTTP workers are then one per
//! server CPU. The recall/QPS curve before still uses every CPU, as FAISS's does. Unset: everything shares
//! every CPU.
//! With the clients on CPUs of their own, the binary-body measurement at 8 clients is made once more with
//! the 8 connections in one client thread that polls them without ever sleeping ([`polled`]): the server
//! then no longer pays for waking a client on loopback, as it would not for clients on other machines.
//! GEOSSL_BENCH_RERANK: candidates re-scored per answer in process, for an index with a float32 copy
//! (default: the library's, which the server uses).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use geossl_serve::search::index::Index;
use geossl_serve::search::query::{Filters, Query};
use geossl_tests::server::{histogram, process_cpu_seconds, process_user_system_seconds, Server};
use serde_json::json;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// A little-endian `.npy` of float32 or int64, as (shape, values as f64).
fn npy(path: &str) -> (Vec<usize>, Vec<f64>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data = &b[10 + hlen..];
    let values = if header.contains("<f4") {
        data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
    } else if header.contains("<i8") {
        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
    } else {
        panic!("{path}: want <f4 or <i8, header {header}");
    };
    (shape, values)
}

/// A keep-alive HTTP/1.1 client connection.
struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        Conn { r: BufReader::new(s) }
    }

    /// Sends one whole request (head and body, written at once) and returns the status and body.
    fn call(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        self.r.get_mut().write_all(request).unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut head = String::new();
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut b = vec![0; content_length(&head)];
        self.r.read_exact(&mut b).unwrap();
        (status, b)
    }
}

/// The `Content-Length` of a response's header lines (0 when absent).
fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.trim().parse().unwrap())
}

/// A whole `POST` request to `path`, head and body.
fn request(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Pins the calling thread to `cpus` (a `taskset` CPU list); nothing when `None`.
fn pin(cpus: Option<&str>) {
    let Some(cpus) = cpus else { return };
    // "PID/task/TID": the calling thread's id, for taskset.
    let me = std::fs::read_link("/proc/thread-self").unwrap();
    let tid = me.file_name().unwrap().to_str().unwrap().to_string();
    let out = std::process::Command::new("taskset").args(["-cp", cpus, &tid]).output().expect("taskset");
    assert!(out.status.success(), "taskset -cp {cpus} {tid}: {}", String::from_utf8_lossy(&out.stderr));
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// What a closed loop did: its calls' latencies (s), how long it ran (s) and this process's CPU time (s).
#[derive(Default)]
struct Run {
    latencies: Vec<f64>,
    elapsed: f64,
    cpu: f64,
}

impl Run {
    fn add(&mut self, other: Run) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
    }

    fn qps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed
    }

    /// p50 and p99 latency in ms.
    fn p50_p99_ms(&mut self) -> (f64, f64) {
        self.latencies.sort_by(f64::total_cmp);
        (percentile(&self.latencies, 0.5) * 1e3, percentile(&self.latencies, 0.99) * 1e3)
    }

    /// `seconds` spread over the calls, in µs a call.
    fn per_call_us(&self, seconds: f64) -> f64 {
        seconds / self.latencies.len() as f64 * 1e6
    }

    /// This process's CPU µs a call.
    fn cpu_us(&self) -> f64 {
        self.per_call_us(self.cpu)
    }
}

/// `threads` closed-loop workers (on `cpus` when given) calling `f(worker, query number)` for `secs`.
fn closed(threads: usize, cpus: Option<&str>, secs: f64, q: usize, f: &(dyn Fn(usize, usize) + Sync)) -> Run {
    let cpu = process_cpu_seconds("self");
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let lat = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (next, stop, lat) = (&next, &stop, &lat);
            s.spawn(move || {
                pin(cpus);
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed) % q;
                    let t0 = Instant::now();
                    f(t, i);
                    mine.push(t0.elapsed().as_secs_f64());
                }
                lat.lock().unwrap().extend(mine);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed().as_secs_f64();
    Run { latencies: lat.into_inner().unwrap(), elapsed, cpu: process_cpu_seconds("self") - cpu }
}

/// Keep-alive connections (`streams`, one a client) in one thread (on `cpus`) that never sleeps: it polls
/// every connection without blocking, sends a connection its next request (`requests` in turn) as soon as its
/// answer is whole, and stops sending after `secs` (the answers then still due are waited for and counted, as
/// [`closed`]'s threads finish their call). With blocking clients on the same machine, the server's send of
/// each answer wakes a sleeping client thread on the other CPU (an inter-processor interrupt, a VM exit here)
/// and runs the client's TCP receive: costs the server would not bear for clients on other machines. A client
/// that is always running needs no waking.
fn polled(streams: Vec<TcpStream>, cpus: Option<&str>, secs: f64, requests: &[Vec<u8>]) -> Run {
    use std::io::ErrorKind;
    struct Pending {
        s: TcpStream,
        got: Vec<u8>,
        sent: Instant,
        next: usize,
        busy: bool,
    }
    let clients = streams.len();
    let cpu = process_cpu_seconds("self");
    let mut latencies = Vec::new();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            pin(cpus);
            let mut conns: Vec<Pending> = streams
                .into_iter()
                .enumerate()
                .map(|(c, s)| {
                    s.set_nonblocking(true).unwrap();
                    Pending { s, got: Vec::new(), sent: Instant::now(), next: c, busy: false }
                })
                .collect();
            let send = |p: &mut Pending| {
                let r = &requests[p.next % requests.len()];
                p.next += clients;
                let mut at = 0;
                while at < r.len() {
                    match p.s.write(&r[at..]) {
                        Ok(n) => at += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
                        Err(e) => panic!("sending a request: {e}"),
                    }
                }
                p.sent = Instant::now();
                p.busy = true;
            };
            let started = Instant::now();
            for p in conns.iter_mut() {
                send(p);
            }
            let mut buf = vec![0u8; 1 << 16];
            while conns.iter().any(|p| p.busy) {
                let sending = started.elapsed().as_secs_f64() < secs;
                for p in conns.iter_mut().filter(|p| p.busy) {
                    match p.s.read(&mut buf) {
                        Ok(0) => panic!("the server closed a connection"),
                        Ok(n) => p.got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                        Err(e) => panic!("reading an answer: {e}"),
                    }
                    let Some(head) = p.got.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let text = String::from_utf8_lossy(&p.got[..head]).to_string();
                    let len = content_length(&text);
                    if p.got.len() < head + 4 + len {
                        continue;
                    }
                    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                    assert_eq!(p.got.len(), head + 4 + len, "an answer nobody asked for");
                    latencies.push(p.sent.elapsed().as_secs_f64());
                    p.got.clear();
                    p.busy = false;
                    if sending {
                        send(p);
                    }
                }
            }
            latencies.push(started.elapsed().as_secs_f64());
        });
    });
    let elapsed = latencies.pop().unwrap();
    Run { latencies, elapsed, cpu: process_cpu_seconds("self") - cpu }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches` builds this; the driver runs it with --bench.
    }
    let dir = std::env::var("GEOSSL_BENCH_INDEX").expect("GEOSSL_BENCH_INDEX");
    let server_cpus = std::env::var("GEOSSL_BENCH_SERVER_CPUS").ok();
    let client_cpus = std::env::var("GEOSSL_BENCH_CLIENT_CPUS").ok();
    assert_eq!(server_cpus.is_some(), client_cpus.is_some(), "set both GEOSSL_BENCH_SERVER_CPUS and _CLIENT_CPUS");
    let (server_cpus, client_cpus) = (server_cpus.as_deref(), client_cpus.as_deref());
    let (qs, qv) = npy(&std::env::var("GEOSSL_BENCH_QUERIES").expect("GEOSSL_BENCH_QUERIES"));
    let (ts, tv) = npy(&std::env::var("GEOSSL_BENCH_TRUTH").expect("GEOSSL_BENCH_TRUTH"));
    let (nq, d) = (qs[0], qs[1]);
    let queries: Vec<Vec<f32>> = qv.chunks(d).map(|r| r.iter().map(|&x| x as f32).collect()).collect();
    let truth: Vec<Vec<u64>> = tv.chunks(ts[1]).map(|r| r[..10].iter().map(|&x| x as u64).collect()).collect();
    let secs = env("GEOSSL_BENCH_SECONDS", 5.0);
    let efs: Vec<usize> = std::env::var("GEOSSL_BENCH_EF")
        .unwrap_or_else(|_| "16,32,64,128,256".into())
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    let rerank = env("GEOSSL_BENCH_RERANK", geossl_serve::search::rerank::PER_ANSWER);
    let open = |ef: usize| Index::open(&dir).unwrap().with_expansion(ef).with_rerank(rerank);
    let t = Instant::now();
    let base = Index::open(&dir).unwrap();
    let open_s = t.elapsed().as_secs_f64();
    let reranked = base.manifest.rerank.then_some(rerank);
    let base_simd = base.acceleration();
    eprintln!("distance kernels: {base_simd}");
    let f = Filters::default();
    let mut curve = Vec::new();
    for &ef in &efs {
        let index = open(ef);
        let mut found = 0usize;
        for (q, want) in queries.iter().zip(&truth) {
            let hits = index.search(&Query::Embedding(q.clone()), 10, &f).unwrap();
            found += hits.iter().filter(|h| want.contains(&h.key)).count();
        }
        let recall = found as f64 / (10 * nq) as f64;
        let run = |_t: usize, i: usize| {
            index.search(&Query::Embedding(queries[i].clone()), 10, &f).unwrap();
        };
        let mut one = closed(1, None, secs, nq, &run);
        let mut eight = closed(8, None, secs, nq, &run);
        let (qps1, qps8, cpu_us_8) = (one.qps(), eight.qps(), eight.cpu_us());
        let ((p50_1, p99_1), (p50_8, p99_8)) = (one.p50_p99_ms(), eight.p50_p99_ms());
        eprintln!("ef {ef}: recall@10 {recall:.4}, {qps1:.0} QPS at 1 thread, {qps8:.0} at 8");
        curve.push(json!({"ef": ef, "recall_at_10": recall, "qps_1": qps1, "qps_8": qps8,
            "p50_ms_1": p50_1, "p99_ms_1": p99_1, "p50_ms_8": p50_8, "p99_ms_8": p99_8,
            "cpu_us_per_query_8": cpu_us_8}));
    }
    if env::<u8>("GEOSSL_BENCH_HTTP", 1) == 0 {
        println!(
            "{}",
            json!({"index": dir, "queries": nq, "dimensions": d, "open_s": open_s, "simd": base_simd,
            "rerank_per_answer": reranked, "in_process": curve})
        );
        return;
    }
    // Served: the index at the smallest expansion that reached recall@10 ≥ 0.95 in process (written into this
    // scratch index's manifest, which the server reads), embedding queries over keep-alive connections.
    let served_ef = curve
        .iter()
        .find(|c| c["recall_at_10"].as_f64().unwrap() >= 0.95)
        .map_or(base.manifest.hnsw.expansion_search, |c| c["ef"].as_u64().unwrap() as usize);
    drop(base);
    let manifest_at = PathBuf::from(&dir).join(geossl_serve::search::index::MANIFEST);
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_at).unwrap()).unwrap();
    manifest["hnsw"]["expansion_search"] = json!(served_ef);
    std::fs::write(&manifest_at, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let log = std::env::temp_dir().join(format!("search-bench-{}.log", std::process::id()));
    let args: Vec<String> =
        ["serve", "--index", &format!("bench={dir}"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    // This thread, and so the server it starts (a child inherits its creator's CPUs), on the server's CPUs.
    pin(server_cpus);
    let t = Instant::now();
    let server = Server::spawn(&args, None, log);
    let ready_s = t.elapsed().as_secs_f64();
    // Each query as JSON ({"embedding": [...], "k": 10}) and as its raw little-endian float32 (k in the query
    // string), whole requests built before the clock starts.
    let path = "/v1/indexes/bench/search";
    let json_requests: Vec<Vec<u8>> = queries
        .iter()
        .map(|q| {
            request(server.addr, path, "application/json", json!({"embedding": q, "k": 10}).to_string().as_bytes())
        })
        .collect();
    let binary_requests: Vec<Vec<u8>> = queries
        .iter()
        .map(|q| {
            let raw: Vec<u8> = q.iter().flat_map(|x| x.to_le_bytes()).collect();
            request(server.addr, &format!("{path}?k=10"), geossl_serve::http::search::EMBEDDING_MEDIA_TYPE, &raw)
        })
        .collect();
    // The same search in process, at the served expansion, alternating with the served measurement round by
    // round: this machine's speed drifts by tens of percent within a minute (shared caches, other tenants), so
    // each round's served QPS is compared with the in-process QPS measured beside it, and the order within a
    // round alternates. The ratio reported is the median round's.
    let index = open(served_ef);
    let in_process = |_t: usize, i: usize| {
        index.search(&Query::Embedding(queries[i].clone()), 10, &f).unwrap();
    };
    let rounds = env("GEOSSL_BENCH_ROUNDS", 3usize).max(1);
    let slices = env("GEOSSL_BENCH_SLICES", 10usize).max(1);
    // The server's own clock of its searches (seconds in the index, HTTP excluded), from its metrics.
    let metrics_request = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", server.metrics).into_bytes();
    let search_seconds = || {
        let (_, text) = Conn::open(server.metrics).call(&metrics_request);
        histogram(&String::from_utf8_lossy(&text), "geossl_search_duration_seconds", "op=\"search\"")
    };
    // `clients` closed-loop clients sending `requests` (in turn) for `secs`: the run, the server's CPU s (all,
    // and the kernel's part) and its searches' s by its clock. Connections opened afresh (the server closes one
    // idle for its keep-alive while the in-process search runs).
    // `polling`: the clients are one thread that never sleeps ([`polled`]) rather than a thread each.
    let measure_served = |clients: usize, secs: f64, requests: &[Vec<u8>], polling: bool| {
        let conns: Vec<Conn> = (0..clients).map(|_| Conn::open(server.addr)).collect();
        // The metrics request before the CPU reading, so its cost is not counted.
        let (search0, _) = search_seconds();
        let pid = server.pid().to_string();
        let (user0, system0) = process_user_system_seconds(&pid);
        let run = if polling {
            polled(conns.into_iter().map(|c| c.r.into_inner()).collect(), client_cpus, secs, requests)
        } else {
            let conns: Vec<Mutex<Conn>> = conns.into_iter().map(Mutex::new).collect();
            let served = |t: usize, i: usize| {
                let (status, _) = conns[t].lock().unwrap().call(&requests[i % requests.len()]);
                assert_eq!(status, 200);
            };
            closed(clients, client_cpus, secs, nq, &served)
        };
        let (user, system) = process_user_system_seconds(&pid);
        let (search, _) = search_seconds();
        (run, user - user0 + system - system0, system - system0, search - search0)
    };
    let mut http = Vec::new();
    // Clients that never sleep only where they have CPUs of their own (spinning, they would take the server's).
    let mut kinds = vec![
        ("binary", 1usize, &binary_requests, false),
        ("binary", 8, &binary_requests, false),
        ("json", 8, &json_requests, false),
    ];
    if client_cpus.is_some() {
        kinds.push(("binary", 8, &binary_requests, true));
    }
    for (body, clients, requests, polling) in kinds {
        let client = if polling { "one polling thread" } else { "a thread each" };
        let mut per_round = Vec::new();
        for r in 0..rounds {
            // A round: `slices` pairs of a served and an in-process slice (secs / slices each), the order
            // alternating from pair to pair, so that both sides see the same drift.
            let (mut served, mut inp) = (Run::default(), Run::default());
            let (mut server_s, mut server_system_s, mut server_search_s) = (0.0, 0.0, 0.0);
            let slice = secs / slices as f64;
            for j in 0..slices {
                let in_process_first = (r + j) % 2 == 0;
                if in_process_first {
                    inp.add(closed(clients, server_cpus, slice, nq, &in_process));
                }
                let (run, all, system, search) = measure_served(clients, slice, requests, polling);
                served.add(run);
                server_s += all;
                server_system_s += system;
                server_search_s += search;
                if !in_process_first {
                    inp.add(closed(clients, server_cpus, slice, nq, &in_process));
                }
            }
            let (qps, qps_in) = (served.qps(), inp.qps());
            let (p50, p99) = served.p50_p99_ms();
            let (server_us, server_system_us, server_search_us) = (
                served.per_call_us(server_s),
                served.per_call_us(server_system_s),
                served.per_call_us(server_search_s),
            );
            let (client_us, cpu_in) = (served.cpu_us(), inp.cpu_us());
            eprintln!(
                "HTTP, {body} bodies, {clients} clients ({client}), round {r}: {qps:.0} QPS (in process {qps_in:.0}: {:.2}), p50 \
                 {p50:.2} ms, p99 {p99:.2} ms; CPU a request: server {server_us:.0} µs ({server_system_us:.0} in the \
                 kernel; searching {server_search_us:.0} µs by its clock), client {client_us:.0} µs, a query in process {cpu_in:.0} µs",
                qps / qps_in,
            );
            per_round.push(json!({"qps": qps, "in_process_qps": qps_in, "served_over_in_process": qps / qps_in,
                "p50_ms": p50, "p99_ms": p99, "server_cpu_us_per_request": server_us,
                "server_system_cpu_us_per_request": server_system_us, "client_cpu_us_per_request": client_us,
                "server_search_us_per_request": server_search_us, "in_process_cpu_us_per_query": cpu_in,
                // What the server spends a request against what the search alone spends a query: the
                // served/in-process QPS ratio of a server whose clients cost it nothing.
                "in_process_over_server_cpu": cpu_in / server_us}));
        }
        let mut order: Vec<usize> = (0..per_round.len()).collect();
        order.sort_by(|&x, &y| {
            let key = |i: usize| per_round[i]["served_over_in_process"].as_f64().unwrap();
            key(x).total_cmp(&key(y))
        });
        let median = per_round[order[order.len() / 2]].clone();
        eprintln!("{body} bodies, {clients} clients ({client}): median round {median}");
        http.push(json!({"body": body, "clients": clients, "client_threads": client, "median_round": median,
            "rounds": per_round}));
    }
    // The floor: what the HTTP stack alone costs the server a request (readiness: no body, no search), at 8
    // clients. A search served can cost no less than the search in process plus this.
    let ready = format!("GET /v2/health/ready HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).into_bytes();
    let (mut run, server_s, server_system_s, _) = measure_served(8, secs, &[ready], false);
    let (qps, (p50, p99), client_us) = (run.qps(), run.p50_p99_ms(), run.cpu_us());
    let (server_us, server_system_us) = (run.per_call_us(server_s), run.per_call_us(server_system_s));
    eprintln!(
        "HTTP floor (GET /v2/health/ready, 8 clients): {qps:.0} QPS, p50 {p50:.3} ms, p99 {p99:.3} ms; CPU a request: \
         server {server_us:.0} µs ({server_system_us:.0} in the kernel), client {client_us:.0} µs",
    );
    let floor = json!({"request": "GET /v2/health/ready", "clients": 8, "qps": qps, "p50_ms": p50,
        "p99_ms": p99, "server_cpu_us_per_request": server_us,
        "server_system_cpu_us_per_request": server_system_us, "client_cpu_us_per_request": client_us});
    let rss_kib = server.rss_kib();
    drop(server);
    let out = json!({
        "index": PathBuf::from(&dir).display().to_string(), "queries": nq, "dimensions": d,
        "open_s": open_s, "simd": base_simd, "rerank_per_answer": reranked, "server_ready_s": ready_s,
        "server_rss_kib": rss_kib,
        "in_process": curve, "http": {"ef": served_ef, "runs": http, "floor": floor},
        "server_cpus": server_cpus, "client_cpus": client_cpus,
    });
    println!("{out}");
}
