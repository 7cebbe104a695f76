//! The cluster secret, mutual authentication of TCP control connections,
//! and the authenticated frames that follow.
//!
//! Every agent, CLI and peer holds the same cluster secret (a file). A
//! connection starts with a challenge-response handshake (see
//! `proto/proto/pagecast/v1/auth.proto`): each side proves knowledge of the
//! secret with a BLAKE3 keyed hash over both random nonces and both names,
//! compared in constant time, so a peer without the secret is refused and a
//! recorded handshake cannot be replayed. Both sides then derive one frame
//! key per direction from the secret and the nonces.
//!
//! After the handshake every frame is
//! `[u32 length][u64 sequence][payload][16-byte MAC]`, the MAC a BLAKE3
//! keyed hash over length, sequence and payload. A frame whose MAC does not
//! verify, whose sequence is not the next one, or whose length exceeds
//! [`MAX_CONTROL_FRAME_BYTES`] ends the connection with an error naming the
//! problem. Frames are authenticated, not encrypted; keys handed over them
//! (a session key) are wrapped with a pad derived from the connection keys.
//!
//! The handshake ([`ClientHandshake`], [`ServerHandshake`]) and the frame
//! layer ([`FrameKey`]) do no I/O, so a blocking connection ([`Channel`])
//! and an asynchronous one (`AsyncChannel`, feature `tokio`, the agent's
//! accept loop) share them.
//!
//! Agents, migrations between agents and cast control connections use this
//! channel. The content index speaks its own framed protocol
//! (`dedup-index/src/wire.rs`), not yet authenticated.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use pagecast_proto::{MAC_LEN, MAX_CONTROL_FRAME_BYTES, WIRE_VERSION, v1};
use prost::Message;

#[cfg(feature = "tokio")]
mod asynch;
#[cfg(feature = "tokio")]
pub use asynch::AsyncChannel;

/// Largest handshake frame.
pub const MAX_HANDSHAKE_BYTES: usize = 1024;
/// Bytes of a nonce.
const NONCE_LEN: usize = 32;
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one send may block on a peer that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an authenticated frame's head (length and sequence).
pub const FRAME_HEAD: usize = 12;
/// Errors of the cluster secret and authenticated channels.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The secret file could not be read.
    #[error("{}: cannot read the cluster secret: {source}", path.display())]
    SecretRead {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The secret file is too short or too long.
    #[error("{}: a cluster secret must be 16 to 4096 bytes, this one is {len}", path.display())]
    SecretSize {
        /// The file.
        path: std::path::PathBuf,
        /// Its length.
        len: u64,
    },
    /// A new secret file could not be written.
    #[error("{}: cannot write a new cluster secret: {source}", path.display())]
    SecretWrite {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The OS random source failed.
    #[error("the system random source failed: {0}")]
    Random(String),
    /// I/O on the connection failed.
    #[error("control connection to {peer}: {source}")]
    Io {
        /// The peer's address.
        peer: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("control connection to {peer} closed")]
    Closed {
        /// The peer's address.
        peer: String,
    },
    /// A frame longer than allowed.
    #[error("control connection to {peer}: frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The peer's address.
        peer: String,
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame that does not decode.
    #[error("control connection to {peer}: malformed {what}: {why}")]
    Malformed {
        /// The peer's address.
        peer: String,
        /// What was expected.
        what: &'static str,
        /// The decoder's message.
        why: String,
    },
    /// A protocol version this build does not speak.
    #[error(
        "control connection to {peer}: wire version {got} is not supported (this build speaks 1)"
    )]
    Version {
        /// The peer's address.
        peer: String,
        /// The version received.
        got: i32,
    },
    /// The peer's proof is wrong: it does not hold the cluster secret.
    #[error("control connection to {peer}: authentication failed: {why}")]
    Refused {
        /// The peer's address.
        peer: String,
        /// Which side failed and how.
        why: String,
    },
    /// A frame whose MAC does not verify.
    #[error("control connection to {peer}: frame {seq} fails authentication (forged or corrupted)")]
    BadMac {
        /// The peer's address.
        peer: String,
        /// Its sequence number.
        seq: u64,
    },
    /// A frame out of sequence (replayed, dropped or reordered).
    #[error(
        "control connection to {peer}: frame sequence {got}, expected {want} (replayed or reordered)"
    )]
    Sequence {
        /// The peer's address.
        peer: String,
        /// Received.
        got: u64,
        /// Expected.
        want: u64,
    },
}

