//! A tiny authoritative name server on UDP loopback, for `[server]
//! dns_servers`: it knows one mail domain whose MX host points at a test
//! upstream, and answers NXDOMAIN for every other name.
//!
//! One thread answers one query at a time; each read waits at most
//! [`POLL`], so dropping the server stops it within that time. Queries are
//! recorded (at most [`MAX_RECORDED`]) so a test can see what the relay
//! asked.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::ports::process_ip;

/// How long one read waits before the thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);
/// Most queries kept for [`DnsServer::queries`].
pub const MAX_RECORDED: usize = 1000;
/// Time to live of every answer, in seconds.
const TTL: u32 = 60;

/// The zone: `domain` has one MX record (preference 10) naming `mx_host`,
/// and `mx_host` has an A or AAAA record for `ip`.
#[derive(Debug, Clone)]
pub struct MxZone {
    /// The mail domain, e.g. `example.test`.
    pub domain: String,
    /// Its MX host, e.g. `mx.example.test`.
    pub mx_host: String,
    /// The MX host's address.
    pub ip: IpAddr,
}

/// One query the server received: the name (lower case, no final dot)
/// and the record type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Queried name.
    pub name: String,
    /// Queried type, e.g. `MX`, `A`.
    pub kind: String,
}

struct State {
    zone: MxZone,
    queries: Mutex<Vec<Query>>,
    stop: AtomicBool,
}

/// A running name server; stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP on this process's loopback address (a port the kernel
    /// picks, held from the start) and answers for `zone`.
    pub fn start(zone: MxZone) -> DnsServer {
        let socket = UdpSocket::bind((process_ip(), 0))
            .unwrap_or_else(|e| panic!("test name server: cannot bind UDP: {e}"));
        socket
            .set_read_timeout(Some(POLL))
            .unwrap_or_else(|e| panic!("test name server: read timeout: {e}"));
        let addr = socket
            .local_addr()
            .unwrap_or_else(|e| panic!("test name server: local address: {e}"));
        let state = Arc::new(State {
            zone,
            queries: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dns-{addr}"))
            .spawn(move || serve(&st, &socket))
            .unwrap_or_else(|e| panic!("cannot spawn the test name server thread: {e}"));
        DnsServer {
            addr,
            state,
            thread: Some(thread),
        }
    }

    /// Where it answers (UDP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The queries received so far, oldest first.
    pub fn queries(&self) -> Vec<Query> {
        lock(&self.state.queries).clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(state: &State, socket: &UdpSocket) {
    // 512 bytes is the classic UDP limit; a longer query is not ours.
    let mut buf = [0u8; 512];
    while !state.stop.load(Ordering::SeqCst) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            // Timeouts (WouldBlock/TimedOut) and transient errors: look at
            // the stop flag again.
            Err(_) => continue,
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let reply = answer(state, &query);
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}

fn normalize(name: &Name) -> String {
    name.to_utf8().trim_end_matches('.').to_ascii_lowercase()
}

fn name(text: &str) -> Name {
    Name::from_ascii(format!("{text}."))
        .unwrap_or_else(|e| panic!("test name server: bad name {text:?}: {e}"))
}

/// The response to `query`: the zone's records for its one question,
/// NOERROR with no answer for a known name without records of the type,
/// NXDOMAIN for any other name.
fn answer(state: &State, query: &Message) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .add_queries(query.queries().to_vec());
    let Some(q) = query.queries().first() else {
        reply.set_response_code(ResponseCode::FormErr);
        return reply;
    };
    let asked = normalize(q.name());
    {
        let mut queries = lock(&state.queries);
        if queries.len() < MAX_RECORDED {
            queries.push(Query {
                name: asked.clone(),
                kind: q.query_type().to_string(),
            });
        }
    }
    let zone = &state.zone;
    let rdata = if asked == zone.domain.to_ascii_lowercase() {
        match q.query_type() {
            RecordType::MX => Some(RData::MX(MX::new(10, name(&zone.mx_host)))),
            _ => None,
        }
    } else if asked == zone.mx_host.to_ascii_lowercase() {
        match (q.query_type(), zone.ip) {
            (RecordType::A, IpAddr::V4(ip)) => Some(RData::A(A::from(ip))),
            (RecordType::AAAA, IpAddr::V6(ip)) => Some(RData::AAAA(AAAA::from(ip))),
            _ => None,
        }
    } else {
        reply.set_response_code(ResponseCode::NXDomain);
        return reply;
    };
    reply.set_response_code(ResponseCode::NoError);
    if let Some(rdata) = rdata {
        reply.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
    }
    reply
}
