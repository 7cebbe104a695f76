//! Multicast sockets and batched datagram I/O.
//!
//! Senders bind to their interface address and set it as the outgoing
//! multicast interface, with loopback on (receivers on the same host must
//! hear). Receivers bind the group's port with `SO_REUSEADDR` (several
//! receivers on one host) and `IP_MULTICAST_ALL` off, so a socket gets only
//! the groups it joined, not every group joined on the port by anyone.
//! Datagrams go out with `sendmmsg` and come in with `recvmmsg`, up to
//! [`BATCH`] per system call.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use pagecast_proto::MAX_DATAGRAM_BYTES;
use socket2::{Domain, Protocol, Socket, Type};

/// Datagrams per batched system call.
pub const BATCH: usize = 32;

/// `UDP_SEGMENT` (linux/udp.h): the segment size of a GSO send.
const UDP_SEGMENT: i32 = 103;
/// Most bytes one GSO send carries (under the 64 KiB IP limit).
const GSO_MAX_BYTES: usize = 63 * 1024;
/// Most segments one GSO send carries.
const GSO_MAX_SEGMENTS: usize = 64;

/// Socket buffers asked for (the kernel may cap them).
const BUFFER: usize = 32 << 20;

fn set_int(sock: &Socket, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size; the
    // fd is owned by `sock` for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn big_buffers(sock: &Socket) {
    // Root may exceed net.core.{r,w}mem_max with the *FORCE options; others
    // get what the limits allow. Either way a failure here is not fatal.
    if set_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, BUFFER as i32).is_err() {
        let _ = sock.set_recv_buffer_size(BUFFER);
    }
    if set_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, BUFFER as i32).is_err() {
        let _ = sock.set_send_buffer_size(BUFFER);
    }
}

/// A socket that sends to multicast groups out of `iface`.
///
/// `IP_RECVERR` is on: without it Linux silently discards a datagram its
/// own queue (a full device queue, a `tc` shaper) drops; with it the send
/// fails with `ENOBUFS`, which [`send_batch`] turns into backpressure.
pub fn sender_socket(iface: Ipv4Addr, ttl: u32) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    set_int(&s, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(iface, 0)).into())?;
    s.set_multicast_if_v4(&iface)?;
    s.set_multicast_ttl_v4(ttl)?;
    s.set_multicast_loop_v4(true)?;
    big_buffers(&s);
    Ok(s.into())
}

/// A socket that receives what is sent to `groups` on `port`, joined on
/// `iface`; it can also send (NACKs) out of `iface`.
pub fn group_socket(
    port: u16,
    groups: &[Ipv4Addr],
    iface: Ipv4Addr,
    ttl: u32,
) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    set_int(&s, libc::IPPROTO_IP, libc::IP_MULTICAST_ALL, 0)?;
    for g in groups {
        s.join_multicast_v4(g, &iface)?;
    }
    s.set_multicast_if_v4(&iface)?;
    s.set_multicast_ttl_v4(ttl)?;
    s.set_multicast_loop_v4(true)?;
    big_buffers(&s);
    Ok(s.into())
}

/// The receive buffer a [`group_socket`] gets on this host, in bytes (what
/// the kernel grants, which counts its own per-datagram overhead).
pub fn receive_buffer() -> io::Result<usize> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    big_buffers(&s);
    s.recv_buffer_size()
}

/// Receive-buffer bytes one page costs in flight: the kernel charges each
/// datagram its payload rounded up to an allocation, with headers. Pages
/// travel `pack` to a datagram, or as fragments of `fragment_payload`.
pub fn page_cost(fragment_payload: usize, pack: usize) -> usize {
    let page = pagecast_pages::PAGE_SIZE;
    if fragment_payload >= page {
        let pack = pack.max(1);
        (pack * page + 512).next_power_of_two().div_ceil(pack)
    } else {
        let frags = page.div_ceil(fragment_payload.max(1));
        frags * (fragment_payload + 512).next_power_of_two()
    }
}

