//! A client of the index replicas, and the publishing of VMs through it.
//!
//! [`IndexClient`] takes any replicas' addresses, finds each shard's leader
//! by following `NotLeader` answers, and retries a request on another
//! replica when a connection fails or a write times out. A write carries
//! its writer's session (client id, sequence number), so a retried batch
//! is applied once.
//!
//! [`load_vm`] publishes a VM: it registers the host, records the VM as
//! loading (getting a generation), sends its holder deltas to every shard
//! in numbered batches, then marks it loaded. The session id is derived
//! from host, VM and generation, so re-running an interrupted load re-sends
//! the same numbered batches and the shards skip those already applied.

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs};

use pagecast_channel::{Role, Tls, TlsStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagecast_proto::refusal;
use pagecast_proto::v1::{
    AdviseRequest, AdviseResponse, BeginVm, HolderDelta, HolderDeltas, HoldingsRequest, HostInfo,
    HostsRequest, IndexCommand, IndexFrame, IndexHello, IndexRequest, ListHoldingsRequest,
    LookupRequest, LookupResponse, PairRequest, PairResponse, RefusalCode, RegisterHost, RemoveVm,
    SetVmState, StatusRequest, StatusResponse, VmRecord, VmState, VmsRequest, WriteResponse,
    index_command::Op as CmdOp, index_frame::Kind, index_request::Op as ReqOp,
    index_response::Result as Resp,
};

use crate::holders::{HoldingSum, HoldingsPage};
use crate::keys::shard_of;
use crate::wire::{WireError, read_frame, write_frame};
use crate::{PageHash, Sketch};

/// Errors of index clients.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No replica answered.
    #[error("no index replica answered ({addrs}): {last}")]
    Unavailable {
        /// The addresses tried.
        addrs: String,
        /// The last failure.
        last: String,
    },
    /// A replica refused the request.
    #[error("{message}")]
    Refused {
        /// Why, for programs.
        code: RefusalCode,
        /// Why, for people.
        message: String,
    },
    /// An answer of the wrong kind.
    #[error("unexpected answer from the index: {0}")]
    Unexpected(String),
    /// Bad input from the caller.
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The refusal code, if a replica refused.
    pub fn code(&self) -> Option<RefusalCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

struct Conn {
    s: BufReader<TlsStream>,
}

/// How long connecting to one replica may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one attempt (one request to one replica) may take before the
/// client gives up on that replica and tries another: a replica that hangs
/// (stopped, partitioned with its connections open) costs this much, not
/// the whole request.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a replica that failed an attempt is tried last.
const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// A connection pool to the replicas of one index.
pub struct IndexClient {
    addrs: Vec<String>,
    tls: Tls,
    conns: HashMap<String, Conn>,
    leaders: HashMap<u32, String>,
    /// Replicas that failed an attempt lately, and when.
    suspect: HashMap<String, Instant>,
    next: usize,
    /// How long one request may take, retries included.
    pub timeout: Duration,
    /// How long one attempt at one replica may take.
    pub attempt_timeout: Duration,
    /// If set, how long a request may go on while the replicas answer
    /// that they are busy (reachable, with work queued): a bulk writer
    /// waits out a long queue instead of giving up at [`Self::timeout`],
    /// which still applies when the replicas do not answer.
    pub busy_timeout: Option<Duration>,
}

impl IndexClient {
    /// A client of the replicas at `addrs` (any of them; at least one),
    /// connecting with the identity `tls` (replicas present index
    /// certificates of the same CA).
    pub fn new(addrs: &[String], tls: Tls) -> Result<Self, ClientError> {
        let addrs: Vec<String> = addrs
            .iter()
            .flat_map(|a| a.split(','))
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Invalid("no index address given".into()));
        }
        Ok(IndexClient {
            addrs,
            tls,
            conns: HashMap::new(),
            leaders: HashMap::new(),
            suspect: HashMap::new(),
            next: 0,
            timeout: Duration::from_secs(30),
            attempt_timeout: ATTEMPT_TIMEOUT,
            busy_timeout: None,
        })
    }

    /// The addresses this client uses.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    fn connect(&self, addr: &str, attempt: Duration) -> Result<Conn, String> {
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| format!("{addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr}: no address"))?;
        let s = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT.min(attempt))
            .map_err(|e| format!("{addr}: {e}"))?;
        s.set_nodelay(true).ok();
        // Every read and write of an attempt has the attempt's deadline: a
        // replica that accepts but never answers costs one attempt.
        s.set_read_timeout(Some(attempt)).ok();
        s.set_write_timeout(Some(attempt)).ok();
        let mut w = self.tls.connect(s).map_err(|e| e.to_string())?;
        pagecast_channel::require(
            w.identity(),
            &[Role::Index],
            addr,
            "serve as an index replica",
        )
        .map_err(|e| e.to_string())?;
        let hello = IndexFrame {
            kind: Some(Kind::Hello(IndexHello {
                peer_id: 0,
                shards: 0,
            })),
        };
        write_frame(&mut w, &hello, addr).map_err(|e| e.to_string())?;
        Ok(Conn {
            s: BufReader::new(w),
        })
    }

    /// Sends `req` to `addr` and reads the answer.
    fn exchange(&mut self, addr: &str, req: &IndexRequest) -> Result<Resp, String> {
        if !self.conns.contains_key(addr) {
            let c = self.connect(addr, self.attempt_timeout)?;
            self.conns.insert(addr.to_owned(), c);
        }
        let c = self.conns.get_mut(addr).expect("inserted");
        let f = IndexFrame {
            kind: Some(Kind::Request(req.clone())),
        };
        let res = (|| -> Result<Resp, WireError> {
            write_frame(c.s.get_mut(), &f, addr)?;
            loop {
                let f = read_frame(&mut c.s, addr)?;
                if let Some(Kind::Response(r)) = f.kind {
                    return Ok(r.result.unwrap_or(Resp::Error(refusal(
                        RefusalCode::Internal,
                        "an empty answer",
                    ))));
                }
            }
        })();
        res.map_err(|e| {
            self.conns.remove(addr);
            self.suspect.insert(addr.to_owned(), Instant::now());
            e.to_string()
        })
    }

    /// The next replica to try when no leader is known: round robin over
    /// the replicas, those that failed lately last.
    fn pick(&mut self) -> String {
        let n = self.addrs.len();
        let now = Instant::now();
        self.suspect
            .retain(|_, t| now.duration_since(*t) < SUSPECT_FOR);
        for k in 0..n {
            let a = &self.addrs[(self.next + k) % n];
            if !self.suspect.contains_key(a) {
                self.next += k + 1;
                return a.clone();
            }
        }
        let a = self.addrs[self.next % n].clone();
        self.next += 1;
        a
    }

    /// Sends `req` to the replica that can answer it, following leader
    /// hints and retrying elsewhere on failure until [`Self::timeout`].
    pub fn call(&mut self, req: IndexRequest) -> Result<Resp, ClientError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let busy_deadline = self
            .busy_timeout
            .map_or(deadline, |b| (start + b).max(deadline));
        let shard = req.shard;
        let mut last;
        let mut target = self.leaders.get(&shard).cloned();
        loop {
            let addr = match target.take() {
                Some(a) => a,
                None => self.pick(),
            };
            // This attempt was answered "busy" (reachable, queue full).
            let mut busy = false;
            match self.exchange(&addr, &req) {
                Ok(Resp::NotLeader(nl)) => {
                    self.leaders.remove(&shard);
                    if !nl.leader_addr.is_empty() && nl.leader_addr != addr {
                        target = Some(nl.leader_addr);
                    } else {
                        // No leader known yet: an election is under way.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    last = format!("{addr}: not the leader of shard {shard}");
                }
                Ok(Resp::Error(e)) if e.kind().is_retryable() => {
                    busy = e.kind() == pagecast_proto::v1::RefusalCode::Busy;
                    self.leaders.remove(&shard);
                    last = format!("{addr}: {e}");
                }
                Ok(Resp::Error(e)) => {
                    return Err(ClientError::Refused {
                        code: e.kind(),
                        message: e.message,
                    });
                }
                Ok(r) => {
                    if !req.stale {
                        self.leaders.insert(shard, addr);
                    }
                    return Ok(r);
                }
                Err(e) => {
                    self.leaders.remove(&shard);
                    last = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let limit = if busy { busy_deadline } else { deadline };
            if Instant::now() >= limit {
                return Err(ClientError::Unavailable {
                    addrs: self.addrs.join(","),
                    last,
                });
            }
        }
    }

    /// The status of the replica at `addr` (all its shards).
    pub fn status_of(&mut self, addr: &str) -> Result<StatusResponse, String> {
        self.status_counted(addr, false)
    }

    /// The status of the replica at `addr`; with `exact`, each shard's
    /// distinct hashes counted by a scan of its holder lists rather than
    /// estimated.
    pub fn status_counted(&mut self, addr: &str, exact: bool) -> Result<StatusResponse, String> {
        let req = IndexRequest {
            shard: 0,
            stale: true,
            op: Some(ReqOp::Status(StatusRequest { exact })),
        };
        match self.exchange(addr, &req)? {
            Resp::Status(s) => Ok(s),
            Resp::Error(e) => Err(format!("{addr}: {e}")),
            other => Err(format!("{addr}: unexpected answer {other:?}")),
        }
    }

    /// The shard count, from the first replica that answers.
    pub fn shards(&mut self) -> Result<u32, ClientError> {
        let mut last = String::new();
        for a in self.addrs.clone() {
            match self.status_of(&a) {
                Ok(s) => return Ok(s.shards.len() as u32),
                Err(e) => last = e,
            }
        }
        Err(ClientError::Unavailable {
            addrs: self.addrs.join(","),
            last,
        })
    }

    /// Proposes `cmd` to `shard` and waits until it is applied.
    pub fn write(&mut self, shard: u32, cmd: IndexCommand) -> Result<WriteResponse, ClientError> {
        let req = IndexRequest {
            shard,
            stale: false,
            op: Some(ReqOp::Write(cmd)),
        };
        match self.call(req)? {
            Resp::Write(w) => Ok(w),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends a request answered by a write's answer (a membership change)
    /// to its shard's leader.
    pub fn write_request(&mut self, req: IndexRequest) -> Result<WriteResponse, ClientError> {
        match self.call(req)? {
            Resp::Write(w) => Ok(w),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Holders of `hashes` (all in `shard`), limited to `hosts` if any.
    pub fn lookup(
        &mut self,
        shard: u32,
        hashes: &[PageHash],
        hosts: &[u32],
        stale: bool,
    ) -> Result<LookupResponse, ClientError> {
        let mut b = Vec::with_capacity(hashes.len() * 32);
        for h in hashes {
            b.extend_from_slice(h.as_bytes());
        }
        let req = IndexRequest {
            shard,
            stale,
            op: Some(ReqOp::Lookup(LookupRequest {
                hashes: b.into(),
                hosts: hosts.to_vec(),
            })),
        };
        match self.call(req)? {
            Resp::Lookup(l) => Ok(l),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Every VM record.
    pub fn vms(&mut self, stale: bool) -> Result<Vec<VmRecord>, ClientError> {
        match self.call(IndexRequest {
            shard: 0,
            stale,
            op: Some(ReqOp::Vms(VmsRequest {})),
        })? {
            Resp::Vms(v) => Ok(v.vms),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Every host.
    pub fn hosts(&mut self, stale: bool) -> Result<Vec<HostInfo>, ClientError> {
        match self.call(IndexRequest {
            shard: 0,
            stale,
            op: Some(ReqOp::Hosts(HostsRequest {})),
        })? {
            Resp::Hosts(h) => Ok(h.hosts),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The best hosts and most similar VMs for `vm`.
    pub fn advise(
        &mut self,
        vm: &str,
        top: u32,
        stale: bool,
    ) -> Result<AdviseResponse, ClientError> {
        match self.call(IndexRequest {
            shard: 0,
            stale,
            op: Some(ReqOp::Advise(AdviseRequest { vm: vm.into(), top })),
        })? {
            Resp::Advise(a) => Ok(a),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// What host `host` holds in `shard`, summed (linearizable).
    pub fn holdings(&mut self, shard: u32, host: u32) -> Result<HoldingSum, ClientError> {
        let all = self.holdings_of(shard, host, false)?;
        Ok(all
            .into_iter()
            .find(|(h, _)| *h == host)
            .map(|(_, s)| s)
            .unwrap_or_default())
    }

    /// What each host (or only `host`, if not 0) holds in `shard`, summed.
    pub fn holdings_of(
        &mut self,
        shard: u32,
        host: u32,
        stale: bool,
    ) -> Result<Vec<(u32, HoldingSum)>, ClientError> {
        match self.call(IndexRequest {
            shard,
            stale,
            op: Some(ReqOp::Holdings(HoldingsRequest { host })),
        })? {
            Resp::Holdings(h) => h
                .hosts
                .into_iter()
                .map(|x| {
                    HoldingSum::decode(&x.sum)
                        .map(|s| (x.host, s))
                        .ok_or_else(|| ClientError::Unexpected("a malformed holding sum".into()))
                })
                .collect(),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The part of `shard`'s snapshot `index` after `after` (empty: the
    /// first) from the replica at `addr`, which only an index certificate
    /// may ask: its records and where the next part starts (`None`: the
    /// last part). `Ok(None)` when that replica no longer has the
    /// snapshot.
    #[allow(clippy::type_complexity)]
    pub fn snapshot_part(
        &mut self,
        addr: &str,
        shard: u32,
        index: u64,
        after: &[u8],
    ) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, String> {
        let req = IndexRequest {
            shard,
            stale: true,
            op: Some(ReqOp::SnapshotPart(
                pagecast_proto::v1::SnapshotPartRequest {
                    index,
                    after: after.to_vec().into(),
                },
            )),
        };
        match self.exchange(addr, &req)? {
            Resp::SnapshotPart(p) => {
                let next = (!p.done).then(|| p.next.to_vec());
                Ok(Some((p.records.to_vec(), next)))
            }
            Resp::Error(e) if e.kind() == RefusalCode::NotFound => Ok(None),
            Resp::Error(e) => Err(format!("{addr}: {e}")),
            other => Err(format!("{addr}: unexpected answer {other:?}")),
        }
    }

    /// Up to `limit` (hash, frames) pairs host `host` holds in `shard`
    /// after `after`, and where the next page starts (`None`: done).
    pub fn list_holdings(
        &mut self,
        shard: u32,
        host: u32,
        after: Option<PageHash>,
        limit: u32,
    ) -> Result<HoldingsPage, ClientError> {
        let r = match self.call(IndexRequest {
            shard,
            stale: false,
            op: Some(ReqOp::ListHoldings(ListHoldingsRequest {
                host,
                after: after
                    .map(|a| a.as_bytes().to_vec())
                    .unwrap_or_default()
                    .into(),
                limit,
            })),
        })? {
            Resp::ListHoldings(r) => r,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        if r.hashes.len() != r.frames.len() * 32 {
            return Err(ClientError::Unexpected(
                "a listing whose hashes and counts disagree".into(),
            ));
        }
        let pairs = r
            .hashes
            .chunks_exact(32)
            .zip(r.frames)
            .map(|(h, f)| (PageHash::try_from(h).expect("32 bytes"), f))
            .collect();
        let next = match r.next.len() {
            0 => None,
            32 => Some(PageHash::try_from(&r.next[..]).expect("32 bytes")),
            _ => return Err(ClientError::Unexpected("a malformed listing cursor".into())),
        };
        Ok((pairs, next))
    }

    /// Everything host `host` holds in `shard`.
    pub fn list_all_holdings(
        &mut self,
        shard: u32,
        host: u32,
    ) -> Result<Vec<(PageHash, u64)>, ClientError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = self.list_holdings(shard, host, after, 16_384)?;
            out.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Sharing between two VMs or hosts.
    pub fn pair(&mut self, p: PairRequest, stale: bool) -> Result<PairResponse, ClientError> {
        match self.call(IndexRequest {
            shard: 0,
            stale,
            op: Some(ReqOp::Pair(p)),
        })? {
            Resp::Pair(a) => Ok(a),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// The content of one VM as the index is told of it.
#[derive(Clone, Debug)]
pub struct VmContent {
    /// VM name.
    pub name: String,
    /// Where its image was read.
    pub image: String,
    /// Guest frames.
    pub frames: u64,
    /// Each distinct non-zero content and its frame count, hashes sorted.
    pub counts: Vec<(PageHash, u64)>,
    /// Its sketch.
    pub sketch: Sketch,
}

impl VmContent {
    /// The VM's record as the index keeps it (running, on no host yet: the
    /// writer sets its own host number, which the index checks against the
    /// writer's certificate).
    pub fn record(&self, domain: &str) -> VmRecord {
        VmRecord {
            name: self.name.clone(),
            host: 0,
            image: self.image.clone(),
            frames: self.frames,
            nonzero_frames: self.nonzero_frames(),
            distinct: self.counts.len() as u64,
            digest: self.digest().to_vec().into(),
            sketch: self.sketch.to_bytes().into(),
            generation: 0,
            state: VmState::Running as i32,
            domain: domain.to_owned(),
        }
    }

    /// Builds the content from every frame's hash (zero pages included).
    pub fn from_frames(name: &str, image: &str, hashes: &[PageHash]) -> Self {
        let mut m: HashMap<PageHash, u64> = HashMap::new();
        for h in hashes.iter().filter(|h| !h.is_zero_page()) {
            *m.entry(*h).or_default() += 1;
        }
        let mut counts: Vec<(PageHash, u64)> = m.into_iter().collect();
        counts.sort_unstable();
        VmContent {
            name: name.into(),
            image: image.into(),
            frames: hashes.len() as u64,
            counts,
            sketch: Sketch::of(hashes.iter()),
        }
    }

    /// Non-zero frames.
    pub fn nonzero_frames(&self) -> u64 {
        self.counts.iter().map(|c| c.1).sum()
    }

    /// BLAKE3 over the sorted (hash, count) pairs.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for (p, c) in &self.counts {
            h.update(p.as_bytes());
            h.update(&c.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }
}

/// What a load or unload did.
#[derive(Clone, Debug, Default)]
pub struct PublishReport {
    /// Holder deltas sent.
    pub deltas: u64,
    /// Batches sent.
    pub batches: u64,
    /// Batches the shards had already applied (a resumed load).
    pub duplicates: u64,
    /// Wall time of the delta phase.
    pub elapsed: Duration,
    /// The VM was already loading and this run resumed it.
    pub resumed: bool,
    /// Host number.
    pub host: u32,
}

fn session_id(host: u32, vm: &str, generation: u64, what: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&host.to_le_bytes());
    h.update(vm.as_bytes());
    h.update(&generation.to_le_bytes());
    h.update(what.as_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8")) | 1
}

fn cmd(op: CmdOp) -> IndexCommand {
    IndexCommand {
        client: 0,
        seq: 0,
        op: Some(op),
    }
}

/// Where and how [`send_deltas`] sends.
struct Sending<'a> {
    addrs: &'a [String],
    tls: &'a Tls,
    shards: u32,
    host: u32,
    /// Remove rather than add.
    negative: bool,
    /// The writer session.
    client: u64,
    batch: usize,
}

/// Sends the deltas of `content` (negated for a removal), every shard in
/// parallel, in batches numbered from 1 under the session.
fn send_deltas(
    to: &Sending<'_>,
    content: &VmContent,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(u64, u64, u64), ClientError> {
    let Sending {
        addrs,
        tls,
        shards,
        host,
        negative,
        client,
        batch,
    } = *to;
    let mut by_shard: Vec<Vec<HolderDelta>> = vec![Vec::new(); shards as usize];
    for (h, c) in &content.counts {
        let frames =
            i64::try_from(*c).map_err(|_| ClientError::Invalid("count too large".into()))?;
        by_shard[shard_of(h, shards) as usize].push(HolderDelta {
            hash: h.as_bytes().to_vec().into(),
            host,
            frames: if negative { -frames } else { frames },
            // The host's own account for its distinct count: a loaded
            // content new to it, an unloaded one held only by this VM.
            before: if negative { *c } else { 0 },
        });
    }
    let batches = AtomicU64::new(0);
    let dups = AtomicU64::new(0);
    let batch = batch.clamp(1, pagecast_proto::MAX_INDEX_BATCH);
    let results: Vec<Result<(), ClientError>> = std::thread::scope(|s| {
        let handles: Vec<_> = by_shard
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.is_empty())
            .map(|(shard, deltas)| {
                let (batches, dups) = (&batches, &dups);
                s.spawn(move || -> Result<(), ClientError> {
                    let mut c = IndexClient::new(addrs, tls.clone())?;
                    for (i, chunk) in deltas.chunks(batch).enumerate() {
                        let w = c.write(
                            shard as u32,
                            IndexCommand {
                                client,
                                seq: i as u64 + 1,
                                op: Some(CmdOp::Deltas(HolderDeltas {
                                    deltas: chunk.to_vec(),
                                })),
                            },
                        )?;
                        batches.fetch_add(1, Ordering::Relaxed);
                        if w.duplicate {
                            dups.fetch_add(1, Ordering::Relaxed);
                        }
                        progress(chunk.len() as u64);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a shard sender panicked"))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok((
        content.counts.len() as u64,
        batches.into_inner(),
        dups.into_inner(),
    ))
}

/// Cordons host `name` (`on`, with `reason`) or lifts its cordon; refused
/// for a host the index does not know.
pub fn set_cordon(
    c: &mut IndexClient,
    name: &str,
    on: bool,
    reason: &str,
) -> Result<WriteResponse, ClientError> {
    c.write(
        0,
        cmd(CmdOp::SetCordon(pagecast_proto::v1::SetCordon {
            name: name.to_owned(),
            cordoned: on,
            reason: reason.to_owned(),
        })),
    )
}

/// Publishes `content` as a VM held by host `host`.
pub fn load_vm(
    addrs: &[String],
    tls: &Tls,
    host: &str,
    content: &VmContent,
    batch: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<PublishReport, ClientError> {
    let mut c = IndexClient::new(addrs, tls.clone())?;
    let shards = c.shards()?;
    let hostn = c
        .write(
            0,
            cmd(CmdOp::RegisterHost(RegisterHost { name: host.into() })),
        )?
        .host;
    // Loaded images are in the cluster-wide dedup domain.
    let rec = VmRecord {
        host: hostn,
        state: VmState::Loading as i32,
        ..content.record("")
    };
    let begun = c.write(0, cmd(CmdOp::BeginVm(BeginVm { vm: Some(rec) })))?;
    let client = session_id(hostn, &content.name, begun.generation, "load");
    let started = Instant::now();
    let to = Sending {
        addrs,
        tls,
        shards,
        host: hostn,
        negative: false,
        client,
        batch,
    };
    let (deltas, batches, duplicates) = send_deltas(&to, content, progress)?;
    let elapsed = started.elapsed();
    c.write(
        0,
        cmd(CmdOp::SetVmState(SetVmState {
            name: content.name.clone(),
            host: hostn,
            state: VmState::Loaded as i32,
        })),
    )?;
    Ok(PublishReport {
        deltas,
        batches,
        duplicates,
        elapsed,
        resumed: begun.duplicate,
        host: hostn,
    })
}

/// Removes VM `name` of host `host`. `content` re-reads the VM's content
/// from its record (the image it was loaded from); it must have the digest
/// recorded at load, or nothing is changed.
pub fn unload_vm(
    addrs: &[String],
    tls: &Tls,
    host: &str,
    name: &str,
    batch: usize,
    content: impl FnOnce(&VmRecord) -> Result<VmContent, String>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<PublishReport, ClientError> {
    let mut c = IndexClient::new(addrs, tls.clone())?;
    let shards = c.shards()?;
    let hosts = c.hosts(false)?;
    let Some(h) = hosts.iter().find(|h| h.name == host) else {
        return Err(ClientError::Invalid(format!(
            "host {host} is not in the index"
        )));
    };
    let Some(rec) = c.vms(false)?.into_iter().find(|v| v.name == name) else {
        return Err(ClientError::Invalid(format!(
            "VM {name} is not in the index"
        )));
    };
    if rec.host != h.index {
        let on = hosts
            .iter()
            .find(|x| x.index == rec.host)
            .map_or("another host", |x| x.name.as_str());
        return Err(ClientError::Invalid(format!(
            "VM {name} is held by {on}, not {host}"
        )));
    }
    if rec.state == VmState::Loading as i32 {
        return Err(ClientError::Invalid(format!(
            "VM {name} is still loading: run `index load` for it again to finish, then unload"
        )));
    }
    let content = content(&rec).map_err(ClientError::Invalid)?;
    if content.digest()[..] != rec.digest[..] {
        return Err(ClientError::Invalid(format!(
            "{}: its content differs from what was loaded as {name}; nothing was changed",
            rec.image
        )));
    }
    c.write(
        0,
        cmd(CmdOp::SetVmState(SetVmState {
            name: name.into(),
            host: h.index,
            state: VmState::Unloading as i32,
        })),
    )?;
    let client = session_id(h.index, name, rec.generation, "unload");
    let started = Instant::now();
    let to = Sending {
        addrs,
        tls,
        shards,
        host: h.index,
        negative: true,
        client,
        batch,
    };
    let (deltas, batches, duplicates) = send_deltas(&to, &content, progress)?;
    let elapsed = started.elapsed();
    c.write(
        0,
        cmd(CmdOp::RemoveVm(RemoveVm {
            name: name.into(),
            host: h.index,
        })),
    )?;
    Ok(PublishReport {
        deltas,
        batches,
        duplicates,
        elapsed,
        resumed: false,
        host: h.index,
    })
}

/// How much of a set of distinct pages each host holds.
#[derive(Clone, Debug, Default)]
pub struct HoldersReport {
    /// Distinct non-zero pages asked about.
    pub distinct: u64,
    /// Pages (of those) each host holds at least one frame of, by host name.
    pub by_host: BTreeMap<String, u64>,
    /// Pages no host holds.
    pub held_by_none: u64,
}

/// Which hosts hold the distinct pages `hashes` (zero pages ignored).
pub fn holders_of(
    addrs: &[String],
    tls: &Tls,
    hashes: &[PageHash],
    stale: bool,
) -> Result<HoldersReport, ClientError> {
    let mut c = IndexClient::new(addrs, tls.clone())?;
    let shards = c.shards()?;
    let names: HashMap<u32, String> = c
        .hosts(stale)?
        .into_iter()
        .map(|h| (h.index, h.name))
        .collect();
    let mut distinct: Vec<PageHash> = hashes
        .iter()
        .filter(|h| !h.is_zero_page())
        .copied()
        .collect();
    distinct.sort_unstable();
    distinct.dedup();
    let mut by_shard: Vec<Vec<PageHash>> = vec![Vec::new(); shards as usize];
    for h in &distinct {
        by_shard[shard_of(h, shards) as usize].push(*h);
    }
    let mut rep = HoldersReport {
        distinct: distinct.len() as u64,
        ..Default::default()
    };
    let mut held = 0u64;
    for (s, hs) in by_shard.iter().enumerate() {
        for chunk in hs.chunks(16_384) {
            let l = c.lookup(s as u32, chunk, &[], stale)?;
            let mut seen = vec![false; chunk.len()];
            for (i, host) in l.hash_index.iter().zip(&l.host) {
                let name = names
                    .get(host)
                    .cloned()
                    .unwrap_or_else(|| format!("#{host}"));
                *rep.by_host.entry(name).or_default() += 1;
                if let Some(x) = seen.get_mut(*i as usize) {
                    if !*x {
                        held += 1;
                    }
                    *x = true;
                }
            }
        }
    }
    rep.held_by_none = rep.distinct - held;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_channel::ca::Authority;
    use pagecast_proto::v1::IndexResponse;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::OnceLock;

    fn ca() -> &'static Authority {
        static CA: OnceLock<Authority> = OnceLock::new();
        CA.get_or_init(|| Authority::generate().unwrap())
    }

    fn client_tls() -> Tls {
        ca().issue("ops", Role::Operator, 1).unwrap()
    }

    /// A replica that answers every request "busy"; returns its address.
    fn always_busy() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let tls = ca().issue("index-1", Role::Index, 1).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let Ok(s) = tls.accept(s) else { return };
                    let mut r = BufReader::new(s);
                    while let Ok(f) = read_frame(&mut r, "client") {
                        if let Some(Kind::Request(_)) = f.kind {
                            let busy = IndexFrame {
                                kind: Some(Kind::Response(IndexResponse {
                                    result: Some(Resp::Error(refusal(
                                        RefusalCode::Busy,
                                        "queue full",
                                    ))),
                                })),
                            };
                            let w = r.get_mut();
                            if write_frame(w, &busy, "client").is_err() || w.flush().is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn status() -> IndexRequest {
        IndexRequest {
            shard: 0,
            op: Some(ReqOp::Status(StatusRequest::default())),
            ..Default::default()
        }
    }

    #[test]
    fn busy_answers_are_waited_out_until_the_busy_deadline() {
        let addr = always_busy();
        let mut c = IndexClient::new(std::slice::from_ref(&addr), client_tls()).unwrap();
        c.timeout = Duration::from_millis(200);
        c.busy_timeout = Some(Duration::from_millis(1500));
        let t = Instant::now();
        let e = c.call(status()).unwrap_err();
        assert!(matches!(e, ClientError::Unavailable { .. }), "{e}");
        assert!(e.to_string().contains("queue full"), "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(1400),
            "gave up after {:?}",
            t.elapsed()
        );

        // Without a busy deadline the plain deadline applies.
        c.busy_timeout = None;
        let t = Instant::now();
        c.call(status()).unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(1400),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn an_unreachable_index_fails_at_the_plain_deadline_despite_a_busy_deadline() {
        // A port nothing listens on: bound, then released.
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut c = IndexClient::new(&[dead], client_tls()).unwrap();
        c.timeout = Duration::from_millis(300);
        c.busy_timeout = Some(Duration::from_secs(20));
        let t = Instant::now();
        let e = c.call(status()).unwrap_err();
        assert!(matches!(e, ClientError::Unavailable { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