/// The cluster secret.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Fills `buf` from the OS random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), AuthError> {
    getrandom::fill(buf).map_err(|e| AuthError::Random(e.to_string()))
}

impl Secret {
    /// Derives the secret from any bytes (the contents of a secret file).
    pub fn from_material(material: &[u8]) -> Self {
        Secret(blake3::derive_key("pagecast cluster secret v1", material))
    }

    /// Reads a secret file: 16 to 4096 bytes of anything (a new one holds
    /// 64 random hex digits).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let read_err = |source| AuthError::SecretRead {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if !(16..=4096).contains(&len) {
            return Err(AuthError::SecretSize {
                path: path.to_owned(),
                len,
            });
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        Ok(Self::from_material(bytes.trim_ascii()))
    }

    /// Writes a new random secret file readable only by its owner; refuses
    /// to overwrite an existing file.
    pub fn create_file(path: &Path) -> Result<(), AuthError> {
        let mut raw = [0u8; 32];
        random_bytes(&mut raw)?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let werr = |source| AuthError::SecretWrite {
            path: path.to_owned(),
            source,
        };
        let mut f = opts.open(path).map_err(werr)?;
        f.write_all(format!("{hex}\n").as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)
    }

    fn mac(&self, parts: &[&[u8]]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in parts {
            h.update(&(p.len() as u64).to_be_bytes());
            h.update(p);
        }
        h.finalize()
    }

    fn derive(&self, context: &str, nonce_c: &[u8], nonce_s: &[u8]) -> [u8; 32] {
        let mut material = Vec::with_capacity(96);
        material.extend_from_slice(&self.0);
        material.extend_from_slice(nonce_c);
        material.extend_from_slice(nonce_s);
        blake3::derive_key(context, &material)
    }
}

/// What a server tells a client whose proof failed with `e`.
pub fn refusal(e: &AuthError) -> v1::AuthResult {
    let reason = match e {
        AuthError::Refused { why, .. } => why.clone(),
        other => other.to_string(),
    };
    v1::AuthResult { ok: false, reason }
}

/// Maps an I/O error on the connection to `peer`: end of stream is
/// [`AuthError::Closed`], anything else [`AuthError::Io`]. Shared by every
/// channel implementation, blocking or async.
pub fn io_err(peer: &str) -> impl Fn(std::io::Error) -> AuthError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            AuthError::Closed {
                peer: peer.to_owned(),
            }
        } else {
            AuthError::Io {
                peer: peer.to_owned(),
                source,
            }
        }
    }
}

/// A handshake message framed for the wire: `[u32 length][protobuf]`.
pub fn plain_frame<M: Message>(m: &M) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    buf
}

/// The body length a handshake frame's 4-byte head announces, if allowed.
pub fn plain_len(head: [u8; 4], peer: &str) -> Result<usize, AuthError> {
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_HANDSHAKE_BYTES {
        return Err(AuthError::TooLarge {
            peer: peer.to_owned(),
            len,
            max: MAX_HANDSHAKE_BYTES,
        });
    }
    Ok(len)
}

/// Decodes a handshake message body.
pub fn plain_decode<M: Message + Default>(
    body: &[u8],
    peer: &str,
    what: &'static str,
) -> Result<M, AuthError> {
    decode(peer, what, body)
}

fn write_plain<M: Message>(s: &mut TcpStream, peer: &str, m: &M) -> Result<(), AuthError> {
    s.write_all(&plain_frame(m)).map_err(io_err(peer))
}

fn read_plain<M: Message + Default>(
    s: &mut TcpStream,
    peer: &str,
    what: &'static str,
) -> Result<M, AuthError> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).map_err(io_err(peer))?;
    let mut body = vec![0u8; plain_len(head, peer)?];
    s.read_exact(&mut body).map_err(io_err(peer))?;
    plain_decode(&body, peer, what)
}

fn check_version(peer: &str, v: i32) -> Result<(), AuthError> {
    if v == WIRE_VERSION as i32 {
        Ok(())
    } else {
        Err(AuthError::Version {
            peer: peer.to_owned(),
            got: v,
        })
    }
}

