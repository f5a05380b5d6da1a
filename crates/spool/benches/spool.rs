//! Spool append and ack (remove) with group commit, fsync on, in a temp dir:
//! `concurrent` appends are in flight at once, as from that many SMTP
//! sessions, so the writer thread commits them in a few fsynced batches.
//! `cargo bench -p poolrelay-spool --bench spool`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use poolrelay_spool::{Envelope, FjallSpool, Spool, now_ms};

/// Built from JSON, the spool's own record format, so fields added later
/// with `#[serde(default)]` need no change here.
fn envelope(rcpts: usize) -> Envelope {
    let recipients: Vec<String> = (0..rcpts)
        .map(|i| format!(r#"{{"address":"member{i}@example.com","state":"pending"}}"#))
        .collect();
    let json = format!(
        r#"{{"pool":"A","sender":"owner-list@lists.example.org","recipients":[{}],
            "accepted_ms":{},"attempts":0,"next_attempt_ms":0,"size":4096,
            "listener":"main","client":"127.0.0.1:40000"}}"#,
        recipients.join(","),
        now_ms()
    );
    serde_json::from_str(&json).expect("envelope JSON")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `concurrent` appends in flight at once; with `ack`, each is then removed
/// (also in flight together), as a delivered message leaves the spool.
async fn round(spool: &FjallSpool, concurrent: usize, body: &[u8], ack: bool) {
    let tasks: Vec<_> = (0..concurrent)
        .map(|_| tokio::spawn(spool.append(envelope(1), body.to_vec())))
        .collect();
    let mut ids = Vec::with_capacity(concurrent);
    for t in tasks {
        ids.push(t.await.expect("join").expect("append"));
    }
    if ack {
        let tasks: Vec<_> = ids
            .into_iter()
            .map(|id| tokio::spawn(spool.remove(id, "A")))
            .collect();
        for t in tasks {
            t.await.expect("join").expect("remove");
        }
    }
}

fn spool(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let spool = FjallSpool::open(dir.path()).expect("spool");
    let body = vec![b'x'; 4096];
    let mut group = c.benchmark_group("spool_4KB_fsync");
    group.measurement_time(Duration::from_secs(5));
    for (name, concurrent, ack) in [
        ("append", 1, false),
        ("append", 20, false),
        ("append", 64, false),
        ("append_then_ack", 20, true),
        ("append_then_ack", 64, true),
    ] {
        group.throughput(Throughput::Elements(concurrent as u64));
        group.bench_function(
            BenchmarkId::new(name, format!("{concurrent}_in_flight")),
            |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        rt.block_on(round(&spool, concurrent, &body, ack));
                    }
                    start.elapsed()
                })
            },
        );
    }
    group.finish();
    drop(spool);
}

criterion_group!(benches, spool);
criterion_main!(benches);
