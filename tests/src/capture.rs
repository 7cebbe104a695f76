//! Packet capture on the loopback interface for tests that check what an
//! eavesdropper sees: a raw `AF_PACKET` socket on `lo` that receives every
//! frame sent there. Needs root with `CAP_NET_RAW` and `CAP_NET_ADMIN`
//! (`pagecast_testkit::Need::PacketCapture`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A raw packet socket on `lo` that sees every frame sent on it.
pub struct Capture(libc::c_int);

impl Capture {
    /// Opens the socket, bound to `lo`, with a 100 ms receive timeout and
    /// a 64 MiB buffer (so the capture drops nothing).
    pub fn open() -> Capture {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned by the result.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a zeroed sockaddr_ll filled for `lo`, passed with its size.
        unsafe {
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
            let r = libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind to lo: {}", std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        set_option(fd, libc::SO_RCVTIMEO, &tv);
        // A large buffer: the capture must not drop frames.
        let size: libc::c_int = 64 << 20;
        set_option(fd, libc::SO_RCVBUFFORCE, &size);
        Capture(fd)
    }

    /// One frame, or `None` after the timeout.
    pub fn next(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }
}

/// Sets a `SOL_SOCKET` option of `fd` to `value`.
fn set_option<T>(fd: libc::c_int, option: libc::c_int, value: &T) {
    // SAFETY: `value` is a live `T` and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {option}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe {
            libc::close(self.0);
        }
    }
}

/// Captures TCP segments to or from `port` on `lo` while `talk` runs;
/// returns the payload bytes seen and how often `marker` occurs in them.
pub fn capture_tcp(port: u16, marker: &[u8], talk: impl FnOnce()) -> (u64, u64) {
    let marker = marker.to_vec();
    let cap = Capture::open();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut bytes, mut marked) = (0u64, 0u64);
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = cap.next(&mut buf) else {
                    continue;
                };
                let f = &buf[..n];
                // Ethernet (14 bytes on lo), IPv4, TCP.
                if n < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
                    continue;
                }
                let ihl = usize::from(f[14] & 0x0f) * 4;
                let t = &f[14 + ihl..];
                let (sport, dport) = (
                    u16::from_be_bytes([t[0], t[1]]),
                    u16::from_be_bytes([t[2], t[3]]),
                );
                if sport != port && dport != port {
                    continue;
                }
                let doff = usize::from(t[12] >> 4) * 4;
                bytes += t.len().saturating_sub(doff) as u64;
                marked += f.windows(marker.len()).filter(|w| *w == marker).count() as u64;
            }
            (bytes, marked)
        })
    };
    talk();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    seen.join().unwrap()
}

/// The string every marked page holds, many times over.
pub const MARKER: &[u8] = b"PAGECAST-CAPTURE-MARKER";
/// Marked pages a capture test sends.
pub const PAGES: u32 = 400;

/// Marked page `i`: the marker over and over, each copy with a number so
/// that every page is distinct.
pub fn page(i: u32) -> Box<pagecast_pages::Page> {
    let mut p = Box::new([0u8; pagecast_pages::PAGE_SIZE]);
    for (k, c) in p.chunks_mut(MARKER.len() + 4).enumerate() {
        let n = c.len().min(MARKER.len());
        c[..n].copy_from_slice(&MARKER[..n]);
        if c.len() >= MARKER.len() + 4 {
            c[MARKER.len()..].copy_from_slice(&(i ^ k as u32).to_le_bytes());
        }
    }
    p
}
