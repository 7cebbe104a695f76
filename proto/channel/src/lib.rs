//! Mutual TLS for every pagecast TCP connection, the identities and roles a
//! cluster certificate carries, and the length-prefixed protobuf frames that
//! travel inside.
//!
//! A cluster has a small certificate authority ([`ca`]): `pagecast ca init`
//! makes it, `pagecast ca issue` signs one certificate per node with its
//! name (subject CN) and its [`Role`] (subject OU). A node's directory holds
//! `ca.crt`, `node.crt` and `node.key`; [`Tls::load`] reads it.
//!
//! Every connection is TLS 1.3 (rustls, ring), both sides present a
//! certificate and both check that it chains to the cluster CA and is
//! within its validity: a peer with no certificate, one from another CA or
//! an expired one fails the handshake. Server names are not checked against
//! addresses (nodes are reached by IP and port); what a peer may do is
//! decided from its [`Identity`] after the handshake, by the service.
//!
//! Inside TLS every message is a frame `[u32 big-endian length][protobuf]`
//! of at most [`MAX_CONTROL_FRAME_BYTES`]; a longer announced length ends
//! the connection before anything is allocated. Blocking connections are
//! [`Channel`]s (split into a [`ChannelReader`] and a [`ChannelWriter`] that
//! two threads may use at once); the agent's accept loop uses
//! `AsyncChannel` (feature `tokio`) and hands heavy work to a blocking
//! thread. Services with their own framing (the content index) use
//! [`TlsStream`], a blocking `Read + Write` stream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagecast_proto::MAX_CONTROL_FRAME_BYTES;
use prost::Message;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

pub mod ca;
mod der;
mod verify;

#[cfg(feature = "tokio")]
mod asynch;
pub mod gate;
#[cfg(feature = "tokio")]
pub use asynch::AsyncChannel;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one send may block on a peer that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a frame's head (its length).
pub const FRAME_HEAD: usize = 4;
/// The slowest pace a frame may arrive at, in bytes a second, on a
/// connection with a read timeout: a receive gives up once the frame,
/// from its head's arrival, has taken that timeout plus a second for
/// every this many bytes of it (64 s more for the largest frame). The read timeout alone bounds each read,
/// so without this a peer that sends one byte a little more often than
/// that would hold a receive for as long as it liked.
pub const SLOWEST_FRAME_PACE: usize = 64 << 10;
/// Bytes TLS 1.3 adds to each record (header, content type, AEAD tag).
pub const TLS_RECORD_OVERHEAD: usize = 5 + 1 + 16;
/// Largest TLS record payload.
const TLS_RECORD: usize = 16 << 10;

/// Errors of identities and of TLS channels.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A certificate, key or CA file could not be read or is not valid.
    #[error("{}: {why}", path.display())]
    Pki {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// I/O on the connection failed.
    #[error("connection to {peer}: {source}")]
    Io {
        /// The peer's address.
        peer: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The peer took no data for the write timeout: frozen, or its
    /// network cut (the connection stays open).
    #[error("{who} at {peer} took no data for {after:?} (is it frozen, or its network cut?)")]
    Stalled {
        /// The peer's address.
        peer: String,
        /// Its certificate's name and role.
        who: String,
        /// How long this side waited.
        after: std::time::Duration,
    },
    /// The peer's kernel took some of a send, but less than the send
    /// asked of it over a window of waiting: a peer reading slowly (on
    /// purpose, or overloaded) that would otherwise hold the send until
    /// the write timeout.
    #[error(
        "{who} at {peer} took {took} bytes in {over:?} while a send to it waited, under the {least} asked (overloaded, or reading slowly on purpose?)"
    )]
    Slow {
        /// The peer's address.
        peer: String,
        /// Its certificate's name and role.
        who: String,
        /// Bytes its kernel acknowledged over the window.
        took: usize,
        /// The window.
        over: std::time::Duration,
        /// Bytes asked of it over the window.
        least: usize,
    },
    /// The peer closed the connection.
    #[error("connection to {peer} closed")]
    Closed {
        /// The peer's address.
        peer: String,
    },
    /// The TLS layer refused the peer or the connection failed (a
    /// certificate from another CA, expired or missing; a forged record).
    #[error("connection to {peer}: TLS: {source}")]
    Tls {
        /// The peer's address.
        peer: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The peer's certificate chains to the CA but names no usable identity.
    #[error("connection to {peer}: the peer's certificate {why}")]
    Identity {
        /// The peer's address.
        peer: String,
        /// What is wrong with it.
        why: String,
    },
    /// A frame longer than allowed.
    #[error("connection to {peer}: frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The peer's address.
        peer: String,
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame that does not decode.
    #[error("connection to {peer}: malformed {what}: {why}")]
    Malformed {
        /// The peer's address.
        peer: String,
        /// What was expected.
        what: &'static str,
        /// The decoder's message.
        why: String,
    },
    /// The peer's role may not use this service.
    #[error("connection to {peer}: {identity} may not {what}")]
    Forbidden {
        /// The peer's address.
        peer: String,
        /// Who it is.
        identity: Identity,
        /// What it tried.
        what: String,
    },
    /// The OS random source failed.
    #[error("the system random source failed: {0}")]
    Random(String),
}

