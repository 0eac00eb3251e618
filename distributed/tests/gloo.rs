//! Two ranks as two processes on 127.0.0.1 (this test binary run again with
//! torchrun's variables): rendezvous through c10d's TCPStore, collectives
//! through ProcessGroupGloo; a rank that vanishes makes the other fail within
//! the timeout instead of hanging, and with three ranks the survivors name it.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use geossl_dist::{ProcessGroup, Rendezvous};
use tch::{Kind, Tensor};

/// Set in a child: which test body to run as a rank.
const ROLE: &str = "GEOSSL_DIST_TEST_ROLE";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn_rank(test: &str, role: &str, rank: usize, world: usize, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn two_ranks_reduce_broadcast_and_gather() {
    if std::env::var(ROLE).as_deref() == Ok("collectives") {
        let r = Rendezvous::from_env(Duration::from_secs(30)).unwrap();
        let mut pg = ProcessGroup::connect(&r, geossl_dist::Backend::Gloo).unwrap();
        let k = (r.rank + 1) as f32;
        let mut t = Tensor::from_slice(&[k, 10.0 * k, -k]);
        pg.all_reduce_sum(&mut t).unwrap();
        assert_eq!(values(&t), [3.0, 30.0, -3.0], "rank {}", r.rank);
        let mut b = if r.rank == 0 {
            Tensor::from_slice(&[7.0f32, 8.0])
        } else {
            Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))
        };
        pg.broadcast(&mut b, 0).unwrap();
        assert_eq!(values(&b), [7.0, 8.0], "rank {}", r.rank);
        let g = pg.all_gather(&Tensor::from_slice(&[r.rank as f32, 100.0 + r.rank as f32])).unwrap();
        assert_eq!(g.size(), [2, 2]);
        assert_eq!(values(&g), [0.0, 100.0, 1.0, 101.0], "rank {}: rows in rank order", r.rank);
        pg.barrier().unwrap();
        println!("rank {} ok", r.rank);
        return;
    }
    let port = free_port();
    let kids: Vec<Child> =
        (0..2).map(|r| spawn_rank("two_ranks_reduce_broadcast_and_gather", "collectives", r, 2, port)).collect();
    for (r, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success() && text.contains(&format!("rank {r} ok")), "rank {r}: {text}");
    }
}

#[test]
fn a_vanished_rank_fails_the_other_within_the_timeout() {
    match std::env::var(ROLE).as_deref() {
        Ok("survivor") | Ok("leaver") => {
            let r = Rendezvous::from_env(Duration::from_secs(5)).unwrap();
            let mut pg = ProcessGroup::connect(&r, geossl_dist::Backend::Gloo).unwrap();
            pg.barrier().unwrap();
            if r.rank == 1 {
                std::process::exit(0); // gone without a word
            }
            std::thread::sleep(Duration::from_millis(500));
            let mut t = Tensor::from_slice(&[1.0f32]);
            let e = pg.all_reduce_sum(&mut t).unwrap_err();
            println!("survivor error: {e}");
            return;
        }
        _ => {}
    }
    let port = free_port();
    let test = "a_vanished_rank_fails_the_other_within_the_timeout";
    let started = Instant::now();
    let survivor = spawn_rank(test, "survivor", 0, 2, port);
    let leaver = spawn_rank(test, "leaver", 1, 2, port);
    assert!(leaver.wait_with_output().unwrap().status.success());
    let o = survivor.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && text.contains("survivor error: all_reduce failed on rank 0 of 2"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

/// Three ranks; one leaves after a barrier. The two left each fail their next collective and name the lost
/// rank from the heartbeats: rank 2 by its silent counter, rank 0 by its unreachable store.
#[test]
fn the_survivors_name_the_lost_rank_among_three() {
    if let Ok(role) = std::env::var(ROLE) {
        if let Some(leaver) = role.strip_prefix("three-") {
            let leaver: usize = leaver.parse().unwrap();
            let r = Rendezvous::from_env(Duration::from_secs(5)).unwrap();
            let mut pg = ProcessGroup::connect(&r, geossl_dist::Backend::Gloo).unwrap();
            pg.barrier().unwrap();
            assert_eq!(pg.lost_ranks(), None, "rank {}: every rank beats", r.rank);
            pg.barrier().unwrap();
            if r.rank == leaver {
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(500));
            let mut t = Tensor::from_slice(&[1.0f32]);
            pg.all_reduce_sum(&mut t).unwrap_err();
            match pg.lost_ranks() {
                Some(lost) => println!("rank {} lost {lost}", r.rank),
                None => println!("rank {} lost nobody", r.rank),
            }
            return;
        }
    }
    let test = "the_survivors_name_the_lost_rank_among_three";
    for (leaver, named) in [(2, "rank 2"), (0, "rank 0 (the rendezvous host)")] {
        let port = free_port();
        let started = Instant::now();
        let kids: Vec<Child> = (0..3).map(|r| spawn_rank(test, &format!("three-{leaver}"), r, 3, port)).collect();
        for (r, k) in kids.into_iter().enumerate() {
            let o = k.wait_with_output().unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            assert!(o.status.success(), "rank {r}: {text}");
            if r != leaver {
                assert!(text.contains(&format!("rank {r} lost {named}\n")), "rank {r} ({leaver} left): {text}");
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    }
}

#[test]
fn an_unreachable_master_and_a_mismatched_world_size_are_named() {
    if std::env::var(ROLE).as_deref() == Ok("mismatch") {
        let r = Rendezvous::from_env(Duration::from_secs(5)).unwrap();
        match ProcessGroup::connect(&r, geossl_dist::Backend::Gloo) {
            Ok(_) => println!("rank {} connected", r.rank),
            Err(e) => println!("rank {} error: {e}", r.rank),
        }
        return;
    }
    // Nobody serves the rendezvous: the error names the address, after the timeout.
    let port = free_port();
    let r = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank: 1,
        world_size: 2,
        timeout: Duration::from_secs(2),
    };
    let started = Instant::now();
    let e = ProcessGroup::connect(&r, geossl_dist::Backend::Gloo).unwrap_err().to_string();
    assert!(e.contains(&format!("rendezvous at 127.0.0.1:{port} as rank 1 of 2 failed")), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    // Rank 1 believes in 3 ranks, rank 0 in 2.
    let port = free_port();
    let test = "an_unreachable_master_and_a_mismatched_world_size_are_named";
    let r0 = spawn_rank(test, "mismatch", 0, 2, port);
    let r1 = spawn_rank(test, "mismatch", 1, 3, port);
    let o1 = r1.wait_with_output().unwrap();
    let o0 = r0.wait_with_output().unwrap();
    let t1 = String::from_utf8_lossy(&o1.stdout);
    assert!(t1.contains("WORLD_SIZE differs: rank 0 has 2, rank 1 has 3"), "{t1}");
    assert!(!String::from_utf8_lossy(&o0.stdout).contains("connected"), "rank 0 formed a group without rank 1");
}
