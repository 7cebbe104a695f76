//! `pagecast-capture-child`: the half of the capture test
//! (`tests/tests/e2e/capture.rs`) that runs in a process of its own, since
//! the multicast layer reads its cleartext switch
//! (`PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS`, debug builds only) once per
//! process. It captures `lo` while a cast sends the marked pages to one
//! receiver on port `CAPTURE_PORT`, then prints what the capture saw:
//! `CAPTURE received=N bytes=N marked=N`. Needs root (a packet socket).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_multicast::*;
use pagecast_pages::{Page, PageHash};
use pagecast_tests::capture::{Capture, MARKER, PAGES, page};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

struct Marked;

impl PageSource for Marked {
    fn pages(&self) -> u32 {
        PAGES
    }
    fn entry(&self, i: u32) -> PageEntry {
        PageEntry {
            key: u64::from(i),
            hash: PageHash::of_page(&page(i)),
        }
    }
    fn read(&self, i: u32, out: &mut Page) -> std::io::Result<()> {
        out.copy_from_slice(&page(i)[..]);
        Ok(())
    }
    fn frames(&self) -> u64 {
        u64::from(PAGES)
    }
}

#[derive(Default)]
struct Sink(usize);

impl PageSink for Sink {
    fn begin(&mut self, _frames: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn get(&mut self, _key: u64, _out: &mut Page) -> std::io::Result<()> {
        Err(std::io::Error::other("not kept"))
    }
    fn put(&mut self, _e: &PageEntry, data: &Page) -> std::io::Result<()> {
        assert!(data.windows(MARKER.len()).any(|w| w == MARKER));
        self.0 += 1;
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn abort(&mut self) {}
}

fn main() {
    let port: u16 = std::env::var("CAPTURE_PORT")
        .expect("CAPTURE_PORT: run by the capture test")
        .parse()
        .expect("CAPTURE_PORT: a port");
    let control = SocketAddr::from((LO, port));
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 72, 0, 1), port + 2);
    let cap = Capture::open();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut datagrams, mut marked) = (0u64, 0u64); // bytes, occurrences
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = cap.next(&mut buf) else {
                    continue;
                };
                let f = &buf[..n];
                // Ethernet (14 bytes on lo), IPv4, UDP to the group's port.
                if n < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
                    continue;
                }
                let ihl = usize::from(f[14] & 0x0f) * 4;
                let dport = u16::from_be_bytes([f[14 + ihl + 2], f[14 + ihl + 3]]);
                if dport != group.port() {
                    continue;
                }
                // Bytes, not datagrams: with UDP segmentation offload a
                // frame on lo carries many datagrams.
                datagrams += (n - 14 - ihl - 8) as u64;
                marked += f.windows(MARKER.len()).filter(|w| *w == MARKER).count() as u64;
            }
            (datagrams, marked)
        })
    };
    let tls = Authority::generate()
        .and_then(|ca| ca.issue("host", Role::Host, 1))
        .expect("a certificate");
    let received = std::thread::scope(|s| {
        let mut cfg = SenderConfig::new(control, LO, 1);
        cfg.transport = TransportChoice::Multicast;
        let tls = &tls;
        let sender = s.spawn(move || send(&cfg, Groups::Single(group), &Marked, tls, &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        let mut sink = Sink::default();
        let r = receive(
            &ReceiverConfig::new(control, LO, "r0"),
            tls,
            &mut sink,
            &|_, _| {},
        );
        sender.join().unwrap().expect("the cast");
        r.expect("the receiver");
        sink.0
    });
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (datagrams, marked) = seen.join().unwrap();
    println!("CAPTURE received={received} bytes={datagrams} marked={marked}");
}
