//! Hostile clients and session slots: a client that never reads, one that
//! repeats junk commands, one address opening every session, and IPv4
//! clients of a dual-stack listener.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use poolrelay_tests::{Relay, Sink, SmtpClient, accepts_tcp, metric_sum, parse_metrics};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A config with `server_keys` added to `[server]`.
fn with_server_keys(config: String, server_keys: &str) -> String {
    config.replacen("[server]\n", &format!("[server]\n{server_keys}\n"), 1)
}

/// Connects from 127.0.0.1 with a small receive buffer, so that replies
/// the client never reads fill the buffers soon; reads the greeting only.
fn unread_connection(addr: SocketAddr) -> (TcpStream, String) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .bind(&SocketAddr::new(LOCALHOST, 0).into())
        .expect("bind 127.0.0.1");
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .expect("write timeout");
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while !greeting.ends_with(b"\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
        greeting.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&greeting).into_owned())
}

#[test]
fn a_client_that_never_reads_loses_its_session_slot() {
    let sink = Sink::start();
    let relay = Relay::start(|s| {
        with_server_keys(
            s.single_upstream(sink.addr(), "max_recipients = 1"),
            "max_sessions = 1\ncommand_timeout = \"2s\"",
        )
    });

    // The only session slot: a client that sends without ever reading.
    // Refused recipients (452, not an error) make replies without end.
    // (The harness's startup probe may still hold the slot for a moment.)
    let mut hog = None;
    relay.wait_until(
        "the hog to get the only session",
        Duration::from_secs(10),
        || {
            let (stream, greeting) = unread_connection(relay.smtp_addr());
            let ok = greeting.starts_with("220 ");
            hog = Some(stream);
            ok
        },
    );
    let mut hog = hog.expect("hog");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut hog = hog.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut sent = 0usize;
            if hog
                .write_all(b"EHLO hog.test\r\nMAIL FROM:<hog@hog.test>\r\n")
                .is_err()
            {
                return sent;
            }
            let batch = b"RCPT TO:<x@example.test>\r\n".repeat(1000);
            while !stop.load(Ordering::Relaxed) {
                match hog.write(&batch) {
                    Ok(n) => sent += n,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
            sent
        })
    };

    // Someone else must get a session once the hog's replies stop being
    // taken for command_timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    let got_slot = loop {
        match SmtpClient::connect(relay.smtp_addr()) {
            Ok(c) if c.greeting.code == 220 => {
                c.quit();
                break true;
            }
            Ok(c) => last = c.greeting.to_string(),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop.store(true, Ordering::Relaxed);
    let _ = hog.shutdown(std::net::Shutdown::Both);
    let sent = writer.join().expect("writer thread");
    assert!(
        got_slot,
        "with max_sessions = 1 held by a client that never reads (it wrote {sent} bytes), \
         no other client got a session within 30 s; last answer: {last}\n{}",
        relay.logs()
    );
    let mut rest = Vec::new();
    let _ = hog.read_to_end(&mut rest);
}

#[test]
fn noop_in_a_loop_is_cut_off_at_the_junk_command_limit() {
    let sink = Sink::start();
    // A client that may not relay is still a client holding a slot.
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), "relay_from = [\"192.0.2.0/24\"]"));
    let mut c = relay.client();
    c.write_bytes(&b"NOOP\r\n".repeat(150)).expect("write");
    let mut codes = Vec::new();
    let last = loop {
        match c.read_reply() {
            Ok(r) if r.code == 250 => codes.push(r.code),
            Ok(r) => break Ok(r),
            Err(e) => break Err(e),
        }
    };
    let closed = c.read_reply().is_err();
    match last {
        Ok(r) => assert!(
            codes.len() == 100 && r.code == 421 && r.enhanced() == Some("4.7.0") && closed,
            "150 NOOPs: {} got 250, then {r} (closed afterwards: {closed}); \
             expected 100 × 250, then 421 4.7.0 and the connection closed\n{}",
            codes.len(),
            relay.logs()
        ),
        Err(e) => panic!(
            "150 NOOPs: {} got 250, then no 421 but {e}; expected 100 × 250 then 421 4.7.0\n{}",
            codes.len(),
            relay.logs()
        ),
    }
}

