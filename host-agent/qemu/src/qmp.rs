//! A blocking client of QEMU's machine protocol over a Unix socket.
//!
//! QMP is line-delimited JSON: a greeting, then `qmp_capabilities`, then
//! commands, each answered by `return` or `error`, with asynchronous
//! `event`s interleaved (skipped here). Every exchange has a deadline, and
//! an answer line is bounded, so a stuck or hostile QEMU cannot hold an
//! agent thread or its memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// Longest QMP line accepted.
pub const MAX_LINE: usize = 4 << 20;
/// Deadline of a QMP exchange unless the caller gives one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or failed.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// QEMU said something that is not QMP.
    #[error("QMP socket {path}: {why}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
}

/// A QMP connection.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events that came while a command waited for its answer, the latest
    /// [`EVENTS_KEPT`], for [`Qmp::wait_event`].
    events: std::collections::VecDeque<Value>,
}

/// Events a connection keeps for a later [`Qmp::wait_event`].
const EVENTS_KEPT: usize = 64;

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Qmp({})", self.path.display())
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path` and enters command mode.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_owned(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io)?;
        s.set_read_timeout(Some(DEFAULT_TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(DEFAULT_TIMEOUT)).map_err(io)?;
        let writer = s.try_clone().map_err(io)?;
        let mut q = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(s),
            writer,
            events: std::collections::VecDeque::new(),
        };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            return Err(q.protocol(format!("no QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn protocol(&self, why: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            why,
        }
    }

    /// Changes the deadline of later exchanges.
    pub fn set_timeout(&self, t: Duration) -> Result<(), QmpError> {
        self.writer
            .set_read_timeout(Some(t))
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn line(&mut self) -> Result<Value, QmpError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(self.protocol("QEMU closed the socket".into()));
        }
        if n > MAX_LINE {
            return Err(self.protocol(format!("a line longer than {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&buf).map_err(|e| self.protocol(format!("not JSON: {e}")))
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).expect("JSON");
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                if self.events.len() == EVENTS_KEPT {
                    self.events.pop_front();
                }
                self.events.push_back(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Refused {
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or("?").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return Err(self.protocol(format!("an answer that is neither return nor error: {v}")));
        }
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`, `postmigrate`...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", json!({}))?;
        v["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.protocol(format!("query-status without a status: {v}")))
    }

    /// The migration's state (`none`, `setup`, `active`, `completed`,
    /// `failed`, ...) and QEMU's whole answer.
    pub fn migration(&mut self) -> Result<(String, Value), QmpError> {
        let v = self.execute("query-migrate", json!({}))?;
        let s = v["status"].as_str().unwrap_or("none").to_owned();
        Ok((s, v))
    }

    /// `query-migrate-capabilities`.
    pub fn capabilities(&mut self) -> Result<Value, QmpError> {
        self.execute("query-migrate-capabilities", json!({}))
    }

    /// Waits at most `within` for event `name` whose `data` satisfies
    /// `matches` (one that came while a command ran counts): whether it
    /// came.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        within: Duration,
    ) -> Result<bool, QmpError> {
        let is = |v: &Value| v["event"] == name && matches(&v["data"]);
        if let Some(i) = self.events.iter().position(is) {
            self.events.remove(i);
            return Ok(true);
        }
        let until = std::time::Instant::now() + within;
        let restore = self
            .reader
            .get_ref()
            .read_timeout()
            .ok()
            .flatten()
            .unwrap_or(DEFAULT_TIMEOUT);
        let found = loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break Ok(false);
            }
            let _ = self.reader.get_ref().set_read_timeout(Some(left));
            match self.line() {
                Ok(v) if is(&v) => break Ok(true),
                Ok(_) => {}
                Err(QmpError::Io { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break Ok(false);
                }
                Err(e) => break Err(e),
            }
        };
        let _ = self.reader.get_ref().set_read_timeout(Some(restore));
        found
    }

    /// A property of a QOM object (`qom-get`).
    pub fn qom_get(&mut self, path: &str, property: &str) -> Result<Value, QmpError> {
        self.execute("qom-get", json!({ "path": path, "property": property }))
    }

    /// The VM generation ID its `vmgenid` device gives the guest (lower
    /// case), or `None` without such a device.
    pub fn vm_generation_id(&mut self) -> Result<Option<String>, QmpError> {
        match self.execute("query-vm-generation-id", json!({})) {
            Ok(v) => Ok(v["guid"].as_str().map(str::to_ascii_lowercase)),
            Err(QmpError::Refused { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The MAC addresses of its network cards that report them
    /// (`query-rx-filter`: virtio-net), by card, in QEMU's order.
    pub fn macs(&mut self) -> Result<Vec<(String, String)>, QmpError> {
        let v = match self.execute("query-rx-filter", json!({})) {
            Ok(v) => v,
            // No card that reports its filter.
            Err(QmpError::Refused { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(v.as_array()
            .map(|cards| {
                cards
                    .iter()
                    .filter_map(|c| {
                        Some((
                            c["name"].as_str()?.to_owned(),
                            c["main-mac"].as_str()?.to_ascii_lowercase(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
