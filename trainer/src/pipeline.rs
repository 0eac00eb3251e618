//! Data preparation off the stepping thread for the evaluation commands
//! (`probe`, `finetune`, `segment`): an ordered parallel map, and a batch
//! pipeline whose workers prepare the next batches while the current one
//! trains. Results never depend on the number of workers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// `items.iter().map(f)` on `workers` scoped threads, results in input order.
pub fn map_ordered<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = workers.clamp(1, items.len().max(1));
    if workers == 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut parts: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break out };
                        out.push((i, f(item)));
                    }
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    parts.sort_unstable_by_key(|(i, _)| *i);
    parts.into_iter().map(|(_, r)| r).collect()
}

/// Batches `0..n` made by `produce(b)` on `workers` threads (worker `w` makes
/// `w, w + workers, …`, each at most one batch ahead of the consumer) and
/// handed to `consume(b, batch)` in order on the calling thread. An error from
/// `consume` stops the workers and is returned.
pub fn pipeline<B: Send, E>(
    n: usize,
    workers: usize,
    produce: impl Fn(usize) -> B + Sync,
    mut consume: impl FnMut(usize, B) -> Result<(), E>,
) -> Result<(), E> {
    let workers = workers.clamp(1, n.max(1));
    std::thread::scope(|s| {
        let produce = &produce;
        let receivers: Vec<mpsc::Receiver<B>> = (0..workers)
            .map(|w| {
                let (tx, rx) = mpsc::sync_channel(1);
                s.spawn(move || {
                    for b in (w..n).step_by(workers) {
                        if tx.send(produce(b)).is_err() {
                            break; // the consumer stopped
                        }
                    }
                });
                rx
            })
            .collect();
        for b in 0..n {
            // A closed channel means that worker panicked; the scope re-raises it.
            let Ok(batch) = receivers[b % workers].recv() else { break };
            consume(b, batch)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_ordered_keeps_order_for_any_worker_count() {
        let items: Vec<u64> = (0..103).collect();
        let want: Vec<u64> = items.iter().map(|x| x * x).collect();
        for workers in [0, 1, 2, 7, 500] {
            assert_eq!(map_ordered(&items, workers, |x| x * x), want, "workers {workers}");
        }
        assert!(map_ordered(&[] as &[u64], 4, |x| *x).is_empty());
    }

    #[test]
    fn pipeline_delivers_every_batch_in_order_and_stops_on_error() {
        for workers in [1, 3, 16] {
            let mut seen = Vec::new();
            let r: Result<(), String> = pipeline(
                10,
                workers,
                |b| b * 10,
                |b, x| {
                    seen.push((b, x));
                    Ok(())
                },
            );
            assert!(r.is_ok());
            assert_eq!(seen, (0..10).map(|b| (b, b * 10)).collect::<Vec<_>>(), "workers {workers}");
        }
        let made = AtomicUsize::new(0);
        let r = pipeline(
            1000,
            2,
            |b| {
                made.fetch_add(1, Ordering::Relaxed);
                b
            },
            |b, _| if b == 3 { Err(format!("stop at {b}")) } else { Ok(()) },
        );
        assert_eq!(r, Err("stop at 3".to_string()));
        // The workers stopped soon after: at most one batch queued and one in hand each.
        assert!(made.load(Ordering::Relaxed) <= 4 + 2 * 2, "made {}", made.load(Ordering::Relaxed));
    }
}
