//! Plays arbitrary bytes to a migration destination as the frames a source
//! sends (each frame: a 2-byte length then that many bytes of a protobuf
//! `MigrateFrame`). The destination must refuse, abort or finish, never
//! panic or hang, and must hand memory to `start` only after every frame
//! was filled and matched the source's hashes. Guest memory is capped at
//! 64 pages to keep runs fast.
#![no_main]

use std::collections::VecDeque;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_migrate::{MigrationError, MigrationLink, NoLocalContent, migrate_in};
use pagecast_proto::v1;
use prost::Message;

struct Script(VecDeque<Result<v1::migrate_frame::Body, MigrationError>>);

impl MigrationLink for Script {
    fn send(&mut self, _: v1::migrate_frame::Body) -> Result<(), MigrationError> {
        Ok(())
    }
    fn recv(&mut self, _: Option<Duration>) -> Result<v1::migrate_frame::Body, MigrationError> {
        self.0.pop_front().unwrap_or(Err(MigrationError::Timeout {
            what: "frame",
            after: Duration::ZERO,
        }))
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static FP: Fingerprinter = Fingerprinter::new(1).expect("pool");
    }
    let mut frames = VecDeque::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let f = match v1::MigrateFrame::decode(&rest[2..2 + n]) {
            Ok(v1::MigrateFrame { body: Some(b) }) => Ok(b),
            Ok(_) => Err(MigrationError::Protocol("empty migration frame".into())),
            Err(e) => Err(MigrationError::Protocol(e.to_string())),
        };
        frames.push_back(f);
        rest = &rest[2 + n..];
    }
    let Some(Ok(v1::migrate_frame::Body::Begin(mut begin))) = frames.pop_front() else {
        return;
    };
    begin.memory_bytes = begin.memory_bytes.min(64 * 4096);
    let mut link = Script(frames);
    FP.with(|fp| {
        let _ = migrate_in(
            &mut link,
            &begin,
            &NoLocalContent,
            fp,
            &mut |region, _state| {
                assert_eq!(region.len() as u64, begin.memory_bytes);
                Ok(0)
            },
        );
    });
});