fn nonce_of(peer: &str, b: &[u8]) -> Result<[u8; NONCE_LEN], AuthError> {
    b.try_into().map_err(|_| AuthError::Malformed {
        peer: peer.to_owned(),
        what: "nonce",
        why: format!("{} bytes, expected {NONCE_LEN}", b.len()),
    })
}

fn decode<M: Message + Default>(peer: &str, what: &'static str, b: &[u8]) -> Result<M, AuthError> {
    M::decode(b).map_err(|e| AuthError::Malformed {
        peer: peer.to_owned(),
        what,
        why: e.to_string(),
    })
}

fn same(a: &[u8], b: blake3::Hash) -> bool {
    // blake3::Hash compares in constant time.
    let a: [u8; 32] = a.try_into().unwrap_or([0; 32]);
    blake3::Hash::from(a) == b
}

/// What an authenticated connection keeps: a frame key per direction, the
/// key-wrapping pad and the peer's name.
pub struct Established {
    /// Seals frames we send.
    pub send: FrameKey,
    /// Opens frames we receive.
    pub recv: FrameKey,
    /// Pad that wraps keys sent over this connection.
    pub pad: [u8; 32],
    /// The name the peer gave.
    pub peer_name: String,
}

impl Established {
    /// Wraps (or unwraps: XOR is its own inverse) a 32-byte key for this
    /// connection only.
    pub fn wrap_key(&self, key: &[u8; 32]) -> [u8; 32] {
        xor_pad(key, &self.pad)
    }
}

fn xor_pad(key: &[u8; 32], pad: &[u8; 32]) -> [u8; 32] {
    let mut out = *key;
    for (o, p) in out.iter_mut().zip(pad) {
        *o ^= p;
    }
    out
}

/// The client's side of a handshake: send [`ClientHandshake::hello`]'s
/// message, then pass the server's challenge to
/// [`ClientHandshake::answer`], send the proof it returns and read the
/// server's [`v1::AuthResult`].
pub struct ClientHandshake {
    nonce: [u8; NONCE_LEN],
    name: String,
}

impl ClientHandshake {
    /// Starts a handshake as `name`.
    pub fn hello(name: &str) -> Result<(Self, v1::AuthHello), AuthError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let hello = v1::AuthHello {
            version: WIRE_VERSION as i32,
            nonce: nonce.to_vec().into(),
            name: name.to_owned(),
        };
        Ok((
            ClientHandshake {
                nonce,
                name: name.to_owned(),
            },
            hello,
        ))
    }

    /// Checks the server's proof and answers with ours.
    pub fn answer(
        self,
        secret: &Secret,
        peer: &str,
        ch: &v1::AuthChallenge,
    ) -> Result<(v1::AuthProof, Established), AuthError> {
        check_version(peer, ch.version)?;
        let nonce_s = nonce_of(peer, &ch.nonce)?;
        let (c, s, n) = (&self.nonce, &nonce_s, self.name.as_bytes());
        if !same(
            &ch.proof,
            secret.mac(&[b"server", c, s, n, ch.name.as_bytes()]),
        ) {
            return Err(AuthError::Refused {
                peer: peer.to_owned(),
                why: "the server does not know the cluster secret".into(),
            });
        }
        let proof = secret.mac(&[b"client", c, s, n, ch.name.as_bytes()]);
        Ok((
            v1::AuthProof {
                proof: proof.as_bytes().to_vec().into(),
            },
            Established {
                send: FrameKey::new(secret.derive("pagecast control c2s v1", c, s)),
                recv: FrameKey::new(secret.derive("pagecast control s2c v1", c, s)),
                pad: secret.derive("pagecast key wrap v1", c, s),
                peer_name: ch.name.clone(),
            },
        ))
    }
}

/// The server's side of a handshake: answer the client's hello with
/// [`ServerHandshake::challenge`], then check its proof with
/// [`ServerHandshake::check`] and send the [`v1::AuthResult`].
pub struct ServerHandshake {
    nonce_c: [u8; NONCE_LEN],
    nonce_s: [u8; NONCE_LEN],
    client: String,
    name: String,
}

