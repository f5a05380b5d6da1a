//! Classification of a message against 100 routes (sender, recipient and
//! header globs), the config built with `Config::parse` from TOML.
//! `cargo bench -p poolrelay-relay --bench classify`.

use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use poolrelay_config::Config;
use poolrelay_relay::classifier::{Classifier, Facts};

const ROUTES: usize = 100;

/// 26 pools and 100 routes: by sender (owner-listN@*), by recipient
/// (*@dept-N.example.edu) and by header (Sender: LIST-N@*) in turn.
fn config_text() -> String {
    let mut t = String::from(
        "[server]\nhostname = \"relay.bench.example\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:2525\"\n\n\
         [defaults]\nlist_pool = \"A\"\n\n",
    );
    for p in b'A'..=b'Z' {
        t.push_str(&format!("[pool.{}]\n", p as char));
    }
    t.push_str("\n[[upstream]]\nhost = \"127.0.0.1:2601\"\n\n");
    for i in 0..ROUTES {
        let pool = (b'A' + (i % 26) as u8) as char;
        t.push_str(&format!("[[route]]\npool = \"{pool}\"\n"));
        match i % 3 {
            0 => t.push_str(&format!("sender = \"owner-list{i}@*\"\n\n")),
            1 => t.push_str(&format!("recipient = \"*@dept-{i}.example.edu\"\n\n")),
            _ => t.push_str(&format!(
                "header = {{ name = \"Sender\", value = \"LIST-{i}@*\" }}\n\n"
            )),
        }
    }
    t
}

/// A 4 KB list posting with a realistic header section.
fn message(sender_header: &str) -> Vec<u8> {
    let mut m = format!(
        "Received: from lists.example.org by relay.bench.example; Sat, 28 Nov 2026 14:00:00 +0000\r\n\
         Received: from client.example.org by lists.example.org; Sat, 28 Nov 2026 13:59:59 +0000\r\n\
         Date: Sat, 28 Nov 2026 13:59:58 +0000\r\n\
         From: Some One <someone@example.org>\r\n\
         Sender: {sender_header}\r\n\
         To: Members <members@lists.example.org>\r\n\
         Subject: A subject line that is not short, as list subjects\r\n\
         \tare sometimes folded\r\n\
         Message-ID: <1234567890.abcdef@example.org>\r\n\
         List-Id: <members.lists.example.org>\r\n\
         List-Unsubscribe: <mailto:signoff@lists.example.org>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    .into_bytes();
    while m.len() < 4096 {
        m.extend_from_slice(&[b'x'; 76]);
        m.extend_from_slice(b"\r\n");
    }
    m
}

fn classify(c: &mut Criterion) {
    let config = Config::parse(&config_text(), Path::new("bench.toml")).expect("bench config");
    assert_eq!(config.routes.len(), ROUTES);
    let classifier = Classifier::new(&config);
    let rcpts: Vec<String> = (0..10).map(|i| format!("member{i}@example.com")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    // (name, sender, message): first route, last route (a header match), none.
    let first = message("OTHER@lists.example.org");
    let last = message("LIST-98@lists.example.org");
    let cases: [(&str, &str, &[u8], &str); 3] = [
        (
            "first_route",
            "owner-list0@lists.example.org",
            &first,
            "route",
        ),
        (
            "last_route_header",
            "owner-news@lists.example.org",
            &last,
            "route",
        ),
        (
            "no_route_list_pool",
            "owner-news@lists.example.org",
            &first,
            "list_pool",
        ),
    ];
    let mut group = c.benchmark_group("classify_100_routes");
    group.throughput(Throughput::Elements(1));
    for (name, sender, msg, reason) in cases {
        let facts = Facts {
            listener: "127.0.0.1:2525",
            pinned_pool: None,
            user: None,
            user_pool: None,
            sender,
            recipients: &rcpts,
            message: msg,
            mt_priority: 0,
        };
        assert_eq!(classifier.classify(&facts).reason, reason, "{name}");
        group.bench_with_input(BenchmarkId::from_parameter(name), &facts, |b, facts| {
            b.iter(|| black_box(classifier.classify(black_box(facts))))
        });
    }
    group.finish();
}

criterion_group!(benches, classify);
criterion_main!(benches);