#[test]
fn one_address_cannot_take_every_session_slot() {
    let sink = Sink::start();
    // 127.0.0.1 is a stranger here; 127.0.0.2 may relay, and like
    // Postfix's $mynetworks it is exempt from the per-client cap.
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), "relay_from = [\"127.0.0.2/32\"]"));
    let connect = |ip: IpAddr| {
        SmtpClient::connect_from(ip, relay.smtp_addr())
            .unwrap_or_else(|e| panic!("connect from {ip}: {e}\n{}", relay.logs()))
    };

    // The default max_sessions_per_client is 20 (max_sessions 1000).
    let mut held: Vec<SmtpClient> = (0..20).map(|_| connect(LOCALHOST)).collect();
    for (i, c) in held.iter().enumerate() {
        assert_eq!(
            c.greeting.code, 220,
            "session {i} from 127.0.0.1: {}",
            c.greeting
        );
    }
    let over = connect(LOCALHOST);
    assert!(
        over.greeting.code == 421
            && over.greeting.enhanced() == Some("4.7.0")
            && over
                .greeting
                .text
                .contains("too many connections from your address"),
        "a 21st session from 127.0.0.1 got {}; expected 421 4.7.0 too many connections from your address\n{}",
        over.greeting,
        relay.logs()
    );
    let trusted: Vec<SmtpClient> = (0..25)
        .map(|_| connect(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))))
        .collect();
    for (i, c) in trusted.iter().enumerate() {
        assert_eq!(
            c.greeting.code,
            220,
            "session {i} of the relay client 127.0.0.2 (exempt from the cap): {}\n{}",
            c.greeting,
            relay.logs()
        );
    }
    for c in trusted {
        c.quit();
    }

    // A session that ends gives its address a slot back.
    held.pop().expect("a session").quit();
    relay.wait_until(
        "127.0.0.1 to get a session again after one of its 20 ended",
        Duration::from_secs(10),
        || {
            let c = connect(LOCALHOST);
            let ok = c.greeting.code == 220;
            c.quit();
            ok
        },
    );

    let samples = parse_metrics(&relay.scrape());
    let refused = metric_sum(
        &samples,
        "poolrelay_smtp_rejections_total",
        &[("reason", "too_many_sessions_per_client")],
    );
    assert!(
        refused.is_some_and(|n| n >= 1.0),
        "poolrelay_smtp_rejections_total{{reason=\"too_many_sessions_per_client\"}} = {refused:?}, expected >= 1"
    );
}

/// A free port on `[::]` that also takes IPv4 clients; panics saying what
/// the host lacks otherwise (this test must not pass without checking).
fn dual_stack_port() -> u16 {
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap_or_else(|e| {
        panic!(
            "this host has no IPv6: cannot listen on [::]:0 ({e}); the dual-stack test needs IPv6"
        )
    });
    let port = listener.local_addr().expect("local addr").port();
    if let Err(e) =
        TcpStream::connect_timeout(&SocketAddr::new(LOCALHOST, port), Duration::from_secs(5))
    {
        panic!(
            "[::]:{port} does not take IPv4 clients ({e}): IPv6 sockets are IPv6-only on this host \
             (net.ipv6.bindv6only = 1?); the dual-stack test needs dual-stack sockets"
        );
    }
    port
}

#[test]
fn an_ipv4_client_of_a_dual_stack_listener_is_matched_as_ipv4() {
    let sink = Sink::start();
    let port = dual_stack_port();
    let strict_port = dual_stack_port();
    // "dual" trusts 127.0.0.0/8; on "strict" and the main listener
    // 127.0.0.1 is a stranger, so the per-client cap counts it.
    let relay = Relay::start(|s| {
        let dual = format!(
            "[[listener]]\nname = \"dual\"\naddress = \"[::]:{port}\"\nrelay_from = [\"127.0.0.0/8\"]\n\n\
             [[listener]]\nname = \"strict\"\naddress = \"[::]:{strict_port}\"\nrelay_from = [\"127.0.0.2/32\"]\n\n"
        );
        s.single_upstream(sink.addr(), "relay_from = [\"127.0.0.2/32\"]")
            .replacen("[defaults]", &format!("{dual}[defaults]"), 1)
    });
    let dual = SocketAddr::new(LOCALHOST, port);
    let strict = SocketAddr::new(LOCALHOST, strict_port);
    relay.wait_until(
        "the [::] listeners to accept",
        Duration::from_secs(10),
        || accepts_tcp(dual) && accepts_tcp(strict),
    );

    let mut c = SmtpClient::connect_from(LOCALHOST, dual)
        .unwrap_or_else(|e| panic!("connect to {dual}: {e}"));
    c.ehlo();
    let r = c.cmd("MAIL FROM:<owner-dual@lists.test>");
    assert_eq!(r.code, 250, "MAIL: {r}");
    let r = c.cmd("RCPT TO:<member@example.test>");
    assert_eq!(
        r.code,
        250,
        "127.0.0.1 on [::]:{port} with relay_from = [\"127.0.0.0/8\"] got {r}; \
         an IPv4 client must be matched as IPv4, not as ::ffff:127.0.0.1\n{}",
        relay.logs()
    );

    // The same client address on either listener is the same client: with
    // 1 session on [::] and 19 on the IPv4 listener, a 21st is refused.
    let first = SmtpClient::connect_from(LOCALHOST, strict)
        .unwrap_or_else(|e| panic!("connect to {strict}: {e}"));
    assert_eq!(first.greeting.code, 220, "{}", first.greeting);
    let mut held = vec![first];
    relay.wait_until(
        "127.0.0.1 to hold 20 sessions over both listeners",
        Duration::from_secs(10),
        || {
            let client = SmtpClient::connect_from(LOCALHOST, relay.smtp_addr())
                .unwrap_or_else(|e| panic!("connect: {e}"));
            if client.greeting.code == 220 {
                held.push(client);
            }
            held.len() == 20
        },
    );
    for addr in [strict, relay.smtp_addr()] {
        let over = SmtpClient::connect_from(LOCALHOST, addr)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        assert_eq!(
            over.greeting.code,
            421,
            "127.0.0.1 holding 20 sessions (one as ::ffff:127.0.0.1 on [::]:{port}) got {} on {addr}; \
             max_sessions_per_client must count it as one address\n{}",
            over.greeting,
            relay.logs()
        );
    }
    c.quit();
}