impl ServerHandshake {
    /// Answers a client's hello as `name`.
    pub fn challenge(
        secret: &Secret,
        peer: &str,
        name: &str,
        hello: &v1::AuthHello,
    ) -> Result<(Self, v1::AuthChallenge), AuthError> {
        check_version(peer, hello.version)?;
        let nonce_c = nonce_of(peer, &hello.nonce)?;
        let mut nonce_s = [0u8; NONCE_LEN];
        random_bytes(&mut nonce_s)?;
        let proof = secret.mac(&[
            b"server",
            &nonce_c,
            &nonce_s,
            hello.name.as_bytes(),
            name.as_bytes(),
        ]);
        Ok((
            ServerHandshake {
                nonce_c,
                nonce_s,
                client: hello.name.clone(),
                name: name.to_owned(),
            },
            v1::AuthChallenge {
                version: WIRE_VERSION as i32,
                nonce: nonce_s.to_vec().into(),
                name: name.to_owned(),
                proof: proof.as_bytes().to_vec().into(),
            },
        ))
    }

    /// Checks the client's proof.
    pub fn check(
        self,
        secret: &Secret,
        peer: &str,
        p: &v1::AuthProof,
    ) -> Result<Established, AuthError> {
        let (c, s) = (&self.nonce_c, &self.nonce_s);
        if !same(
            &p.proof,
            secret.mac(&[
                b"client",
                c,
                s,
                self.client.as_bytes(),
                self.name.as_bytes(),
            ]),
        ) {
            return Err(AuthError::Refused {
                peer: peer.to_owned(),
                why: "the client does not know the cluster secret".into(),
            });
        }
        Ok(Established {
            send: FrameKey::new(secret.derive("pagecast control s2c v1", c, s)),
            recv: FrameKey::new(secret.derive("pagecast control c2s v1", c, s)),
            pad: secret.derive("pagecast key wrap v1", c, s),
            peer_name: self.client,
        })
    }
}

/// One direction of an authenticated connection: its key and the next
/// sequence number.
pub struct FrameKey {
    key: [u8; 32],
    seq: u64,
}

impl FrameKey {
    /// A key starting at sequence 0.
    pub fn new(key: [u8; 32]) -> Self {
        FrameKey { key, seq: 0 }
    }

    /// The frame carrying `payload` (and advances the sequence).
    pub fn seal(&mut self, peer: &str, payload: &[u8]) -> Result<Vec<u8>, AuthError> {
        if payload.len() > MAX_CONTROL_FRAME_BYTES {
            return Err(AuthError::TooLarge {
                peer: peer.to_owned(),
                len: payload.len(),
                max: MAX_CONTROL_FRAME_BYTES,
            });
        }
        let buf = encode_frame(&self.key, self.seq, payload);
        self.seq += 1;
        Ok(buf)
    }

    /// How many bytes follow a frame's head (payload and MAC), after
    /// checking the length it announces.
    pub fn rest_len(head: &[u8; FRAME_HEAD], peer: &str) -> Result<usize, AuthError> {
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if !(8..=8 + MAX_CONTROL_FRAME_BYTES).contains(&len) {
            return Err(AuthError::TooLarge {
                peer: peer.to_owned(),
                len,
                max: MAX_CONTROL_FRAME_BYTES,
            });
        }
        Ok(len - 8 + MAC_LEN)
    }

    /// Checks a frame (its head and the `rest` after it) and returns its
    /// payload: the MAC must verify and the sequence be the next one.
    pub fn open(
        &mut self,
        head: &[u8; FRAME_HEAD],
        mut rest: Vec<u8>,
        peer: &str,
    ) -> Result<Vec<u8>, AuthError> {
        let seq = u64::from_be_bytes(head[4..].try_into().expect("8 bytes"));
        if rest.len() < MAC_LEN {
            return Err(AuthError::TooLarge {
                peer: peer.to_owned(),
                len: rest.len(),
                max: MAX_CONTROL_FRAME_BYTES,
            });
        }
        let body = rest.len() - MAC_LEN;
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(head);
        h.update(&rest[..body]);
        let want = h.finalize();
        let mut got = [0u8; 32];
        got[..MAC_LEN].copy_from_slice(&rest[body..]);
        let mut expect = [0u8; 32];
        expect[..MAC_LEN].copy_from_slice(&want.as_bytes()[..MAC_LEN]);
        // Constant-time comparison of the MAC.
        if blake3::Hash::from(got) != blake3::Hash::from(expect) {
            return Err(AuthError::BadMac {
                peer: peer.to_owned(),
                seq,
            });
        }
        if seq != self.seq {
            return Err(AuthError::Sequence {
                peer: peer.to_owned(),
                got: seq,
                want: self.seq,
            });
        }
        self.seq += 1;
        rest.truncate(body);
        Ok(rest)
    }
}