/// Checks that `identity` (at `peer`) has one of `roles`, else
/// [`AuthError::Forbidden`] saying it may not `what`.
pub fn require(
    identity: &Identity,
    roles: &[Role],
    peer: &str,
    what: &str,
) -> Result<(), AuthError> {
    if roles.contains(&identity.role) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            peer: peer.to_owned(),
            identity: identity.clone(),
            what: what.to_owned(),
        })
    }
}

/// Fills `buf` from the OS random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), AuthError> {
    getrandom::fill(buf).map_err(|e| AuthError::Random(e.to_string()))
}

/// What a certificate allows its holder to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A host: its own agent, its own holders in the index, migration and
    /// cast traffic with other hosts.
    Host,
    /// An operator: start, stop, migrate, evacuate, clone; index loads.
    Operator,
    /// Queries only: advise, holders, hosts, status, VM lists.
    Reader,
    /// An index replica: raft traffic with the other replicas.
    Index,
}

impl Role {
    /// Every role, in the order `--help` lists them.
    pub const ALL: [Role; 4] = [Role::Host, Role::Operator, Role::Reader, Role::Index];

    /// The name in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Operator => "operator",
            Role::Reader => "reader",
            Role::Index => "index",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: expected host, operator, reader or index"))
    }
}

/// Who is on the other end: the name and role its certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The certificate's common name (a host's name for hosts).
    pub name: String,
    /// The certificate's role.
    pub role: Role,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Reads the identity of a certificate (DER): CN is the name, OU the role.
pub fn identity_of(der: &[u8]) -> Result<Identity, String> {
    let attrs = der::subject(der).ok_or("does not parse as an X.509 certificate")?;
    let one = |oid: &[u8], what: &str| -> Result<String, String> {
        let v: Vec<&String> = attrs
            .iter()
            .filter(|(o, _)| o == oid)
            .map(|(_, v)| v)
            .collect();
        match v.as_slice() {
            [a] => Ok((*a).clone()),
            [] => Err(format!("names no {what}")),
            _ => Err(format!("names more than one {what}")),
        }
    };
    let name = one(der::CN, "common name (node name)")?;
    let role = one(der::OU, "organizational unit (role)")?;
    let role = role
        .parse()
        .map_err(|e| format!("has role {role:?}, not a pagecast role: {e}"))?;
    if name.is_empty() {
        return Err("has an empty name".into());
    }
    Ok(Identity { name, role })
}

/// A node's TLS identity and configuration: what every connection it opens
/// or accepts uses. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    me: Identity,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("me", &self.me).finish()
    }
}

/// The files of a node directory.
pub const CA_CERT: &str = "ca.crt";
/// The node's certificate.
pub const NODE_CERT: &str = "node.crt";
/// The node's private key.
pub const NODE_KEY: &str = "node.key";

/// Largest certificate or key file read.
const MAX_PEM_BYTES: u64 = 64 << 10;

fn read_pem(path: &Path) -> Result<String, AuthError> {
    let pki = |why: String| AuthError::Pki {
        path: path.to_owned(),
        why,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| pki(format!("cannot read: {e}")))?
        .len();
    if len > MAX_PEM_BYTES {
        return Err(pki(format!(
            "{len} bytes, more than the {MAX_PEM_BYTES} a PEM file may have"
        )));
    }
    std::fs::read_to_string(path).map_err(|e| pki(format!("cannot read: {e}")))
}

impl Tls {
    /// Reads a node directory (`ca.crt`, `node.crt`, `node.key`, as
    /// `pagecast ca issue` writes them).
    pub fn load(dir: &Path) -> Result<Self, AuthError> {
        if !dir.is_dir() {
            return Err(AuthError::Pki {
                path: dir.to_owned(),
                why: "is not a directory (a node directory from `pagecast ca issue --out`)".into(),
            });
        }
        let ca = read_pem(&dir.join(CA_CERT))?;
        let cert = read_pem(&dir.join(NODE_CERT))?;
        let key = read_pem(&dir.join(NODE_KEY))?;
        Self::from_pem(&ca, &cert, &key).map_err(|why| AuthError::Pki {
            path: dir.to_owned(),
            why,
        })
    }

