//! Reading an agent's answers, apart from the channel that carries them:
//! every answer is checked before it is used, and lists that come in parts
//! (a VM's contents, a held migration's needs) are bounded as they grow.
//!
//! The channel bounds each frame ([`pagecast_proto::MAX_CONTROL_FRAME_BYTES`]);
//! here a list of hashes is refused when its bytes are not whole 32-byte
//! hashes or when it would grow past [`MAX_HASHES`], one per guest frame of
//! the largest VM a manifest may describe.

use pagecast_pages::PageHash;
use pagecast_pages::packed::{self, PackedError};
use pagecast_proto::v1;

use crate::client::{MigrationEvent, VmContentAnswer};

type Resp = v1::agent_response::Body;

/// Most hashes a list in parts may hold.
pub const MAX_HASHES: u64 = pagecast_proto::MAX_MANIFEST_FRAMES;

/// Why an answer was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnswerError {
    /// The agent answered with an error.
    #[error("{message}")]
    Remote {
        /// Why, for programs.
        code: v1::RefusalCode,
        /// What it said.
        message: String,
    },
    /// An answer with no body.
    #[error("an empty response")]
    Empty,
    /// Hash bytes that are not whole hashes.
    #[error("{what}: {len} bytes of hashes, not a multiple of 32")]
    HashLength {
        /// Which list.
        what: &'static str,
        /// Bytes received.
        len: usize,
    },
    /// A list growing past its bound.
    #[error("{what}: more than {max} hashes")]
    TooManyHashes {
        /// Which list.
        what: &'static str,
        /// The bound.
        max: u64,
    },
    /// An answer the request does not expect.
    #[error("{0}")]
    Unexpected(String),
}

/// The body of an answer; an error answer is [`AnswerError::Remote`].
pub fn body(r: v1::AgentResponse) -> Result<Resp, AnswerError> {
    match r.body {
        Some(Resp::Error(e)) => Err(AnswerError::Remote {
            code: v1::RefusalCode::try_from(e.code).unwrap_or(v1::RefusalCode::Unspecified),
            message: e.message,
        }),
        Some(b) => Ok(b),
        None => Err(AnswerError::Empty),
    }
}

/// A list of hashes arriving in parts.
#[derive(Debug)]
pub struct Hashes {
    what: &'static str,
    max: u64,
    list: Vec<PageHash>,
}

impl Hashes {
    /// An empty list, named `what` in errors, of at most `max` hashes.
    pub fn new(what: &'static str, max: u64) -> Self {
        Hashes {
            what,
            max,
            list: Vec::new(),
        }
    }

    /// Appends the hashes in `bytes`, checked before anything is kept.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), AnswerError> {
        let room =
            usize::try_from(self.max.saturating_sub(self.list.len() as u64)).unwrap_or(usize::MAX);
        let more = packed::iter(bytes, room).map_err(|e| match e {
            PackedError::Length { len } => AnswerError::HashLength {
                what: self.what,
                len,
            },
            PackedError::TooMany { .. } => AnswerError::TooManyHashes {
                what: self.what,
                max: self.max,
            },
        })?;
        self.list.extend(more);
        Ok(())
    }

    /// How many so far.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether none so far.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The list.
    pub fn into_vec(self) -> Vec<PageHash> {
        self.list
    }
}

/// A VM's contents arriving in parts.
#[derive(Debug)]
pub struct ContentParts {
    hashes: Hashes,
    out: VmContentAnswer,
}

impl Default for ContentParts {
    fn default() -> Self {
        ContentParts {
            hashes: Hashes::new("a VM's contents", MAX_HASHES),
            out: VmContentAnswer::default(),
        }
    }
}

impl ContentParts {
    /// Takes one answer: the whole contents once the last part came.
    pub fn push(&mut self, r: v1::AgentResponse) -> Result<Option<VmContentAnswer>, AnswerError> {
        let p = match body(r)? {
            Resp::Content(p) => p,
            other => return Err(AnswerError::Unexpected(format!("{other:?}"))),
        };
        self.hashes.push(&p.hashes)?;
        self.out.frames = p.frames;
        self.out.nonzero_frames = p.nonzero_frames;
        self.out.memory_bytes = p.memory_bytes;
        self.out.kind = p.kind();
        self.out.rewrite_pages_per_s = if p.rewrite_pages_per_s.is_finite() {
            p.rewrite_pages_per_s.clamp(0.0, 1e9)
        } else {
            0.0
        };
        if !p.last {
            return Ok(None);
        }
        let hashes = std::mem::replace(&mut self.hashes, Hashes::new("", 0));
        let mut out = std::mem::take(&mut self.out);
        out.hashes = hashes.into_vec();
        Ok(Some(out))
    }
}