fn encode_frame(key: &[u8; 32], seq: u64, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u32;
    let mut buf = Vec::with_capacity(4 + len as usize + MAC_LEN);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(payload);
    let mac = blake3::keyed_hash(key, &buf);
    buf.extend_from_slice(&mac.as_bytes()[..MAC_LEN]);
    buf
}

fn send_frame(
    stream: &mut TcpStream,
    peer: &str,
    keys: &mut FrameKey,
    payload: &[u8],
) -> Result<(), AuthError> {
    let buf = keys.seal(peer, payload)?;
    stream.write_all(&buf).map_err(io_err(peer))
}

fn recv_frame(
    stream: &mut impl Read,
    peer: &str,
    keys: &mut FrameKey,
) -> Result<Vec<u8>, AuthError> {
    let mut head = [0u8; FRAME_HEAD];
    stream.read_exact(&mut head).map_err(io_err(peer))?;
    let mut rest = vec![0u8; FrameKey::rest_len(&head, peer)?];
    stream.read_exact(&mut rest).map_err(io_err(peer))?;
    keys.open(&head, rest, peer)
}

/// Decodes authenticated frames from a byte stream, as a [`Channel`] does
/// after its handshake: for tests and fuzzing of the frame layer.
pub struct FrameDecoder {
    keys: FrameKey,
}

impl FrameDecoder {
    /// A decoder expecting frames under `key`, starting at sequence 0.
    pub fn new(key: [u8; 32]) -> Self {
        FrameDecoder {
            keys: FrameKey::new(key),
        }
    }

    /// Reads and checks the next frame's payload from `input`.
    pub fn next(&mut self, input: &mut impl Read) -> Result<Vec<u8>, AuthError> {
        recv_frame(input, "input", &mut self.keys)
    }

    /// Encodes a frame under `key` with sequence `seq` (the sending side).
    pub fn encode(key: [u8; 32], seq: u64, payload: &[u8]) -> Vec<u8> {
        encode_frame(&key, seq, payload)
    }
}

/// An authenticated, framed control connection (blocking).
pub struct Channel {
    stream: TcpStream,
    peer: String,
    peer_name: String,
    send: FrameKey,
    recv: FrameKey,
    pad: [u8; 32],
}

/// The sending half of a [`Channel`] (see [`Channel::split`]).
pub struct ChannelWriter {
    stream: TcpStream,
    peer: String,
    send: FrameKey,
    pad: [u8; 32],
    sent_bytes: u64,
}

