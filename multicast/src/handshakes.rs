//! Handshakes on a cast's TCP listeners (the sender's control listener, a
//! receiver's chain link), each on a thread of its own, so a peer that
//! connects and says nothing holds up no one. At most 16 per peer address
//! and 64 in all run at once; past either, the oldest is dropped (its
//! socket shut) to make room ([`pagecast_channel::gate`]).

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, mpsc};

use pagecast_channel::gate::{Gate, Limits};

use crate::session::CastError;

/// Handshakes per peer address under way at once.
const PER_PEER: usize = 16;
/// Handshakes under way at once in all.
const IN_ALL: usize = 64;

/// The handshakes of one listener, and what they came to.
pub(crate) struct Handshakes<T> {
    gate: Arc<Gate>,
    tx: mpsc::Sender<Result<T, CastError>>,
    rx: mpsc::Receiver<Result<T, CastError>>,
}

impl<T: Send + 'static> Handshakes<T> {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Handshakes {
            gate: Gate::new(Limits {
                handshakes_per_peer: PER_PEER,
                handshakes: IN_ALL,
                open_per_peer: usize::MAX,
                open: usize::MAX,
            }),
            tx,
            rx,
        }
    }

    /// Takes every connection `listener` (non-blocking) has queued and runs
    /// `shake` on each, on a thread of its own.
    pub(crate) fn accept<F>(&self, listener: &TcpListener, shake: &F) -> Result<(), CastError>
    where
        F: Fn(TcpStream) -> Result<T, CastError> + Clone + Send + 'static,
    {
        loop {
            let (stream, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(CastError::io("accepting a connection")(e)),
            };
            let _ = stream.set_nonblocking(false);
            let Ok(handle) = stream.try_clone() else {
                continue;
            };
            let evict = Box::new(move || {
                let _ = handle.shutdown(std::net::Shutdown::Both);
            });
            let (arrival, _) = self.gate.arrive(from.ip(), evict);
            let (tx, shake) = (self.tx.clone(), shake.clone());
            std::thread::spawn(move || {
                let r = shake(stream);
                drop(arrival);
                let _ = tx.send(r);
            });
        }
    }

    /// A handshake that ended, if one has.
    pub(crate) fn done(&self) -> Option<Result<T, CastError>> {
        self.rx.try_recv().ok()
    }
}
