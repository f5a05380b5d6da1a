//! Listening addresses for relays, sinks and upstreams.
//!
//! Binding port 0, reading the port and closing the socket again leaves a
//! window in which a test running in parallel (nextest runs each test in its
//! own process) can take the same port, and the relay then fails to start or,
//! worse, a sink receives another test's mail. Holding the socket until the
//! child binds would need the children to inherit it, which `poolrelay` does
//! not support.
//!
//! So every test process gets a loopback address of its own instead: all of
//! 127.0.0.0/8 is local on Linux, and the address is derived from the PID,
//! which no two live processes share (PIDs stay below 2^22, `pid_max`'s
//! ceiling, and fit in the 22 bits used here). Within the process, ports come
//! from a counter, so threads of one process (plain `cargo test`) never get
//! the same one either. The ports stay below Linux's ephemeral range
//! (32768 and up), so no outgoing connection's local port can occupy them,
//! and a port still bound by a leftover of an earlier process with the same
//! PID is skipped by a bind check. Connections to these addresses still come
//! from 127.0.0.1 (the `src` of the kernel's loopback route), so
//! `relay_from = ["127.0.0.1/32"]` keeps working.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// First port handed out in every process.
const FIRST_PORT: u16 = 20_000;
/// Ports from here on belong to Linux's default ephemeral range.
const EPHEMERAL_START: u16 = 32_768;

/// This process's own loopback address: 127.A.B.C with A in 64..=127 and
/// A.B.C carrying the 22 low bits of the PID. Never 127.0.0.x, where other
/// tests bind client addresses such as 127.0.0.2.
pub fn process_ip() -> Ipv4Addr {
    let pid = std::process::id() & 0x3f_ffff;
    Ipv4Addr::new(127, 64 | (pid >> 16) as u8, (pid >> 8) as u8, pid as u8)
}

/// A loopback address no other test process can be handed: this process's
/// own IP ([`process_ip`]) and the next port of its counter that is free.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU16 = AtomicU16::new(FIRST_PORT);
    let ip = IpAddr::V4(process_ip());
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        if port >= EPHEMERAL_START {
            panic!("this test process used up its ports {FIRST_PORT}..{EPHEMERAL_START} on {ip}");
        }
        let addr = SocketAddr::new(ip, port);
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// True when something accepts TCP connections on `addr` right now.
pub fn accepts_tcp(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_loopback_distinct_and_bindable() {
        let a = free_addr();
        let b = free_addr();
        assert_ne!(a, b);
        assert!(a.ip().is_loopback() && a.port() < EPHEMERAL_START);
        assert_eq!(a.ip(), IpAddr::V4(process_ip()));
        TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"));
    }
}
