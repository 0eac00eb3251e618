#![allow(clippy::unwrap_used)]
//! Overload: at twice the measured capacity for 30 s the server answers 429
//! (with Retry-After) instead of queueing without bound, never a 5xx, its
//! memory stays bounded, and it serves normally afterwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use geossl_tests::http::{oip_u8_binary_request, request};
use geossl_tests::server::{make_repository, Server};

fn body() -> (String, Vec<u8>) {
    let px: Vec<u8> = (0..3 * 64 * 64).map(|i| (i % 253) as u8).collect();
    oip_u8_binary_request(&[1, 3, 64, 64], &px)
}

/// One request; the status, or 0 when the connection failed.
fn one(addr: SocketAddr, hl: &str, b: &[u8]) -> (u16, bool) {
    match request(addr, "POST", "/v2/models/embed/infer", &[("Inference-Header-Content-Length", hl)], b) {
        Ok(r) => (r.status, r.header("retry-after").is_some()),
        Err(_) => (0, false),
    }
}

#[test]
fn twice_capacity_for_30_s_gives_429s_bounded_memory_and_recovery() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("embed", "embed", &[])]);
    std::fs::write(
        d.path().join("embed/config.toml"),
        "max_batch_size = 8\nmax_queue_delay_ms = 2\nqueue_capacity = 16\n",
    )
    .unwrap();
    let s = Server::start(d.path(), &["--max-inflight", "64", "--request-timeout-ms", "5000"]);
    let addr = s.addr;
    let (hl, b) = body();
    let payload = Arc::new((hl, b));

    // Capacity: 8 closed-loop clients for 4 s.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, p) = (stop.clone(), payload.clone());
            std::thread::spawn(move || {
                let mut ok = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if one(addr, &p.0, &p.1).0 == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let ok: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let capacity = f64::from(ok) / t0.elapsed().as_secs_f64();
    assert!(capacity > 1.0, "capacity {capacity:.1} req/s");

    // 2× capacity, open loop, for 30 s; a pool of clients takes the arrivals.
    let rate = 2.0 * capacity;
    let (tx, rx) = mpsc::channel::<()>();
    let rx = Arc::new(Mutex::new(rx));
    let results = Arc::new(Mutex::new(BTreeMap::<u16, u32>::new()));
    let missing_retry_after = Arc::new(Mutex::new(0u32));
    let pool: Vec<_> = (0..96)
        .map(|_| {
            let (rx, p, res, mra) = (rx.clone(), payload.clone(), results.clone(), missing_retry_after.clone());
            std::thread::spawn(move || loop {
                let job = rx.lock().unwrap().recv();
                if job.is_err() {
                    return;
                }
                let (st, retry) = one(addr, &p.0, &p.1);
                *res.lock().unwrap().entry(st).or_default() += 1;
                if st == 429 && !retry {
                    *mra.lock().unwrap() += 1;
                }
            })
        })
        .collect();
    let rss_start = s.rss_kib();
    let mut rss_max = rss_start;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut next_rss = start;
    while start.elapsed() < Duration::from_secs(30) {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            tx.send(()).unwrap();
            sent += 1;
        }
        if Instant::now() >= next_rss {
            rss_max = rss_max.max(s.rss_kib());
            next_rss += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(tx);
    for p in pool {
        p.join().unwrap();
    }
    let results = results.lock().unwrap().clone();
    let total: u32 = results.values().sum();
    let fives: u32 = results.iter().filter(|(k, _)| **k >= 500).map(|(_, v)| v).sum();
    eprintln!(
        "capacity {capacity:.1} req/s; offered {rate:.1} req/s for 30 s ({sent} requests); statuses {results:?}; RSS {} → max {} MiB",
        rss_start / 1024,
        rss_max / 1024
    );
    assert_eq!(total as u64, sent);
    assert_eq!(fives, 0, "5xx under overload: {results:?}");
    assert_eq!(results.get(&0), None, "connections failed: {results:?}");
    assert!(results.get(&429).copied().unwrap_or(0) > 0, "no 429 at 2× capacity: {results:?}");
    assert!(results.get(&200).copied().unwrap_or(0) > 0, "nothing served: {results:?}");
    assert_eq!(results.keys().filter(|k| ![200, 429].contains(*k)).count(), 0, "{results:?}");
    assert_eq!(*missing_retry_after.lock().unwrap(), 0, "429 without Retry-After");
    assert!(rss_max < rss_start + 256 * 1024, "RSS grew from {rss_start} to {rss_max} KiB");

    // Afterwards: normal service.
    for _ in 0..5 {
        assert_eq!(one(addr, &payload.0, &payload.1).0, 200);
    }
    assert!(!s.log().contains("internal error"), "{}", s.log());
}
