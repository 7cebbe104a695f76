//! Why a call to an agent failed: the client's errors, each with the
//! refusal code a program decides on (never the message's text).

use pagecast_channel::AuthError;
use pagecast_proto::v1::RefusalCode;

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {addr}: {source}")]
    Connect {
        /// Its address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Authentication or framing failed, or the connection broke.
    #[error(transparent)]
    Channel(#[from] AuthError),
    /// The agent refused or failed the request, and said why.
    #[error("the agent at {addr} says: {message}")]
    Refused {
        /// Its address.
        addr: String,
        /// Why, for programs.
        code: RefusalCode,
        /// What it said, for people.
        message: String,
    },
    /// The agent answered with something the request does not expect, or
    /// an answer that breaks its bounds.
    #[error("unexpected answer from the agent at {addr}: {what}")]
    Unexpected {
        /// Its address.
        addr: String,
        /// What came.
        what: String,
    },
}

impl ClientError {
    /// The refusal code of this failure: the agent's own for a refusal,
    /// `Unavailable` for one that could not be reached or went away,
    /// `Invalid` for a garbled answer.
    pub fn code(&self) -> RefusalCode {
        match self {
            ClientError::Refused { code, .. } => *code,
            ClientError::Connect { .. } | ClientError::Channel(_) => RefusalCode::Unavailable,
            ClientError::Unexpected { .. } => RefusalCode::Invalid,
        }
    }
}