/// The reports of a migration under way: progress, the held list (in
/// parts, whole when its last part came) and the result.
#[derive(Debug)]
pub struct MigrationReports {
    held: Hashes,
}

impl Default for MigrationReports {
    fn default() -> Self {
        MigrationReports {
            held: Hashes::new("a held migration's needs", MAX_HASHES),
        }
    }
}

impl MigrationReports {
    /// Takes one answer: an event when it completes one. Progress that
    /// comes while a held list is incomplete is dropped.
    pub fn push(&mut self, r: v1::AgentResponse) -> Result<Option<MigrationEvent>, AnswerError> {
        match body(r)? {
            Resp::Progress(p) if self.held.is_empty() => Ok(Some(MigrationEvent::Progress(p))),
            Resp::Progress(_) => Ok(None),
            Resp::Held(h) => {
                self.held.push(&h.hashes)?;
                if !h.last {
                    return Ok(None);
                }
                let held = std::mem::replace(
                    &mut self.held,
                    Hashes::new("a held migration's needs", MAX_HASHES),
                );
                Ok(Some(MigrationEvent::Held(held.into_vec(), h.pages_local)))
            }
            Resp::Result(r) => Ok(Some(MigrationEvent::Result(r))),
            other => Err(AnswerError::Unexpected(format!("{other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(b: Resp) -> v1::AgentResponse {
        v1::AgentResponse { body: Some(b) }
    }

    fn content(hashes: &[u8], last: bool) -> v1::AgentResponse {
        answer(Resp::Content(v1::VmContentPart {
            hashes: hashes.to_vec().into(),
            frames: 10,
            nonzero_frames: 5,
            memory_bytes: 40960,
            rewrite_pages_per_s: f64::NAN,
            kind: v1::VmKind::MicroVm as i32,
            last,
        }))
    }

    #[test]
    fn contents_come_whole_and_bad_parts_are_named() {
        let mut c = ContentParts::default();
        assert!(c.push(content(&[1; 64], false)).unwrap().is_none());
        let all = c.push(content(&[2; 32], true)).unwrap().unwrap();
        assert_eq!(all.hashes.len(), 3);
        assert_eq!(all.rewrite_pages_per_s, 0.0, "NaN becomes 0");
        assert_eq!(
            ContentParts::default()
                .push(content(&[1; 33], true))
                .unwrap_err(),
            AnswerError::HashLength {
                what: "a VM's contents",
                len: 33
            }
        );
        assert_eq!(
            ContentParts::default()
                .push(v1::AgentResponse { body: None })
                .unwrap_err(),
            AnswerError::Empty
        );
        assert!(matches!(
            ContentParts::default().push(answer(Resp::Error(v1::AgentError {
                code: v1::RefusalCode::Forbidden as i32,
                message: "no".into(),
            }))),
            Err(AnswerError::Remote {
                code: v1::RefusalCode::Forbidden,
                ..
            })
        ));
    }

    #[test]
    fn a_list_stops_at_its_bound() {
        let mut h = Hashes::new("t", 3);
        h.push(&[0; 64]).unwrap();
        assert_eq!(
            h.push(&[0; 64]),
            Err(AnswerError::TooManyHashes { what: "t", max: 3 })
        );
        assert_eq!(h.len(), 2, "nothing of a refused part is kept");
    }

    #[test]
    fn held_lists_come_whole_and_progress_meanwhile_is_dropped() {
        let mut m = MigrationReports::default();
        let held = |b: &[u8], last| {
            answer(Resp::Held(v1::Held {
                hashes: b.to_vec().into(),
                pages_local: 7,
                last,
            }))
        };
        let progress = answer(Resp::Progress(v1::MigrateProgress::default()));
        assert!(matches!(
            m.push(progress.clone()),
            Ok(Some(MigrationEvent::Progress(_)))
        ));
        assert!(m.push(held(&[3; 32], false)).unwrap().is_none());
        assert!(m.push(progress).unwrap().is_none());
        match m.push(held(&[4; 32], true)) {
            Ok(Some(MigrationEvent::Held(h, 7))) => assert_eq!(h.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}
