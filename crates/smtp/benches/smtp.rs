//! Hot paths of the wire: the inbound session on a buffer of pipelined
//! commands, and DATA framing. `cargo bench -p poolrelay-smtp --bench smtp`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use poolrelay_smtp::{DataDecoder, DataStatus, Output, Session, SessionConfig};

const MESSAGES: usize = 10;

fn config() -> SessionConfig {
    SessionConfig {
        hostname: "relay.bench.example".into(),
        max_message_size: 64 << 20,
        max_recipients: 1000,
        max_line_length: 2048,
        relay_allowed: true,
        max_hops: 50,
        security: Default::default(),
        mt_priority: None,
        mt_priority_trusted: false,
    }
}

/// Message content as a client sends it: headers, `size` bytes of 76-column
/// lines (some starting with a dot, so unstuffing is exercised), final dot.
fn content(size: usize) -> Vec<u8> {
    let mut m = b"From: <owner-list@lists.example.org>\r\nTo: <member@example.com>\r\n\
Subject: benchmark\r\nMessage-ID: <bench@lists.example.org>\r\n\r\n"
        .to_vec();
    let mut n = 0;
    while m.len() < size {
        if n % 20 == 0 {
            m.extend_from_slice(b"..a line that starts with a dot, stuffed by the client\r\n");
        } else {
            m.extend_from_slice(&[b'x'; 76]);
            m.extend_from_slice(b"\r\n");
        }
        n += 1;
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// EHLO, then `MESSAGES` transactions (MAIL, RCPT × rcpts, DATA, content)
/// and QUIT, all in one buffer as a pipelining client may send it.
fn pipelined(size: usize, rcpts: usize) -> Vec<u8> {
    let body = content(size);
    let mut buf = b"EHLO client.example.org\r\n".to_vec();
    for _ in 0..MESSAGES {
        buf.extend_from_slice(
            b"MAIL FROM:<owner-list@lists.example.org> SIZE=5000 BODY=8BITMIME\r\n",
        );
        for r in 0..rcpts {
            buf.extend_from_slice(format!("RCPT TO:<member{r}@example.com>\r\n").as_bytes());
        }
        buf.extend_from_slice(b"DATA\r\n");
        buf.extend_from_slice(&body);
    }
    buf.extend_from_slice(b"QUIT\r\n");
    buf
}

/// Runs one session over `input` fed in `chunk`-byte reads, answering every
/// finished transaction as queued; returns the number of messages.
fn run_session(input: &[u8], chunk: usize) -> usize {
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let (mut session, banner) = Session::new(config(), peer);
    black_box(banner);
    let mut messages = 0;
    for piece in input.chunks(chunk) {
        let mut outputs = session.feed(piece);
        loop {
            let mut resume = false;
            for output in outputs {
                match output {
                    Output::Reply(bytes) => {
                        black_box(bytes);
                    }
                    Output::Message(tx) => {
                        black_box(&tx.message);
                        messages += 1;
                        black_box(session.queued("0123456789ABCDEF"));
                        resume = true;
                    }
                    Output::Close => {}
                    Output::StartTls | Output::Authenticate(_) => {
                        unreachable!("the benchmark offers no STARTTLS or AUTH")
                    }
                }
            }
            if !resume {
                break;
            }
            outputs = session.feed(&[]);
        }
    }
    messages
}

fn session(c: &mut Criterion) {
    let mut group = c.benchmark_group("inbound_session_pipelined");
    for (size, rcpts) in [(4096, 1), (4096, 10), (51200, 1)] {
        let input = pipelined(size, rcpts);
        assert_eq!(run_session(&input, 64 * 1024), MESSAGES);
        group.throughput(Throughput::Elements(MESSAGES as u64));
        group.bench_with_input(
            BenchmarkId::new("10_messages", format!("{}KB_x{rcpts}rcpt", size / 1024)),
            &input,
            |b, input| b.iter(|| run_session(input, 64 * 1024)),
        );
    }
    group.finish();
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_framing");
    for size in [4096, 51200, 1 << 20] {
        let input = content(size);
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("decode", format!("{}KB", size / 1024)),
            &input,
            |b, input| {
                let mut out = Vec::with_capacity(input.len());
                b.iter(|| {
                    out.clear();
                    let mut decoder = DataDecoder::new(64 << 20);
                    let (used, status) = decoder.feed(black_box(input), &mut out);
                    assert_eq!(status, DataStatus::Done(Ok(())));
                    black_box(used)
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, session, framing);
criterion_main!(benches);
