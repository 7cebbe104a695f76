//! Admission of connections to a server: a connection whose handshake has
//! not finished holds no slot another client needs.
//!
//! A connection arrives ([`Gate::arrive`]) into a small pool of handshakes
//! under way. When that pool is full (for the peer's address, or in all),
//! the oldest handshake of the address (or of all) is dropped to make room:
//! a real client's handshake takes milliseconds, so the ones dropped are
//! those of peers that connected and said nothing. Once authenticated, a
//! connection is admitted ([`Arrival::admit`]) into the open connections,
//! bounded per address and in all as before. So idle connections from a
//! few addresses can no longer hold every slot of a server through the
//! handshake timeout.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections a listening socket queues before its server accepts them.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Deepens `listener`'s accept queue to [`LISTEN_BACKLOG`] (the standard
/// library listens with 128): a burst of connections past the queue loses
/// its SYNs, and each such client waits a second's retransmission or more
/// (the kernel caps the depth at `net.core.somaxconn`).
pub fn deepen_backlog<S: std::os::fd::AsFd>(listener: &S) -> std::io::Result<()> {
    socket2::SockRef::from(listener).listen(LISTEN_BACKLOG)
}

/// How many connections a [`Gate`] lets in.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Handshakes under way from one address.
    pub handshakes_per_peer: usize,
    /// Handshakes under way in all.
    pub handshakes: usize,
    /// Authenticated connections from one address.
    pub open_per_peer: usize,
    /// Authenticated connections in all.
    pub open: usize,
}

/// What drops a handshake under way (closes its socket, or wakes its task).
pub type Evict = Box<dyn FnOnce() + Send>;

struct Shaking {
    ip: IpAddr,
    evict: Evict,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// Handshakes under way, oldest first.
    shaking: BTreeMap<u64, Shaking>,
    shaking_per: HashMap<IpAddr, usize>,
    open: usize,
    open_per: HashMap<IpAddr, usize>,
}

/// A server's admission of connections.
pub struct Gate {
    limits: Limits,
    inner: Mutex<Inner>,
}

/// A connection whose handshake is under way; dropped, it lets its slot go.
pub struct Arrival {
    gate: Arc<Gate>,
    id: u64,
    ip: IpAddr,
}

/// An authenticated connection's slot, given back when dropped.
pub struct Admitted {
    gate: Arc<Gate>,
    ip: IpAddr,
}

/// Why an authenticated connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its handshake was dropped to make room for a newer one.
    #[error("its handshake was dropped to make room for another")]
    Evicted,
    /// Its address (or the server) holds as many connections as it may.
    #[error("too many open connections")]
    Full,
}

fn dec(m: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = m.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            m.remove(&ip);
        }
    }
}

impl Gate {
    /// A gate letting in what `limits` says.
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection from `ip` begins its handshake; `evict` drops it if it
    /// must make room later. Returns its arrival and how many older
    /// handshakes were dropped for it (their `evict` already called).
    pub fn arrive(self: &Arc<Self>, ip: IpAddr, evict: Evict) -> (Arrival, usize) {
        let mut dropped = Vec::new();
        let id = {
            let mut g = self.lock();
            if g.shaking_per.get(&ip).copied().unwrap_or(0)
                >= self.limits.handshakes_per_peer.max(1)
            {
                let oldest = g
                    .shaking
                    .iter()
                    .find(|(_, s)| s.ip == ip)
                    .map(|(id, _)| *id);
                if let Some(id) = oldest {
                    dropped.push(Self::remove(&mut g, id));
                }
            }
            if g.shaking.len() >= self.limits.handshakes.max(1) {
                let oldest = g.shaking.keys().next().copied();
                if let Some(id) = oldest {
                    dropped.push(Self::remove(&mut g, id));
                }
            }
            let id = g.next;
            g.next += 1;
            g.shaking.insert(id, Shaking { ip, evict });
            *g.shaking_per.entry(ip).or_default() += 1;
            id
        };
        let n = dropped.len();
        // Outside the lock: an eviction may close a socket.
        for d in dropped.into_iter().flatten() {
            (d.evict)();
        }
        (
            Arrival {
                gate: self.clone(),
                id,
                ip,
            },
            n,
        )
    }

    fn remove(g: &mut Inner, id: u64) -> Option<Shaking> {
        let s = g.shaking.remove(&id)?;
        dec(&mut g.shaking_per, s.ip);
        Some(s)
    }

    /// Handshakes under way and authenticated connections, now.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.shaking.len(), g.open)
    }
}

impl Arrival {
    /// The handshake finished: the connection takes an open slot, or is
    /// refused (its handshake was dropped meanwhile, or its address or the
    /// server is full).
    pub fn admit(self) -> Result<Admitted, Refused> {
        let gate = self.gate.clone();
        let ip = self.ip;
        let mut g = gate.lock();
        if Gate::remove(&mut g, self.id).is_none() {
            return Err(Refused::Evicted);
        }
        let here = g.open_per.get(&ip).copied().unwrap_or(0);
        if here >= gate.limits.open_per_peer || g.open >= gate.limits.open {
            return Err(Refused::Full);
        }
        g.open += 1;
        *g.open_per.entry(ip).or_default() += 1;
        drop(g);
        Ok(Admitted { gate, ip })
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        let _ = Gate::remove(&mut g, self.id);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.open -= 1;
        dec(&mut g.open_per, self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn gate() -> Arc<Gate> {
        Gate::new(Limits {
            handshakes_per_peer: 2,
            handshakes: 3,
            open_per_peer: 2,
            open: 3,
        })
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn counter(c: &Arc<AtomicUsize>) -> Evict {
        let c = c.clone();
        Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn idle_handshakes_make_room_for_new_ones_oldest_first() {
        let g = gate();
        let silent = Arc::new(AtomicUsize::new(0));
        // One address fills its share: its third drops its first.
        let (a1, _) = g.arrive(ip(2), counter(&silent));
        let (_a2, _) = g.arrive(ip(2), counter(&silent));
        let (_a3, n) = g.arrive(ip(2), counter(&silent));
        assert_eq!((n, silent.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(a1.admit().err(), Some(Refused::Evicted));
        // Another address still gets in: the pool in all is full, so the
        // oldest of all goes.
        let (_b1, _) = g.arrive(ip(3), counter(&silent));
        let real = Arc::new(AtomicUsize::new(0));
        let (c, n) = g.arrive(ip(4), counter(&real));
        assert_eq!(n, 1);
        assert_eq!(silent.load(Ordering::SeqCst), 2);
        let open = c.admit().expect("a real client is admitted");
        assert_eq!(real.load(Ordering::SeqCst), 0, "never dropped");
        assert_eq!(g.counts(), (2, 1));
        drop(open);
        assert_eq!(g.counts().1, 0);
    }

    #[test]
    fn authenticated_connections_keep_their_bounds() {
        let g = gate();
        let none = || -> Evict { Box::new(|| {}) };
        let a = g.arrive(ip(2), none()).0.admit().unwrap();
        let _b = g.arrive(ip(2), none()).0.admit().unwrap();
        assert_eq!(g.arrive(ip(2), none()).0.admit().err(), Some(Refused::Full));
        let _c = g.arrive(ip(3), none()).0.admit().unwrap();
        assert_eq!(g.arrive(ip(4), none()).0.admit().err(), Some(Refused::Full));
        drop(a);
        g.arrive(ip(4), none()).0.admit().unwrap();
        // A handshake that ends without admission lets its slot go.
        drop(g.arrive(ip(5), none()).0);
        assert_eq!(g.counts().0, 0);
    }
}