/// Leaves a group joined with [`group_socket`].
pub fn leave(sock: &UdpSocket, group: Ipv4Addr, iface: Ipv4Addr) -> io::Result<()> {
    sock.leave_multicast_v4(&group, &iface)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Sends every buffer of `bufs` to `to`, [`BATCH`] per system call.
pub fn send_batch(sock: &UdpSocket, bufs: &[&[u8]], to: SocketAddrV4) -> io::Result<()> {
    let mut busy = Backpressure::new(SEND_STALL);
    let mut addr = sockaddr(to);
    for chunk in bufs.chunks(BATCH) {
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid value of a plain C struct.
        let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < msgs.len() {
            // SAFETY: `msgs[done..]` are initialised headers whose iovecs
            // point into `bufs` and whose names point at `addr`, all alive
            // for the call; the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (msgs.len() - done) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // A full socket buffer, or the local queue dropped the
                    // datagram: wait for it to drain and send it again
                    // (for a while: see `Backpressure`).
                    Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                        busy.wait()?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            done += n as usize;
            busy.progress();
        }
    }
    Ok(())
}

/// Sends equal-sized datagrams to `to` with UDP generic segmentation
/// offload: one `sendmsg` and one packet through the stack for up to 63 KiB
/// of datagrams, split into datagrams as late as possible (by the device,
/// or at the receiving socket). Where the kernel refuses GSO, or the sizes
/// differ, falls back to [`send_batch`]. `gso` records whether GSO works on
/// this socket; it starts true and is cleared on the first refusal.
pub fn send_segments(
    sock: &UdpSocket,
    bufs: &[&[u8]],
    to: SocketAddrV4,
    gso: &mut bool,
) -> io::Result<()> {
    let Some(first) = bufs.first() else {
        return Ok(());
    };
    let size = first.len();
    if !*gso || size == 0 || size * 2 > GSO_MAX_BYTES || bufs.iter().any(|b| b.len() != size) {
        return send_batch(sock, bufs, to);
    }
    let mut busy = Backpressure::new(SEND_STALL);
    let per = (GSO_MAX_BYTES / size).min(GSO_MAX_SEGMENTS);
    let mut addr = sockaddr(to);
    for (i, chunk) in bufs.chunks(per).enumerate() {
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // One cmsg carrying a u16; CMSG_SPACE(2) is 16 on 64-bit Linux.
        let mut control = [0u64; 4];
        // SAFETY: an all-zero msghdr is a valid value of a plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len() as _;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
        // SAFETY: `msg` has a control buffer of CMSG_SPACE(2) <= 32 bytes,
        // so CMSG_FIRSTHDR is non-null and its data has room for a u16.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
        }
        loop {
            // SAFETY: `msg` points at live iovecs (into `bufs`), address and
            // control buffers for the duration of the call; the kernel only
            // reads them.
            let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
            if n >= 0 {
                busy.progress();
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => busy.wait()?,
                // No GSO here (old kernel, device without it): send this
                // and every later chunk datagram by datagram.
                Some(libc::EIO)
                | Some(libc::EINVAL)
                | Some(libc::ENOPROTOOPT)
                | Some(libc::EOPNOTSUPP) => {
                    *gso = false;
                    return send_batch(sock, &bufs[i * per..], to);
                }
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

/// Buffers for [`recv_batch`].
pub struct RecvBatch {
    bufs: Vec<Box<[u8; MAX_DATAGRAM_BYTES]>>,
    lens: Vec<usize>,
    truncated: Vec<bool>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| Box::new([0u8; MAX_DATAGRAM_BYTES]))
                .collect(),
            lens: vec![0; BATCH],
            truncated: vec![false; BATCH],
        }
    }
}

impl RecvBatch {
    /// Datagram `i` of the last batch, or `None` if it was truncated (larger
    /// than any valid datagram).
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        (!self.truncated[i]).then(|| &self.bufs[i][..self.lens[i]])
    }

    /// As [`RecvBatch::get`], writable (datagrams are decrypted in place).
    pub fn get_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        (!self.truncated[i]).then(|| &mut self.bufs[i][..self.lens[i]])
    }
}