    /// Builds from PEM text: the CA's certificate, the node's certificate
    /// and its private key.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, String> {
        let ca = CertificateDer::from_pem_slice(ca.as_bytes())
            .map_err(|e| format!("{CA_CERT} holds no certificate: {e}"))?;
        let cert = CertificateDer::from_pem_slice(cert.as_bytes())
            .map_err(|e| format!("{NODE_CERT} holds no certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| format!("{NODE_KEY} holds no private key: {e}"))?;
        let me = identity_of(&cert).map_err(|e| format!("{NODE_CERT} {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| format!("{CA_CERT} is not a usable CA certificate: {e}"))?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::ClusterServerVerifier::new(
                roots.clone(),
                provider.clone(),
            )))
            .with_client_auth_cert(vec![cert.clone()], key.clone_key())
            .map_err(|e| format!("{NODE_KEY} does not match {NODE_CERT}: {e}"))?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .map_err(|e| format!("{NODE_KEY} does not match {NODE_CERT}: {e}"))?;
        // No resumption: every connection proves its certificate.
        server.send_tls13_tickets = 0;
        Ok(Tls {
            me,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// The server side's rustls configuration (for async acceptors).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// Runs the client side of the handshake on `sock` (within
    /// [`HANDSHAKE_TIMEOUT`], or the socket's read timeout if shorter).
    pub fn connect(&self, sock: TcpStream) -> Result<TlsStream, AuthError> {
        let name =
            rustls::pki_types::ServerName::try_from("pagecast.invalid").expect("a valid name");
        let peer = peer_of(&sock);
        let conn = rustls::ClientConnection::new(self.client.clone(), name).map_err(|source| {
            AuthError::Tls {
                peer: peer.clone(),
                source,
            }
        })?;
        TlsStream::handshake(rustls::Connection::Client(conn), sock, peer)
    }

    /// Runs the server side of the handshake on an accepted `sock` (within
    /// [`HANDSHAKE_TIMEOUT`]: a client that connects and says nothing holds
    /// the caller no longer).
    pub fn accept(&self, sock: TcpStream) -> Result<TlsStream, AuthError> {
        let peer = peer_of(&sock);
        let conn = rustls::ServerConnection::new(self.server.clone()).map_err(|source| {
            AuthError::Tls {
                peer: peer.clone(),
                source,
            }
        })?;
        TlsStream::handshake(rustls::Connection::Server(conn), sock, peer)
    }
}

fn peer_of(sock: &TcpStream) -> String {
    sock.peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string())
}

/// The identity in a finished handshake's peer certificate.
fn peer_identity(certs: Option<&[CertificateDer<'_>]>, peer: &str) -> Result<Identity, AuthError> {
    let Some(first) = certs.and_then(|c| c.first()) else {
        return Err(AuthError::Identity {
            peer: peer.into(),
            why: "is missing".into(),
        });
    };
    identity_of(first).map_err(|why| AuthError::Identity {
        peer: peer.into(),
        why,
    })
}

/// Maps an I/O error on the connection to `peer`: end of stream is
/// [`AuthError::Closed`], a TLS failure [`AuthError::Tls`], anything else
/// [`AuthError::Io`].
pub fn io_err(peer: &str) -> impl Fn(std::io::Error) -> AuthError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            return AuthError::Closed {
                peer: peer.to_owned(),
            };
        }
        if source.kind() == std::io::ErrorKind::InvalidData
            && let Some(e) = source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return AuthError::Tls {
                peer: peer.to_owned(),
                source: e.clone(),
            };
        }
        AuthError::Io {
            peer: peer.to_owned(),
            source,
        }
    }
}

/// A blocking TLS connection with a verified peer: `Read + Write`.
pub struct TlsStream {
    conn: rustls::Connection,
    sock: TcpStream,
    peer: String,
    identity: Identity,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .field("identity", &self.identity)
            .finish()
    }
}

