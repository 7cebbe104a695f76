//! `pagecast cast send | recv`: an operator's tool for checking a network
//! and the one-to-many transport.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use pagecast_cli::castio::{ImageSink, ImageSource};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_multicast::{
    Groups, PeerStatus, ReceiverConfig, RecvReport, SendReport, SenderConfig, TransportChoice,
    receive, send,
};
use pagecast_pages::units::{format_bytes, parse_bits_per_second};
use serde::Serialize;

use super::progress::pages_bar;
use super::{TlsArg, load_tls};

/// Send an image's pages to many receivers at once, or receive them.
///
/// The sender waits for N receivers on its control address, checks each
/// one's host certificate (mutual TLS), hands out a per-session key, probes
/// multicast, then sends every non-zero page once: UDP multicast with NACK
/// repair (or, where multicast does not get through, a TCP chain through
/// the receivers). Each receiver checks every page against its BLAKE3 hash
/// and writes the rebuilt image.
///
/// Example, three shells on one host (loopback multicast works):
///
///   pagecast ca init --dir ca
///   for h in a b c; do pagecast ca issue --dir ca --name $h --role host --out $h; done
///
///   pagecast cast send --group 239.1.1.1:7000 --iface 127.0.0.1 --control 127.0.0.1:7100 --receivers 2 --tls a vm.raw
///
///   pagecast cast recv --control 127.0.0.1:7100 --iface 127.0.0.1 --out copy1.raw --tls b
///
///   pagecast cast recv --control 127.0.0.1:7100 --iface 127.0.0.1 --out copy2.raw --tls c
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CastArgs {
    #[command(subcommand)]
    command: CastCommand,
}

#[derive(Debug, Subcommand)]
enum CastCommand {
    Send(SendArgs),
    Recv(RecvArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Multicast,
    Chain,
    Auto,
}

/// Wait for N receivers and send them an image's non-zero pages.
///
/// Reports pages, bytes sent (first sends, repairs, unicast, control),
/// NACKs, and per receiver its completion time and goodput.
///
/// Example:
///
///   pagecast cast send --group 239.1.1.1:7000 --iface 10.0.0.1 --control 10.0.0.1:7100 --receivers 4 --rate 5G --tls /etc/pagecast/node vm.raw
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
struct SendArgs {
    /// Multicast group and data port (NACKs use the next port).
    #[arg(long, value_name = "ADDR:PORT")]
    group: SocketAddrV4,

    /// This host's address on the network to send on.
    #[arg(long, value_name = "ADDR")]
    iface: Ipv4Addr,

    /// Where receivers connect (TCP).
    #[arg(long, value_name = "HOST:PORT")]
    control: SocketAddr,

    /// Receivers to wait for before sending.
    #[arg(long, value_name = "N")]
    receivers: usize,

    /// Take only these receivers, by the names their certificates hold
    /// (comma-separated, as many as --receivers), each once; a chain runs
    /// through them in this order. A receiver must also give that name
    /// (`cast recv` does unless given another --name). Default: the first
    /// N hosts of the cluster to join, in the order they join, each
    /// certificate once (a second receiver with a certificate already
    /// taking part is refused).
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    expect: Vec<String>,

    /// Pacing rate in bits per second (e.g. 1G, 500M); default: as fast as
    /// the slowest receiver keeps up.
    #[arg(long, value_name = "BITS/S", value_parser = parse_bits_per_second)]
    rate: Option<u64>,

    /// Hold --rate whatever the receivers lose. By default a paced cast
    /// cuts its rate by 30% for each 100 ms in which receivers asked for
    /// more than 5% of its pages again, and climbs back by 5% of --rate for
    /// each in which they did not, so that it shares a congested link with
    /// other traffic instead of taking it (docs/transport.md).
    #[arg(long, requires = "rate")]
    no_loss_control: bool,

    /// multicast, chain (TCP through the receivers), or auto (probe).
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportArg,

    /// Path MTU in bytes; pages are split into fragments below 4,168.
    /// Default: the interface's.
    #[arg(long, value_name = "BYTES")]
    mtu: Option<usize>,

    /// Multicast TTL (1 keeps datagrams on the local network).
    #[arg(long, default_value_t = 1)]
    ttl: u32,

    /// Most pages sent ahead of the slowest receiver.
    #[arg(long, value_name = "PAGES", default_value_t = 8192)]
    window: u32,

