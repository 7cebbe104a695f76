//! An authenticated control channel on tokio: the same handshake and frames
//! as [`crate::Channel`] (they share its I/O-free core), for
//! the agent's accept loop, which hands connections that carry heavy work
//! over to blocking threads with [`AsyncChannel::into_blocking`].

use std::time::Duration;

use crate::{
    AuthError, Channel, Established, FRAME_HEAD, FrameKey, HANDSHAKE_TIMEOUT, Secret,
    ServerHandshake, io_err, plain_decode, plain_frame, plain_len, refusal,
};
use pagecast_proto::v1;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An authenticated connection accepted by the agent.
pub struct AsyncChannel {
    stream: TcpStream,
    peer: String,
    est: Established,
}

async fn read_plain<M: Message + Default>(
    s: &mut TcpStream,
    peer: &str,
    what: &'static str,
) -> Result<M, AuthError> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.map_err(io_err(peer))?;
    let mut body = vec![0u8; plain_len(head, peer)?];
    s.read_exact(&mut body).await.map_err(io_err(peer))?;
    plain_decode(&body, peer, what)
}

impl AsyncChannel {
    /// Authenticates a client on an accepted stream as the server `name`;
    /// the whole handshake must finish within [`HANDSHAKE_TIMEOUT`].
    pub async fn server(
        mut stream: TcpStream,
        secret: &Secret,
        name: &str,
    ) -> Result<Self, AuthError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let _ = stream.set_nodelay(true);
        let hs = async {
            let hello: v1::AuthHello = read_plain(&mut stream, &peer, "hello").await?;
            let (hs, ch) = ServerHandshake::challenge(secret, &peer, name, &hello)?;
            stream
                .write_all(&plain_frame(&ch))
                .await
                .map_err(io_err(&peer))?;
            let proof: v1::AuthProof = read_plain(&mut stream, &peer, "proof").await?;
            match hs.check(secret, &peer, &proof) {
                Ok(est) => {
                    let ok = v1::AuthResult {
                        ok: true,
                        reason: String::new(),
                    };
                    stream
                        .write_all(&plain_frame(&ok))
                        .await
                        .map_err(io_err(&peer))?;
                    Ok(est)
                }
                Err(e) => {
                    let _ = stream.write_all(&plain_frame(&refusal(&e))).await;
                    Err(e)
                }
            }
        };
        let est = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hs).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(AuthError::Io {
                    peer,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "handshake took too long",
                    ),
                });
            }
        };
        Ok(AsyncChannel { stream, peer, est })
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The name the peer gave.
    pub fn peer_name(&self) -> &str {
        &self.est.peer_name
    }

    /// Sends one message.
    pub async fn send<M: Message>(&mut self, m: &M) -> Result<(), AuthError> {
        let frame = self.est.send.seal(&self.peer, &m.encode_to_vec())?;
        self.stream
            .write_all(&frame)
            .await
            .map_err(io_err(&self.peer))
    }

    /// Receives one message, waiting at most `timeout`.
    pub async fn recv<M: Message + Default>(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<M, AuthError> {
        let peer = self.peer.clone();
        let read = async {
            let mut head = [0u8; FRAME_HEAD];
            self.stream
                .read_exact(&mut head)
                .await
                .map_err(io_err(&peer))?;
            let mut rest = vec![0u8; FrameKey::rest_len(&head, &peer)?];
            self.stream
                .read_exact(&mut rest)
                .await
                .map_err(io_err(&peer))?;
            let payload = self.est.recv.open(&head, rest, &peer)?;
            plain_decode::<M>(&payload, &peer, what)
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(AuthError::Io {
                peer,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no {what} within {timeout:?}"),
                ),
            }),
        }
    }

    /// The same connection as a blocking [`Channel`], for work that runs on
    /// a blocking thread.
    pub fn into_blocking(self) -> Result<Channel, AuthError> {
        let peer = self.peer;
        let std = self.stream.into_std().map_err(io_err(&peer))?;
        std.set_nonblocking(false).map_err(io_err(&peer))?;
        Ok(Channel::from_established(std, peer, self.est))
    }
}