impl TlsStream {
    fn handshake(
        mut conn: rustls::Connection,
        mut sock: TcpStream,
        peer: String,
    ) -> Result<Self, AuthError> {
        let _ = sock.set_nodelay(true);
        let old_read = sock.read_timeout().ok().flatten();
        let old_write = sock.write_timeout().ok().flatten();
        // A caller with a shorter deadline (set as the socket's read
        // timeout) keeps it for the handshake too.
        let limit = old_read.map_or(HANDSHAKE_TIMEOUT, |t| t.min(HANDSHAKE_TIMEOUT));
        sock.set_read_timeout(Some(limit)).map_err(io_err(&peer))?;
        sock.set_write_timeout(Some(limit)).map_err(io_err(&peer))?;
        let deadline = std::time::Instant::now() + limit;
        while conn.is_handshaking() {
            if std::time::Instant::now() > deadline {
                return Err(AuthError::Io {
                    peer,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake took too long",
                    ),
                });
            }
            if let Err(e) = conn.complete_io(&mut sock) {
                // Tell the peer why, if rustls has an alert queued.
                let _ = conn.write_tls(&mut sock);
                return Err(io_err(&peer)(e));
            }
        }
        // Flush what the handshake left (the client's Finished).
        while conn.wants_write() {
            conn.write_tls(&mut sock).map_err(io_err(&peer))?;
        }
        let identity = peer_identity(conn.peer_certificates(), &peer)?;
        sock.set_read_timeout(old_read).map_err(io_err(&peer))?;
        sock.set_write_timeout(old_write).map_err(io_err(&peer))?;
        Ok(TlsStream {
            conn,
            sock,
            peer,
            identity,
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The peer's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The TCP socket (for timeouts and shutdown).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    fn into_parts(self) -> (rustls::Connection, TcpStream, String, Identity) {
        (self.conn, self.sock, self.peer, self.identity)
    }

    fn push(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            self.push()?;
            if self.conn.read_tls(&mut self.sock)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.conn
                .process_new_packets()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.push()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.push()
    }
}

/// A message framed for the wire: `[u32 length][protobuf]`.
pub fn frame<M: Message>(m: &M) -> Vec<u8> {
    let len = m.encoded_len();
    let mut buf = Vec::with_capacity(FRAME_HEAD + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut buf).expect("a Vec grows");
    buf
}

/// The body length a frame's head announces, if allowed.
pub fn frame_len(head: [u8; FRAME_HEAD], peer: &str) -> Result<usize, AuthError> {
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_CONTROL_FRAME_BYTES {
        return Err(AuthError::TooLarge {
            peer: peer.to_owned(),
            len,
            max: MAX_CONTROL_FRAME_BYTES,
        });
    }
    Ok(len)
}

/// Decodes a frame's body as `M`.
pub fn decode<M: Message + Default>(
    peer: &str,
    what: &'static str,
    b: &[u8],
) -> Result<M, AuthError> {
    M::decode(b).map_err(|e| AuthError::Malformed {
        peer: peer.to_owned(),
        what,
        why: e.to_string(),
    })
}

/// Reads frames from a plaintext byte stream (what TLS delivers): for the
/// fuzz target and tests, and the channel's reader.
#[derive(Debug, Default)]
pub struct FrameDecoder;

impl FrameDecoder {
    /// Reads the next frame's body from `input`.
    pub fn next(&mut self, input: &mut impl Read, peer: &str) -> Result<Vec<u8>, AuthError> {
        let mut head = [0u8; FRAME_HEAD];
        input.read_exact(&mut head).map_err(io_err(peer))?;
        let mut body = vec![0u8; frame_len(head, peer)?];
        input.read_exact(&mut body).map_err(io_err(peer))?;
        Ok(body)
    }
}

/// Bytes a frame of `payload` bytes puts on the wire inside TLS.
pub fn wire_bytes(payload: usize) -> u64 {
    let plain = FRAME_HEAD + payload;
    (plain + plain.div_ceil(TLS_RECORD) * TLS_RECORD_OVERHEAD) as u64
}

struct Shared {
    conn: Mutex<rustls::Connection>,
}

/// Receives frames of a [`Channel`].
pub struct ChannelReader {
    sock: TcpStream,
    shared: Arc<Shared>,
    peer: String,
    /// Decrypted bytes not yet returned, from `pos`.
    plain: Vec<u8>,
    pos: usize,
    raw: Box<[u8]>,
}

/// Sends frames of a [`Channel`].
pub struct ChannelWriter {
    sock: TcpStream,
    shared: Arc<Shared>,
    peer: String,
    /// The peer's identity, for errors.
    who: String,
    /// How long one frame's send may take ([`WRITE_TIMEOUT`], also the
    /// socket's write timeout).
    limit: std::time::Duration,
    sent_bytes: u64,
    /// Bytes the peer's kernel acknowledged while watched sends waited
    /// ([`ChannelWriter::acked_while_waiting`]).
    acked_waiting: u64,
    out: Vec<u8>,
}

/// Closes a [`Channel`]'s connection from outside the threads using it
/// ([`ChannelWriter::closer`]).
#[derive(Debug)]
pub struct Closer(TcpStream);

impl Closer {
    /// Closes the connection both ways.
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }

    /// Bytes sent on the connection that the peer's kernel has not yet
    /// acknowledged ([`ChannelWriter::unacked_bytes`]): while a send
    /// waits, whether the peer takes anything at all.
    pub fn unacked_bytes(&self) -> std::io::Result<usize> {
        outq(&self.0)
    }
}

