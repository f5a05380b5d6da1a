//! A TCP listener that accepts every connection and closes it at once,
//! recording when each one came: a host that is "up" at the TCP level but
//! never greets, so every connection the relay opens to it fails. For
//! counting how often the relay probes a down host.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ports::free_addr;

/// The listener; stops (and its thread is joined) on drop.
pub struct AcceptCounter {
    addr: SocketAddr,
    accepts: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptCounter {
    /// Listens on a fresh loopback address.
    pub fn start() -> AcceptCounter {
        let addr = free_addr();
        let listener = TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("accept counter: cannot bind {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("accept counter: set_nonblocking: {e}"));
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepts.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("accept-counter-{addr}"))
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            a.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Instant::now());
                            drop(stream);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
            .unwrap_or_else(|e| panic!("cannot spawn the accept counter thread: {e}"));
        AcceptCounter {
            addr,
            accepts,
            stop,
            thread: Some(thread),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// When each connection was accepted, in order.
    pub fn accepts(&self) -> Vec<Instant> {
        self.accepts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for AcceptCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