/// Receives up to [`BATCH`] datagrams: waits (up to the socket's read
/// timeout) for the first, then takes what is already queued. Returns how
/// many arrived; 0 on timeout.
pub fn recv_batch(sock: &UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
    let mut iovs: Vec<libc::iovec> = b
        .bufs
        .iter_mut()
        .map(|buf| libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM_BYTES,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is a valid value of a plain C struct.
            let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    loop {
        // SAFETY: every header's iovec points into a live buffer of
        // MAX_DATAGRAM_BYTES owned by `b`; the kernel writes at most that.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (i, m) in msgs.iter().take(n).enumerate() {
            b.lens[i] = m.msg_len as usize;
            b.truncated[i] = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        return Ok(n);
    }
}

/// How long a send may find the local queue full without a datagram
/// leaving before it fails.
const SEND_STALL: Duration = Duration::from_secs(5);

/// Retries of a send the local queue refuses (`EAGAIN`, `ENOBUFS`): a
/// short sleep each, failing once no datagram has left for `limit` (before,
/// the retries went on forever).
struct Backpressure {
    limit: Duration,
    since: Option<std::time::Instant>,
}

impl Backpressure {
    /// Retries failing after `limit` without progress.
    fn new(limit: Duration) -> Self {
        Backpressure { limit, since: None }
    }

    /// A datagram left: the clock starts again.
    fn progress(&mut self) {
        self.since = None;
    }

    /// The queue was full: waits a little, or fails if it has been full
    /// for the whole limit.
    fn wait(&mut self) -> io::Result<()> {
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= self.limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the local send queue stayed full for {:?} (no datagram left)",
                    self.limit
                ),
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
        Ok(())
    }
}

/// The MTU of the interface that has address `addr` (65536 for loopback).
pub fn interface_mtu(addr: Ipv4Addr) -> io::Result<usize> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = None;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getifaddrs returned, until null.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points at a sockaddr.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: family AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
                    // SAFETY: ifa_name is a NUL-terminated C string.
                    name = Some(
                        unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                            .to_string_lossy()
                            .into_owned(),
                    );
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `ifap` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(ifap) };
    let name = name.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface has address {addr}"),
        )
    })?;
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))?;
    mtu.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("odd MTU for {name}: {mtu:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_queue_full_for_the_whole_limit_fails_and_progress_restarts_the_clock() {
        let mut b = Backpressure::new(Duration::from_millis(30));
        let t0 = std::time::Instant::now();
        while b.wait().is_ok() {
            assert!(t0.elapsed() < Duration::from_secs(5), "never failed");
        }
        assert!(t0.elapsed() >= Duration::from_millis(30));
        let e = b.wait().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("stayed full"), "{e}");
        b.progress();
        b.wait().expect("progress restarts the clock");
    }

    #[test]
    fn loopback_multicast_batches_arrive_only_at_joined_sockets() {
        use pagecast_testkit::{Need, needs};
        if !needs(
            "loopback_multicast_batches_arrive_only_at_joined_sockets",
            &[Need::LoopbackMulticast],
        ) {
            return;
        }
        let lo = Ipv4Addr::LOCALHOST;
        let port = 40_000 + (std::process::id() % 10_000) as u16;
        let (g1, g2) = (Ipv4Addr::new(239, 77, 1, 1), Ipv4Addr::new(239, 77, 1, 2));
        let r1 = group_socket(port, &[g1], lo, 1).unwrap();
        let r2 = group_socket(port, &[g2], lo, 1).unwrap();
        r1.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        r2.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let s = sender_socket(lo, 1).unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        send_batch(&s, &refs, SocketAddrV4::new(g1, port)).unwrap();
        let mut b = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 40 {
            let n = recv_batch(&r1, &mut b).unwrap();
            assert!(n > 0, "timed out after {}", got.len());
            for i in 0..n {
                got.push(b.get(i).unwrap()[0]);
            }
        }
        assert_eq!(got, (0..40u8).collect::<Vec<_>>());
        assert_eq!(recv_batch(&r2, &mut b).unwrap(), 0, "r2 did not join g1");
        assert!(interface_mtu(lo).unwrap() >= 1500);
    }
}