/// Bytes queued on `sock` that its peer has not acknowledged.
fn outq(sock: &TcpStream) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one c_int through
    // the pointer, which points at `n`, live for the call; the descriptor
    // is `sock`'s, open while the borrow lives.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::TIOCOUTQ,
            &mut n,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// A blocking, mutually authenticated connection carrying protobuf frames.
pub struct Channel {
    r: ChannelReader,
    w: ChannelWriter,
    identity: Identity,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.r.peer)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Connects as a client over `stream` (TLS handshake included).
    pub fn client(stream: TcpStream, tls: &Tls) -> Result<Self, AuthError> {
        Self::from_tls(tls.connect(stream)?)
    }

    /// Accepts a client on `stream` (TLS handshake included).
    pub fn server(stream: TcpStream, tls: &Tls) -> Result<Self, AuthError> {
        Self::from_tls(tls.accept(stream)?)
    }

    /// A channel on an established TLS stream.
    pub fn from_tls(s: TlsStream) -> Result<Self, AuthError> {
        let (conn, sock, peer, identity) = s.into_parts();
        Self::from_conn(conn, sock, peer, identity)
    }

    fn from_conn(
        mut conn: rustls::Connection,
        sock: TcpStream,
        peer: String,
        identity: Identity,
    ) -> Result<Self, AuthError> {
        // A peer that stops reading (frozen, or partitioned with the
        // connection open) fails a send within this long instead of
        // blocking it forever once the socket buffers are full.
        let _ = sock.set_write_timeout(Some(WRITE_TIMEOUT));
        conn.set_buffer_limit(None);
        // Plaintext the handshake's reads already decrypted (a request sent
        // right behind the handshake) is waiting in the connection.
        let st = conn
            .process_new_packets()
            .map_err(|source| AuthError::Tls {
                peer: peer.clone(),
                source,
            })?;
        let mut plain = vec![0u8; st.plaintext_bytes_to_read()];
        conn.reader()
            .read_exact(&mut plain)
            .map_err(io_err(&peer))?;
        let other = sock.try_clone().map_err(io_err(&peer))?;
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
        });
        Ok(Channel {
            r: ChannelReader {
                sock,
                shared: shared.clone(),
                peer: peer.clone(),
                plain,
                pos: 0,
                raw: vec![0u8; 64 << 10].into_boxed_slice(),
            },
            w: ChannelWriter {
                sock: other,
                shared,
                who: identity.to_string(),
                limit: WRITE_TIMEOUT,
                peer,
                sent_bytes: 0,
                acked_waiting: 0,
                out: Vec::new(),
            },
            identity,
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.r.peer
    }

    /// The peer's name, from its certificate.
    pub fn peer_name(&self) -> &str {
        &self.identity.name
    }

    /// The peer's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Sends one message.
    pub fn send<M: Message>(&mut self, m: &M) -> Result<(), AuthError> {
        self.w.send(m)
    }

    /// Sends one small message only if nothing sent before is still
    /// waiting for the peer's kernel ([`ChannelWriter::send_if_idle`]).
    pub fn send_if_idle<M: Message>(&mut self, m: &M) -> Result<bool, AuthError> {
        self.w.send_if_idle(m)
    }

    /// Receives one message.
    pub fn recv<M: Message + Default>(&mut self, what: &'static str) -> Result<M, AuthError> {
        self.r.recv(what)
    }

    /// Sets how long a receive may wait (`None`: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), AuthError> {
        self.r.set_read_timeout(t)
    }

    /// Whether a receive would find something at once (a frame or part of
    /// one), without waiting.
    pub fn readable(&self) -> bool {
        self.r.readable()
    }

    /// Whether a receive would find something within `within` (a frame or
    /// part of one), waiting at most that long.
    pub fn readable_within(&self, within: Duration) -> bool {
        self.r.readable_within(within)
    }

    /// Closes the connection both ways.
    pub fn shutdown(&self) {
        self.w.shutdown();
    }

    /// Sets how long one frame's send may take before the peer counts as
    /// stalled ([`WRITE_TIMEOUT`] unless set).
    pub fn set_write_limit(&mut self, limit: Duration) -> Result<(), AuthError> {
        self.w.limit = limit;
        self.w
            .sock
            .set_write_timeout(Some(limit))
            .map_err(io_err(&self.w.peer))
    }

    /// Bytes sent so far, on the wire.
    pub fn sent_bytes(&self) -> u64 {
        self.w.sent_bytes()
    }

    /// Splits into halves two threads can use at once.
    pub fn split(self) -> Result<(ChannelReader, ChannelWriter), AuthError> {
        Ok((self.r, self.w))
    }
}

