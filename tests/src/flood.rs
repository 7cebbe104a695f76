//! A hostile peer that opens connections and never says anything: it
//! holds a server's slots through their handshake timeout, from many
//! loopback source addresses at once.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// Raises this process's open-file limit to its hard limit (the servers it
/// starts inherit it): a flood needs thousands of descriptors.
pub fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct
    // passed, which lives on this stack for the whole call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// One idle connection to `to` from loopback address `from`, its connect
/// under way (not waited for: a SYN the server's queue drops is sent again
/// by the kernel), or `None` if it could not be started.
fn idle(from: Ipv4Addr, to: SocketAddr) -> Option<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&SocketAddrV4::new(from, 0).into()).ok()?;
    s.set_nonblocking(true).ok()?;
    match s.connect(&to.into()) {
        Ok(()) => Some(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Some(s),
        Err(_) => None,
    }
}

/// Whether an idle connection is still open (the server has not closed it).
fn open(c: &Socket) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match c.recv(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        // Still connecting, or connected and silent.
        Err(e) => {
            e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOTCONN)
        }
    }
}

/// Keeps `per_address` idle connections to `to` open from each of
/// `addresses` loopback addresses (127.0.0.2 up), opening new ones (at
/// most [`REOPEN_PER_ROUND`] every 50 ms) as the server drops old ones,
/// until dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// New connections a flood opens each round after its first.
const REOPEN_PER_ROUND: usize = 500;
/// Connections opened back to back before a short pause.
const BURST: usize = 200;

impl Flood {
    /// Starts the flood and returns once its first round is open.
    pub fn start(to: SocketAddr, addresses: u8, per_address: usize) -> Flood {
        Self::start_all(&[to], addresses, per_address)
            .pop()
            .expect("one flood")
    }

    /// Floods each of `targets` at once, returning once every first round
    /// is open (one after another, the first's idle connections would
    /// time out before the last's were up).
    pub fn start_all(targets: &[SocketAddr], addresses: u8, per_address: usize) -> Vec<Flood> {
        let started: Vec<_> = targets
            .iter()
            .map(|&to| Self::spawn(to, addresses, per_address))
            .collect();
        started
            .into_iter()
            .map(|(f, ready)| {
                let (got, want) = ready
                    .recv_timeout(Duration::from_secs(60))
                    .expect("the flood's first round");
                // Short of descriptors, a flood would test nothing: fail.
                assert_eq!(
                    got, want,
                    "the flood opened {got} of {want} connections (raise the open-file hard limit)"
                );
                f
            })
            .collect()
    }

    fn spawn(
        to: SocketAddr,
        addresses: u8,
        per_address: usize,
    ) -> (Flood, std::sync::mpsc::Receiver<(usize, usize)>) {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let want = addresses as usize * per_address;
            let mut held: Vec<Socket> = Vec::new();
            let mut budget = want;
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                held.retain(open);
                let mut opened = 0;
                while held.len() < want && opened < budget {
                    let from = Ipv4Addr::new(127, 0, 0, 2 + (i % addresses as usize) as u8);
                    i += 1;
                    opened += 1;
                    if let Some(c) = idle(from, to) {
                        held.push(c);
                    }
                    // Paced so the server's accept queue never overflows
                    // (a dropped SYN costs a second's retransmission).
                    if opened % BURST == 0 {
                        std::thread::sleep(Duration::from_millis(25));
                    }
                }
                if budget == want {
                    // Ready once the first round's connections are up (a
                    // dropped SYN is sent again after a second or three)
                    // and the server has had a moment to take them.
                    let until = std::time::Instant::now() + Duration::from_secs(4);
                    while held.iter().any(|c| c.peer_addr().is_err())
                        && std::time::Instant::now() < until
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    std::thread::sleep(Duration::from_millis(300));
                    let _ = ready_tx.send((held.len(), want));
                    budget = REOPEN_PER_ROUND;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        (
            Flood {
                stop,
                thread: Some(thread),
            },
            ready_rx,
        )
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