/// The receiving half of a [`Channel`].
pub struct ChannelReader {
    stream: TcpStream,
    peer: String,
    recv: FrameKey,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.peer)
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// A channel over a stream whose handshake another layer completed (an
    /// asynchronous server handing a connection to blocking work).
    pub fn from_established(stream: TcpStream, peer: String, e: Established) -> Self {
        Self::from_parts(stream, peer, e)
    }

    fn from_parts(stream: TcpStream, peer: String, e: Established) -> Self {
        // A peer that stops reading (frozen, or partitioned with the
        // connection open) fails a send within this long instead of
        // blocking it forever once the socket buffers are full.
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        Channel {
            stream,
            peer,
            peer_name: e.peer_name,
            send: e.send,
            recv: e.recv,
            pad: e.pad,
        }
    }

    /// Authenticates as a client on `stream`.
    pub fn client(mut stream: TcpStream, secret: &Secret, name: &str) -> Result<Self, AuthError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io_err(&peer))?;
        let (hs, hello) = ClientHandshake::hello(name)?;
        write_plain(&mut stream, &peer, &hello)?;
        let ch: v1::AuthChallenge = read_plain(&mut stream, &peer, "challenge")?;
        let (proof, est) = hs.answer(secret, &peer, &ch)?;
        write_plain(&mut stream, &peer, &proof)?;
        let res: v1::AuthResult = read_plain(&mut stream, &peer, "authentication result")?;
        if !res.ok {
            return Err(AuthError::Refused {
                peer,
                why: res.reason,
            });
        }
        stream.set_read_timeout(None).map_err(io_err(&peer))?;
        Ok(Self::from_parts(stream, peer, est))
    }

    /// Authenticates as a server on an accepted `stream`. A client that
    /// fails is told why and gets an error here.
    pub fn server(mut stream: TcpStream, secret: &Secret, name: &str) -> Result<Self, AuthError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io_err(&peer))?;
        let hello: v1::AuthHello = read_plain(&mut stream, &peer, "hello")?;
        let (hs, ch) = ServerHandshake::challenge(secret, &peer, name, &hello)?;
        write_plain(&mut stream, &peer, &ch)?;
        let p: v1::AuthProof = read_plain(&mut stream, &peer, "proof")?;
        let est = match hs.check(secret, &peer, &p) {
            Ok(e) => e,
            Err(e) => {
                let _ = write_plain(&mut stream, &peer, &refusal(&e));
                return Err(e);
            }
        };
        write_plain(
            &mut stream,
            &peer,
            &v1::AuthResult {
                ok: true,
                reason: String::new(),
            },
        )?;
        stream.set_read_timeout(None).map_err(io_err(&peer))?;
        Ok(Self::from_parts(stream, peer, est))
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The name the peer gave in the handshake.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// Sends one message.
    pub fn send<M: Message>(&mut self, m: &M) -> Result<(), AuthError> {
        send_frame(
            &mut self.stream,
            &self.peer,
            &mut self.send,
            &m.encode_to_vec(),
        )
    }

    /// Receives one message (blocking; see [`Channel::set_read_timeout`]).
    pub fn recv<M: Message + Default>(&mut self, what: &'static str) -> Result<M, AuthError> {
        let b = recv_frame(&mut self.stream, &self.peer, &mut self.recv)?;
        decode(&self.peer, what, &b)
    }

    /// Bounds how long [`Channel::recv`] waits.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), AuthError> {
        self.stream.set_read_timeout(t).map_err(io_err(&self.peer))
    }

    /// Wraps (or unwraps: XOR is its own inverse) a 32-byte key for this
    /// connection only.
    pub fn wrap_key(&self, key: &[u8; 32]) -> [u8; 32] {
        xor_pad(key, &self.pad)
    }

    /// Shuts the connection down in both directions.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Splits into halves usable from two threads.
    pub fn split(self) -> Result<(ChannelReader, ChannelWriter), AuthError> {
        let other = self.stream.try_clone().map_err(io_err(&self.peer))?;
        Ok((
            ChannelReader {
                stream: self.stream,
                peer: self.peer.clone(),
                recv: self.recv,
            },
            ChannelWriter {
                stream: other,
                peer: self.peer,
                send: self.send,
                pad: self.pad,
                sent_bytes: 0,
            },
        ))
    }
}

impl ChannelWriter {
    /// Sends one message.
    pub fn send<M: Message>(&mut self, m: &M) -> Result<(), AuthError> {
        let payload = m.encode_to_vec();
        self.sent_bytes += (FRAME_HEAD + payload.len() + MAC_LEN) as u64;
        send_frame(&mut self.stream, &self.peer, &mut self.send, &payload)
    }

    /// Bytes sent through this half so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    /// Wraps (or unwraps) a 32-byte key for this connection only; see
    /// [`Channel::wrap_key`].
    pub fn wrap_key(&self, key: &[u8; 32]) -> [u8; 32] {
        xor_pad(key, &self.pad)
    }

    /// Shuts the connection down in both directions (wakes the reader).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl ChannelReader {
    /// Receives one message.
    pub fn recv<M: Message + Default>(&mut self, what: &'static str) -> Result<M, AuthError> {
        let b = recv_frame(&mut self.stream, &self.peer, &mut self.recv)?;
        decode(&self.peer, what, &b)
    }