/// What a watched send asks of its peer's kernel: at least `least` bytes
/// acknowledged over each `window` of waiting.
#[derive(Clone, Copy)]
struct Watch {
    window: Duration,
    least: usize,
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, rustls::Connection> {
    s.conn.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChannelWriter {
    /// Sends one message.
    pub fn send<M: Message>(&mut self, m: &M) -> Result<(), AuthError> {
        self.seal(m)?;
        // The socket write happens outside the lock, so the reader can go
        // on decrypting while a slow peer drains this.
        self.write_out(None)
    }

    /// Encrypts `m`'s frame into the records to write.
    fn seal<M: Message>(&mut self, m: &M) -> Result<(), AuthError> {
        let f = frame(m);
        self.sent_bytes += wire_bytes(f.len() - FRAME_HEAD);
        self.out.clear();
        let mut c = lock(&self.shared);
        c.writer().write_all(&f).map_err(io_err(&self.peer))?;
        while c.wants_write() {
            c.write_tls(&mut self.out).map_err(io_err(&self.peer))?;
        }
        Ok(())
    }

    /// Sends one small message (a keep-alive) only if every byte sent
    /// before has been acknowledged by the peer's kernel, so that it never
    /// waits: true if it went. A peer with bytes still on their way has
    /// something to read, and one that takes nothing (frozen, its buffers
    /// full) is not waited on.
    pub fn send_if_idle<M: Message>(&mut self, m: &M) -> Result<bool, AuthError> {
        if self.unacked_bytes()? > 0 {
            return Ok(false);
        }
        self.send(m)?;
        Ok(true)
    }

    /// Sends one message, giving the peer up once its kernel has taken
    /// nothing (acknowledged no byte) for `stall` while the send waits,
    /// and at this writer's own limit in all: for a word the caller sends
    /// to many in turn, where one peer that stopped reading must not hold
    /// the others up for long, while one that reads slowly still takes
    /// it. A send that fails leaves the connection mid-frame: close it.
    pub fn send_unless_stalled<M: Message>(
        &mut self,
        m: &M,
        stall: Duration,
    ) -> Result<(), AuthError> {
        self.send_unless_slow(m, stall, 1)
    }

    /// [`ChannelWriter::send_unless_stalled`], giving the peer up as
    /// [`AuthError::Slow`] once its kernel has acknowledged fewer than
    /// `least` bytes over a `window` of the send's waiting (`least` of 1:
    /// stalled, [`AuthError::Stalled`], when it took none). Each window is
    /// judged on its own, from the send's first wait on.
    pub fn send_unless_slow<M: Message>(
        &mut self,
        m: &M,
        window: Duration,
        least: usize,
    ) -> Result<(), AuthError> {
        self.seal(m)?;
        self.write_out(Some(Watch {
            window: window.max(Duration::from_millis(1)),
            least: least.max(1),
        }))
    }

    /// Writes the frame's records within the write timeout for the whole
    /// frame: a frozen peer's kernel still takes a few bytes now and then,
    /// and a timeout per write call would let each trickle start it anew
    /// (a frozen destination once held a send 40 s). With a `watch` whose
    /// window is below that limit, it also fails once the peer's kernel
    /// took less than asked over a window of waiting.
    fn write_out(&mut self, watch: Option<Watch>) -> Result<(), AuthError> {
        let started = std::time::Instant::now();
        let watch = watch.filter(|w| w.window < self.limit);
        // Woken this often to look at what the peer's kernel took; only
        // at the limit when nothing is watched.
        let look = watch.map_or(self.limit, |w| (w.window / 4).max(Duration::from_millis(1)));
        let mut narrowed = watch.is_some();
        if narrowed {
            let _ = self.sock.set_write_timeout(Some(look));
        }
        // Where the window being judged began: the bytes queued then, how
        // much of the frame was written, and when (`None` until the first
        // wait).
        let mut since: Option<(usize, usize, std::time::Instant)> = None;
        // The bytes queued as a watched send starts, to count what the peer
        // took while it waited.
        let queued = watch.and_then(|_| outq(&self.sock).ok());
        let mut off = 0;
        let result = loop {
            if off == self.out.len() {
                break Ok(());
            }
            match self.sock.write(&self.out[off..]) {
                Ok(0) => {
                    break Err(AuthError::Closed {
                        peer: self.peer.clone(),
                    });
                }
                Ok(n) => {
                    off += n;
                    // A write cut short found the buffers full: the send
                    // waits, so a window starts, and one that is over ends
                    // (a write that takes some bytes before its timeout
                    // comes back this way, not as a timeout).
                    if let Some(w) = watch
                        && off < self.out.len()
                        && since.is_none_or(|(_, _, t0)| t0.elapsed() >= w.window)
                        && let Err(e) = self.judge(w, &mut since, off)
                    {
                        break Err(e);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(w) = watch
                        && let Err(e) = self.judge(w, &mut since, off)
                    {
                        break Err(e);
                    }
                }
                Err(e) => break Err(io_err(&self.peer)(e)),
            }
            if off == self.out.len() {
                continue;
            }
            // What is left of the frame's time bounds the next wait.
            let left = self.limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                break Err(self.stalled());
            }
            let _ = self.sock.set_write_timeout(Some(look.min(left)));
            narrowed = true;
        };
        if narrowed {
            let _ = self.sock.set_write_timeout(Some(self.limit));
        }
        if result.is_ok()
            && started.elapsed() >= look
            && let Some(q0) = queued
            && let Ok(q) = outq(&self.sock)
        {
            self.acked_waiting += (q0 + off).saturating_sub(q) as u64;
        }
        result
    }

    /// Looks at what the peer's kernel took since the window being judged
    /// began (`since`: the bytes queued then, how much of the frame was
    /// written, and when; `None`: this starts one), `off` bytes of the
    /// frame written now: fails once a window is over in which it took
    /// less than `w` asks, else starts the next.
    fn judge(
        &self,
        w: Watch,
        since: &mut Option<(usize, usize, std::time::Instant)>,
        off: usize,
    ) -> Result<(), AuthError> {
        let q = outq(&self.sock).map_err(io_err(&self.peer))?;
        match *since {
            None => *since = Some((q, off, std::time::Instant::now())),
            Some((q0, off0, t0)) if t0.elapsed() >= w.window => {
                // Acknowledged: what was queued, plus what was written
                // since, less what still is.
                let took = (q0 + (off - off0)).saturating_sub(q);
                if took < w.least {
                    return Err(self.too_slow(w, took));
                }
                *since = Some((q, off, std::time::Instant::now()));
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The error for a peer that took `took` bytes over a window of
    /// `w`: stalled if none, slow if some.
    fn too_slow(&self, w: Watch, took: usize) -> AuthError {
        if took == 0 {
            return self.stalled_after(w.window);
        }
        AuthError::Slow {
            peer: self.peer.clone(),
            who: self.who.clone(),
            took,
            over: w.window,
            least: w.least,
        }
    }

    /// Bytes sent on this connection that the peer's kernel has not yet
    /// acknowledged (queued here or in flight).
    pub fn unacked_bytes(&self) -> Result<usize, AuthError> {
        outq(&self.sock).map_err(io_err(&self.peer))
    }

    /// Waits until the peer's kernel has acknowledged every byte sent: a
    /// sender that must know its frames reached the peer, not only its
    /// own socket buffer, before it starts a clock on the peer's answer.
    /// Fails as stalled when that takes longer than `within` (what is
    /// left is at most the socket buffers, so the caller can bound it by
    /// the slowest pace it accepts).
    pub fn drain(&mut self, within: Duration) -> Result<(), AuthError> {
        let started = std::time::Instant::now();
        while self.unacked_bytes()? > 0 {
            if started.elapsed() >= within {
                return Err(self.stalled_after(within));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn stalled(&self) -> AuthError {
        self.stalled_after(self.limit)
    }

    fn stalled_after(&self, after: Duration) -> AuthError {
        AuthError::Stalled {
            peer: self.peer.clone(),
            who: self.who.clone(),
            after,
        }
    }

    /// Bytes sent so far, framing and TLS records included.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    /// Bytes the peer's kernel acknowledged, so far, during watched sends
    /// that succeeded after waiting a quarter of their window or more:
    /// what a peer took while it held sends up.
    pub fn acked_while_waiting(&self) -> u64 {
        self.acked_waiting
    }

    /// Closes the connection both ways (the reader too).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// A handle that closes this connection from another thread, while
    /// this writer sends (a send blocked on a peer that stopped reading
    /// then fails at once, not at its write limit).
    pub fn closer(&self) -> Result<Closer, AuthError> {
        self.sock
            .try_clone()
            .map(Closer)
            .map_err(io_err(&self.peer))
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl ChannelReader {
    /// Receives one message. With a read timeout set, the frame's head
    /// must come within it, and then the whole frame within it plus a
    /// second for every [`SLOWEST_FRAME_PACE`] bytes, or the receive fails
    /// as timed out
    /// (an I/O error of kind `WouldBlock`, as a read that timed out). What
    /// arrived of the frame is kept: a later receive goes on with it.
    pub fn recv<M: Message + Default>(&mut self, what: &'static str) -> Result<M, AuthError> {
        let timeout = self.sock.read_timeout().map_err(io_err(&self.peer))?;
        let by = |bytes: usize| {
            let started = std::time::Instant::now();
            timeout.map(|t| FrameDeadline {
                at: started + t + pace_allowance(bytes),
                timeout: t,
                bytes,
            })
        };
        self.want(FRAME_HEAD, by(FRAME_HEAD))?;
        let head: [u8; FRAME_HEAD] = self.plain[self.pos..self.pos + FRAME_HEAD]
            .try_into()
            .expect("4 bytes");
        let len = frame_len(head, &self.peer)?;
        // The body's time runs from its head's arrival: waiting for a
        // frame to start is the read timeout's alone.
        self.want(FRAME_HEAD + len, by(FRAME_HEAD + len))?;
        let body = &self.plain[self.pos + FRAME_HEAD..self.pos + FRAME_HEAD + len];
        let m = decode(&self.peer, what, body);
        self.pos += FRAME_HEAD + len;
        m
    }

    /// Sets how long a receive may wait (`None`: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), AuthError> {
        self.sock.set_read_timeout(t).map_err(io_err(&self.peer))
    }

    /// Whether a receive would find something at once (a frame or part of
    /// one), without waiting.
    pub fn readable(&self) -> bool {
        self.readable_within(Duration::ZERO)
    }

    /// Whether a receive would find something within `within` (a frame or
    /// part of one), waiting at most that long.
    pub fn readable_within(&self, within: Duration) -> bool {
        if self.plain.len() > self.pos {
            return true;
        }
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.sock),
            events: libc::POLLIN,
            revents: 0,
        };
        let by = std::time::Instant::now() + within;
        loop {
            let left = by.saturating_duration_since(std::time::Instant::now());
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call, which
            // waits at most `ms` and writes only its `revents`.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            // A signal is no answer: wait out the rest.
            if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return r > 0;
        }
    }

    /// Reads and decrypts until `n` plaintext bytes are buffered, by
    /// `deadline` if there is one.
    fn want(&mut self, n: usize, deadline: Option<FrameDeadline>) -> Result<(), AuthError> {
        if self.pos > 0 && self.plain.len() - self.pos < n {
            self.plain.drain(..self.pos);
            self.pos = 0;
        }
        while self.plain.len() - self.pos < n {
            if let Some(d) = deadline {
                d.wait_readable(&self.sock).map_err(io_err(&self.peer))?;
            }
            let got = match self.sock.read(&mut self.raw) {
                Ok(0) => {
                    return Err(AuthError::Closed {
                        peer: self.peer.clone(),
                    });
                }
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(&self.peer)(e)),
            };
            let mut c = lock(&self.shared);
            let mut input = &self.raw[..got];
            while !input.is_empty() {
                c.read_tls(&mut input).map_err(io_err(&self.peer))?;
                let st = c.process_new_packets().map_err(|source| AuthError::Tls {
                    peer: self.peer.clone(),
                    source,
                })?;
                let k = st.plaintext_bytes_to_read();
                if k > 0 {
                    let at = self.plain.len();
                    self.plain.resize(at + k, 0);
                    c.reader()
                        .read_exact(&mut self.plain[at..])
                        .map_err(io_err(&self.peer))?;
                }
                if st.peer_has_closed() && self.plain.len() - self.pos < n {
                    return Err(AuthError::Closed {
                        peer: self.peer.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// When a frame being received must have arrived.
#[derive(Clone, Copy)]
struct FrameDeadline {
    at: std::time::Instant,
    /// The connection's read timeout.
    timeout: Duration,
    /// The frame's bytes so far known (its head, then all of it).
    bytes: usize,
}

/// What [`SLOWEST_FRAME_PACE`] allows `bytes` on top of the read timeout.
fn pace_allowance(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 / SLOWEST_FRAME_PACE as f64)
}

impl FrameDeadline {
    /// Waits until `sock` has something to read, failing as a read that
    /// timed out once the deadline has passed. While more than the read
    /// timeout is left, the read itself waits (its timeout comes first).
    fn wait_readable(&self, sock: &TcpStream) -> std::io::Result<()> {
        let late = || {
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "a frame of {} bytes did not arrive within its {:?} \
                     (the read timeout, {:?}, and a second for every {} KiB: \
                     is the peer trickling it?)",
                    self.bytes,
                    self.timeout + pace_allowance(self.bytes),
                    self.timeout,
                    SLOWEST_FRAME_PACE >> 10
                ),
            )
        };
        loop {
            let left = self.at.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(late());
            }
            if left >= self.timeout {
                return Ok(());
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(sock),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up, so that a wait never ends just short of the
            // deadline and polls again for nothing.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call, which
            // waits at most `ms` and writes only its `revents`.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(());
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