    /// Seconds to wait for every receiver to connect.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    accept_timeout: u64,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,

    /// The raw memory image to send.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
}

/// Join a sender's session and write the image it sends.
///
/// The output is written to a temporary file next to FILE and renamed into
/// place only when every page has arrived and verified; a failed session
/// leaves FILE as it was.
///
/// Example:
///
///   pagecast cast recv --control 10.0.0.1:7100 --iface 10.0.0.2 --out vm.raw --tls /etc/pagecast/node
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
struct RecvArgs {
    /// The sender's control address.
    #[arg(long, value_name = "HOST:PORT")]
    control: SocketAddr,

    /// This host's address on the network to receive on.
    #[arg(long, value_name = "ADDR")]
    iface: Ipv4Addr,

    /// Where to write the rebuilt image.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// This receiver's name in the sender's report (default: the name its
    /// certificate holds, which is what `cast send --expect` matches).
    #[arg(long)]
    name: Option<String>,

    /// Seconds without a word from the sender before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    silent_after: u64,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

pub fn run(args: CastArgs, threads: usize) -> anyhow::Result<()> {
    match args.command {
        CastCommand::Send(a) => run_send(a, threads),
        CastCommand::Recv(a) => run_recv(a),
    }
}

/// `--expect`: none, or each of the `receivers` named once.
fn check_expected(names: &[String], receivers: usize) -> anyhow::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    if names.len() != receivers {
        anyhow::bail!(
            "--expect names {} receivers and --receivers says {receivers}: name each receiver once",
            names.len()
        );
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = names.iter().find(|n| !seen.insert(n.as_str())) {
        anyhow::bail!("--expect names {twice:?} twice: name each receiver once");
    }
    if names.iter().any(|n| n.is_empty()) {
        anyhow::bail!("--expect has an empty name");
    }
    Ok(())
}

#[derive(Serialize)]
struct SendOut<'a> {
    #[serde(flatten)]
    report: &'a SendReport,
    /// Bytes leaving the sender per byte delivered to one receiver.
    sender_bytes_per_delivered: f64,
    image: String,
}

fn run_send(a: SendArgs, threads: usize) -> anyhow::Result<()> {
    let expect: Vec<String> = a.expect.iter().map(|n| n.trim().to_owned()).collect();
    check_expected(&expect, a.receivers)?;
    let tls = load_tls(&a.tls)?;
    if !a.group.ip().is_multicast() {
        anyhow::bail!(
            "--group {} is not an IPv4 multicast address (224.0.0.0/4)",
            a.group
        );
    }
    let fp = Fingerprinter::new(threads)?;
    let bar = pages_bar(0, "hashing", a.no_progress);
    let src = ImageSource::open(&a.image, &fp, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let mut cfg = SenderConfig::new(a.control, a.iface, a.receivers);
    cfg.expected = expect;
    cfg.rate_bps = a.rate;
    cfg.loss_control = !a.no_loss_control;
    cfg.transport = match a.transport {
        TransportArg::Multicast => TransportChoice::Multicast,
        TransportArg::Chain => TransportChoice::Chain,
        TransportArg::Auto => TransportChoice::Auto,
    };
    cfg.mtu = a.mtu;
    cfg.ttl = a.ttl;
    cfg.window = a.window;
    cfg.accept_timeout = Duration::from_secs(a.accept_timeout);
    if !a.json {
        eprintln!(
            "waiting for {} receiver{} on {} ...",
            a.receivers,
            if a.receivers == 1 { "" } else { "s" },
            a.control
        );
    }
    let bar = pages_bar(
        u64::from(pagecast_multicast::PageSource::pages(&src)),
        "sending",
        a.no_progress,
    );
    let report = send(&cfg, Groups::Single(a.group), &src, &tls, &|done, _| {
        bar.set_position(done)
    })
    .context("cast session failed")?;
    bar.finish_and_clear();
    let out = SendOut {
        report: &report,
        sender_bytes_per_delivered: if report.page_bytes > 0 {
            (report.bytes_first + report.bytes_repair + report.bytes_unicast) as f64
                / report.page_bytes as f64
        } else {
            0.0
        },
        image: a.image.display().to_string(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", render_send(&out));
    }
    let all_ok = report
        .receivers
        .iter()
        .all(|r| matches!(r.status, PeerStatus::Complete | PeerStatus::Unicast { .. }));
    if !all_ok {
        anyhow::bail!("not every receiver completed (see the report)");
    }
    Ok(())
}

fn render_send(o: &SendOut) -> String {
    use std::fmt::Write;
    let r = o.report;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sent {} pages ({}) of {} to {} receivers by {:?} in {:.2} s",
        r.pages,
        format_bytes(r.page_bytes),
        o.image,
        r.receivers.len(),
        r.transport,
        r.duration_s
    );
    let _ = writeln!(
        s,
        "  bytes: first sends {}, repairs {}, unicast {}, control {}, heartbeats {}",
        format_bytes(r.bytes_first),
        format_bytes(r.bytes_repair),
        format_bytes(r.bytes_unicast),
        format_bytes(r.bytes_control),
        format_bytes(r.bytes_heartbeat)
    );
    let _ = writeln!(
        s,
        "  NACKs {}, pages repaired {}, {} fragment{} per page, {} connection{} refused",
        r.nacks,
        r.repairs,
        r.fragments,
        if r.fragments == 1 { "" } else { "s" },
        r.refused,
        if r.refused == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        s,
        "  sender bytes per byte delivered to one receiver: {:.3}",
        o.sender_bytes_per_delivered
    );
    let _ = writeln!(
        s,
        "{:<16} {:<10} {:>8} {:>13} {:>6} {:>6} {:>7} {:>8}",
        "RECEIVER", "STATUS", "TIME", "GOODPUT", "NACKS", "DUPS", "FORGED", "REPLAYED"
    );
    for p in &r.receivers {
        let status = match &p.status {
            PeerStatus::Complete => "complete".to_string(),
            PeerStatus::Unicast { .. } => "unicast".to_string(),
            PeerStatus::Dropped { .. } => "DROPPED".to_string(),
            PeerStatus::Corrupt => "CORRUPT".to_string(),
        };
        let _ = writeln!(
            s,
            "{:<16} {:<10} {:>8} {:>13} {:>6} {:>6} {:>7} {:>8}",
            p.name,
            status,
            p.completion_s.map_or("-".into(), |t| format!("{t:.2} s")),
            p.goodput_bps
                .map_or("-".into(), |g| format!("{:.2} Gbit/s", g / 1e9)),
            p.counters.nacks_sent,
            p.counters.duplicates,
            p.counters.forged,
            p.counters.replayed
        );
        if let PeerStatus::Dropped { reason } | PeerStatus::Unicast { reason } = &p.status {
            let _ = writeln!(s, "{:<16} ({reason})", "");
        }
    }
    s
}

#[derive(Serialize)]
struct RecvOut<'a> {
    #[serde(flatten)]
    report: &'a RecvReport,
    out: String,
}

fn run_recv(a: RecvArgs) -> anyhow::Result<()> {
    let tls = load_tls(&a.tls)?;
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| tls.identity().name.clone());
    let mut cfg = ReceiverConfig::new(a.control, a.iface, &name);
    cfg.silent_after = Duration::from_secs(a.silent_after);
    let mut sink = ImageSink::new(&a.out);
    let bar = pages_bar(0, "receiving", a.no_progress);
    let report = receive(&cfg, &tls, &mut sink, &|held, need| {
        bar.set_length(need);
        bar.set_position(held);
    })
    .with_context(|| {
        format!(
            "receiving into {} failed; it was left as it was",
            a.out.display()
        )
    })?;
    bar.finish_and_clear();
    let out = RecvOut {
        report: &report,
        out: a.out.display().to_string(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let c = &report.counters;
        println!(
            "received {} pages ({}) by {:?} in {:.2} s into {}",
            report.pages,
            format_bytes(report.page_bytes),
            report.transport,
            report.duration_s,
            out.out
        );
        println!(
            "  {} by {:?}, {} by unicast repair; {} duplicates; NACKs sent {}, suppressed {}",
            report.pages_main,
            report.transport,
            report.pages_unicast,
            c.duplicates,
            c.nacks_sent,
            c.nacks_suppressed
        );
        println!(
            "  dropped: {} forged, {} replayed, {} stale, {} bad hash; groups joined {}, left {}",
            c.forged, c.replayed, c.stale, c.bad_hash, report.joins, report.leaves
        );
    }
    Ok(())
}