    /// Bounds how long [`ChannelReader::recv`] waits.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), AuthError> {
        self.stream.set_read_timeout(t).map_err(io_err(&self.peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        server_secret: Secret,
        client_secret: Secret,
    ) -> (Result<Channel, AuthError>, Result<Channel, AuthError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            Channel::server(s, &server_secret, "srv")
        });
        let c = Channel::client(TcpStream::connect(addr).unwrap(), &client_secret, "cli");
        (t.join().unwrap(), c)
    }

    #[test]
    fn authenticated_frames_flow_both_ways() {
        let s = Secret::from_material(b"correct horse battery staple");
        let (srv, cli) = pair(s.clone(), s);
        let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
        assert_eq!(srv.peer_name(), "cli");
        assert_eq!(cli.peer_name(), "srv");
        let m = v1::CastProgress {
            group: 1,
            contiguous: 2,
            held: 3,
        };
        cli.send(&m).unwrap();
        assert_eq!(srv.recv::<v1::CastProgress>("progress").unwrap(), m);
        srv.send(&m).unwrap();
        assert_eq!(cli.recv::<v1::CastProgress>("progress").unwrap(), m);
        let key = [7u8; 32];
        assert_eq!(
            cli.wrap_key(&srv.wrap_key(&key)),
            key,
            "both ends share the pad"
        );
        assert_ne!(srv.wrap_key(&key), key);
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides() {
        let (srv, cli) = pair(
            Secret::from_material(b"the real secret!"),
            Secret::from_material(b"a guessed secret"),
        );
        let (srv, cli) = (srv.unwrap_err().to_string(), cli.unwrap_err().to_string());
        assert!(
            srv.contains("authentication failed") || srv.contains("closed"),
            "{srv}"
        );
        assert!(
            cli.contains("server does not know the cluster secret"),
            "{cli}"
        );
    }

    #[test]
    fn forged_replayed_and_oversized_frames_are_refused() {
        let s = Secret::from_material(b"correct horse battery staple");
        let (srv, cli) = pair(s.clone(), s.clone());
        let (mut srv, cli) = (srv.unwrap(), cli.unwrap());
        let mut raw = cli.stream.try_clone().unwrap();
        // A frame with a MAC under the wrong key.
        let mut bad = FrameKey {
            key: [1; 32],
            seq: 0,
        };
        send_frame(&mut raw, "x", &mut bad, b"hello").unwrap();
        let e = srv
            .recv::<v1::CastProgress>("progress")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fails authentication"), "{e}");

        let (srv, cli) = pair(s.clone(), s.clone());
        let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
        // Replay: the same sequence number twice.
        let mut copy = FrameKey {
            key: cli.send.key,
            seq: 0,
        };
        cli.send(&v1::CastProbe { nonce: 1 }).unwrap();
        srv.recv::<v1::CastProbe>("probe").unwrap();
        send_frame(
            &mut cli.stream,
            "x",
            &mut copy,
            &v1::CastProbe { nonce: 1 }.encode_to_vec(),
        )
        .unwrap();
        let e = srv.recv::<v1::CastProbe>("probe").unwrap_err().to_string();
        assert!(e.contains("expected 1"), "{e}");

        let (srv, cli) = pair(s.clone(), s);
        let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
        cli.stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
        cli.stream.write_all(&[0u8; 8]).unwrap();
        let e = srv.recv::<v1::CastProbe>("probe").unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
    }

    #[test]
    fn garbage_and_silence_during_the_handshake_fail_cleanly() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            Channel::server(s, &Secret::from_material(b"0123456789abcdef"), "srv")
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .unwrap();
        let e = t.join().unwrap().unwrap_err().to_string();
        assert!(
            e.contains("malformed hello") || e.contains("version"),
            "{e}"
        );
    }

    proptest::proptest! {
        #[test]
        fn frame_layer_accepts_exactly_what_was_sent(
            payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 1..5),
            flip in proptest::option::of((0usize..400, 1u8..=255)),
        ) {
            let key = [3u8; 32];
            let mut stream = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                stream.extend(FrameDecoder::encode(key, i as u64, p));
            }
            if let Some((at, x)) = flip.filter(|&(at, _)| at < stream.len()) {
                stream[at] ^= x;
            }
            let mut d = FrameDecoder::new(key);
            let mut input = &stream[..];
            for p in &payloads {
                match d.next(&mut input) {
                    Ok(got) => proptest::prop_assert_eq!(&got, p),
                    // Only a flipped byte may make it fail.
                    Err(_) => { proptest::prop_assert!(flip.is_some()); break; }
                }
            }
        }
    }

    #[test]
    fn secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        Secret::create_file(&p).unwrap();
        assert!(Secret::create_file(&p).is_err(), "never overwrites");
        let a = Secret::load(&p).unwrap();
        assert_eq!(a.0, Secret::load(&p).unwrap().0);
        std::fs::write(dir.path().join("short"), b"abc").unwrap();
        let e = Secret::load(&dir.path().join("short"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("16 to 4096 bytes"), "{e}");
        assert!(
            Secret::load(&dir.path().join("missing"))
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
    }
}
