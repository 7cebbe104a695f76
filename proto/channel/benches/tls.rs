//! What mutual TLS costs a bulk stream: 1 GiB of 256 KiB frames (a
//! migration's 64-page frames) over loopback, through a TLS [`Channel`]
//! and through the same framing on plain TCP, paced to 1 Gbit/s (a
//! migration's usual cap) and unpaced. Prints throughput, the ratio
//! TLS/plain, and the sender's and receiver's CPU seconds per GB.
//!
//! `cargo bench -p pagecast-channel --bench tls`
//! (`PAGECAST_BENCH_TLS_MIB` sets the volume, default 1024).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pagecast_channel::ca::Authority;
use pagecast_channel::{Channel, FrameDecoder, Role, frame};
use pagecast_proto::v1;

const FRAME: usize = 64 * 4096;

fn thread_cpu() -> f64 {
    // SAFETY: getrusage only writes the struct it is given, a zeroed and
    // properly aligned `rusage` owned by this frame.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

struct Run {
    seconds: f64,
    send_cpu: f64,
    recv_cpu: f64,
}

/// Sends `frames` frames, pacing to `bps` if given.
fn run(tls: bool, frames: usize, bps: Option<f64>) -> Run {
    let ca = Authority::generate().unwrap();
    let (srv, cli) = (
        ca.issue("dst", Role::Host, 1).unwrap(),
        ca.issue("src", Role::Host, 1).unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let c0 = thread_cpu();
        if tls {
            let mut ch = Channel::server(s, &srv).unwrap();
            for _ in 0..frames {
                let m: v1::RaftChunk = ch.recv("chunk").unwrap();
                assert_eq!(m.data.len(), FRAME);
            }
        } else {
            let mut r = std::io::BufReader::with_capacity(256 << 10, s);
            for _ in 0..frames {
                let b = FrameDecoder.next(&mut r, "plain").unwrap();
                assert!(b.len() > FRAME);
            }
        }
        thread_cpu() - c0
    });
    let msg = v1::RaftChunk {
        shard: 1,
        data: vec![0x5au8; FRAME].into(),
        more: true,
    };
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let t0 = Instant::now();
    let c0 = thread_cpu();
    let pace = |i: usize| {
        if let Some(bps) = bps {
            let due = Duration::from_secs_f64((i * FRAME) as f64 * 8.0 / bps);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    };
    if tls {
        let mut ch = Channel::client(s, &cli).unwrap();
        for i in 0..frames {
            pace(i);
            ch.send(&msg).unwrap();
        }
    } else {
        let mut s = s;
        for i in 0..frames {
            pace(i);
            s.write_all(&frame(&msg)).unwrap();
        }
    }
    let send_cpu = thread_cpu() - c0;
    let recv_cpu = receiver.join().unwrap();
    Run {
        seconds: t0.elapsed().as_secs_f64(),
        send_cpu,
        recv_cpu,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: usize = std::env::var("PAGECAST_BENCH_TLS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let frames = (mib << 20) / FRAME;
    let gb = (frames * FRAME) as f64 / 1e9;
    println!("{mib} MiB in {FRAME}-byte frames over loopback, one stream");
    for (label, bps) in [("paced to 1 Gbit/s", Some(1e9)), ("unpaced", None)] {
        // Warm-up, then the measured runs, alternating.
        let _ = run(true, frames / 8, bps);
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        for _ in 0..3 {
            plain.push(run(false, frames, bps));
            tls.push(run(true, frames, bps));
        }
        let median = |v: &[Run], f: fn(&Run) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let (tp, tt) = (median(&plain, |r| r.seconds), median(&tls, |r| r.seconds));
        println!(
            "{label}: plain {:.2} Gbit/s, TLS {:.2} Gbit/s: TLS/plain throughput {:.3}x",
            gb * 8.0 / tp,
            gb * 8.0 / tt,
            tp / tt
        );
        println!(
            "  sender CPU per GB: plain {:.3} s, TLS {:.3} s; receiver CPU per GB: plain {:.3} s, TLS {:.3} s",
            median(&plain, |r| r.send_cpu) / gb,
            median(&tls, |r| r.send_cpu) / gb,
            median(&plain, |r| r.recv_cpu) / gb,
            median(&tls, |r| r.recv_cpu) / gb,
        );
    }
}
