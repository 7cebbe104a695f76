//! A TLS channel on tokio, for the agent's accept loop: the same
//! handshake checks and frames as [`crate::Channel`]; connections that
//! carry heavy work go to blocking threads with
//! [`AsyncChannel::into_blocking`].

use std::time::Duration;

use crate::{
    AuthError, Channel, FRAME_HEAD, HANDSHAKE_TIMEOUT, Identity, Tls, decode, frame, frame_len,
    io_err, peer_identity,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A mutually authenticated connection accepted by the agent.
pub struct AsyncChannel {
    stream: TlsStream<TcpStream>,
    peer: String,
    identity: Identity,
}

fn timed_out(peer: String, what: String) -> AuthError {
    AuthError::Io {
        peer,
        source: std::io::Error::new(std::io::ErrorKind::TimedOut, what),
    }
}

impl AsyncChannel {
    /// Runs the server side of the TLS handshake on an accepted stream;
    /// it must finish within [`HANDSHAKE_TIMEOUT`].
    pub async fn server(stream: TcpStream, tls: &Tls) -> Result<Self, AuthError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(r) => r.map_err(io_err(&peer))?,
            Err(_) => return Err(timed_out(peer, "TLS handshake took too long".into())),
        };
        let identity = peer_identity(stream.get_ref().1.peer_certificates(), &peer)?;
        Ok(AsyncChannel {
            stream,
            peer,
            identity,
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The peer's name, from its certificate.
    pub fn peer_name(&self) -> &str {
        &self.identity.name
    }

    /// The peer's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Sends one message, within [`crate::WRITE_TIMEOUT`]: a peer that
    /// stopped reading does not hold the connection's task for good.
    pub async fn send<M: Message>(&mut self, m: &M) -> Result<(), AuthError> {
        let peer = self.peer.clone();
        let write = async {
            self.stream
                .write_all(&frame(m))
                .await
                .map_err(io_err(&peer))?;
            self.stream.flush().await.map_err(io_err(&peer))
        };
        match tokio::time::timeout(crate::WRITE_TIMEOUT, write).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(
                self.peer.clone(),
                format!(
                    "the peer took no frame within {:?} (is it frozen, or its network cut?)",
                    crate::WRITE_TIMEOUT
                ),
            )),
        }
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
            let mut body = vec![0u8; frame_len(head, &peer)?];
            self.stream
                .read_exact(&mut body)
                .await
                .map_err(io_err(&peer))?;
            decode::<M>(&peer, what, &body)
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(peer, format!("no {what} within {timeout:?}"))),
        }
    }

    /// The same connection as a blocking [`Channel`], for work that runs on
    /// a blocking thread.
    pub fn into_blocking(self) -> Result<Channel, AuthError> {
        let peer = self.peer;
        let (tcp, conn) = self.stream.into_inner();
        let std = tcp.into_std().map_err(io_err(&peer))?;
        std.set_nonblocking(false).map_err(io_err(&peer))?;
        Channel::from_conn(rustls::Connection::Server(conn), std, peer, self.identity)
    }
}
