//! QEMU's migration stream, parsed only as far as RAM pages.
//!
//! The stream (QEMU's savevm format, version 3) is a header, an optional
//! configuration section, then sections: `START` and `FULL` name a section
//! (id, instance, version), `PART` and `END` continue one by id, each ends
//! with a footer repeating its id. The RAM section's content is a list of
//! records, each a big-endian u64 of page offset and flags, the RAMBlock's
//! name unless the record continues the previous one's block, and then one
//! fill byte (a zero page) or the page's 4,096 bytes, ended by an
//! end-of-section flag. Other devices' sections carry no length and cannot
//! be skipped without knowing each device, but QEMU sends them only after
//! RAM's `END` (the non-iterable devices, at the switchover): once RAM has
//! ended, the parser passes the rest through untouched.
//!
//! [`proxy`] reads a stream and hands a [`Sink`] every byte in order: RAM
//! pages through [`Sink::page`], everything else (headers, page records'
//! headers, zero pages, other sections) through [`Sink::raw`]. Joining
//! what the sink is handed, pages in place, gives back the stream exactly.
//! Features the parser does not parse are refused with
//! [`StreamError::Unsupported`], naming the QEMU capability that makes
//! them; nothing half understood is passed on.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};

/// Bytes of a target page (x86: 4 KiB).
pub const PAGE: usize = 4096;

const MAGIC: u32 = 0x5145_564d; // "QEVM"
const VERSION: u32 = 3;

const SEC_EOF: u8 = 0x00;
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SEC_SUBSECTION: u8 = 0x05;
const SEC_CONFIGURATION: u8 = 0x07;
const SEC_COMMAND: u8 = 0x08;
const SEC_FOOTER: u8 = 0x7e;

const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;
const F_XBZRLE: u64 = 0x40;
const F_HOOK: u64 = 0x80;
const F_COMPRESS_PAGE: u64 = 0x100;
const F_MULTIFD_FLUSH: u64 = 0x200;
const FLAG_MASK: u64 = (PAGE as u64) - 1;

/// Most RAMBlocks a stream may declare.
pub const MAX_BLOCKS: usize = 1024;
/// Largest RAM a stream may declare: 16 TiB.
pub const MAX_RAM_BYTES: u64 = 16 << 40;

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream uses a feature the proxy does not parse.
    #[error(
        "the migration stream uses {what}, which pagecast does not carry: turn off the QEMU migration capability {capability:?} (migrate-set-capabilities) and migrate again"
    )]
    Unsupported {
        /// What was found.
        what: String,
        /// The capability that makes it.
        capability: &'static str,
    },
    /// The stream holds something the format does not allow.
    #[error("malformed migration stream at byte {at}: {why}")]
    Malformed {
        /// Offset in the stream.
        at: u64,
        /// What was wrong.
        why: String,
    },
    /// The stream ended early or could not be read.
    #[error("reading the migration stream at byte {at}: {source}")]
    Read {
        /// Offset in the stream.
        at: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The sink refused (its own error, as text).
    #[error("{0}")]
    Sink(String),
    /// The sink was told to stop (a job cancelled): not a failure of the
    /// stream or of where it goes.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// Where [`proxy`] hands the stream.
pub trait Sink {
    /// Bytes that pass through unchanged.
    fn raw(&mut self, bytes: &[u8]) -> Result<(), StreamError>;
    /// A RAM page of `block` at byte `offset` in it; the record's header
    /// has gone through [`Sink::raw`] just before.
    fn page(&mut self, block: &str, offset: u64, page: &[u8; PAGE]) -> Result<(), StreamError>;
    /// Everything handed over so far should go on now, not wait for more:
    /// called for each piece of the stream's tail (the devices' state),
    /// after which a source QEMU with a return path waits for the
    /// destination's answer before it sends the rest.
    fn drain(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
}

/// What a stream held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes read.
    pub bytes: u64,
    /// RAM pages sent with content.
    pub pages: u64,
    /// RAM pages sent as zero pages.
    pub zero_pages: u64,
    /// RAMBlocks and their lengths, as the stream declared them.
    pub blocks: Vec<(String, u64)>,
    /// RAM iterations (`PART` and `END` sections of RAM).
    pub ram_sections: u64,
    /// The machine type the configuration section named.
    pub machine: String,
    /// Whether the stream reached RAM's end (then the rest passed through).
    pub ram_complete: bool,
}

struct Reader<'a, R: Read, S: Sink> {
    input: &'a mut R,
    sink: &'a mut S,
    at: u64,
    /// Raw bytes read but not yet handed to the sink.
    pending: Vec<u8>,
    /// A byte read ahead and given back.
    back: Option<u8>,
}

impl<R: Read, S: Sink> Reader<'_, R, S> {
    fn bad(&self, why: impl Into<String>) -> StreamError {
        StreamError::Malformed {
            at: self.at,
            why: why.into(),
        }
    }

    /// Fills `buf` from the byte given back, then the input.
    fn fill(
        input: &mut R,
        back: &mut Option<u8>,
        at: u64,
        buf: &mut [u8],
    ) -> Result<(), StreamError> {
        let mut from = 0;
        if let Some(b) = back.take()
            && let Some(first) = buf.first_mut()
        {
            *first = b;
            from = 1;
        }
        input
            .read_exact(&mut buf[from..])
            .map_err(|source| StreamError::Read { at, source })
    }

    /// Reads exactly `n` bytes into `pending` (raw) and returns them.
    fn take(&mut self, n: usize) -> Result<&[u8], StreamError> {
        let start = self.pending.len();
        self.pending.resize(start + n, 0);
        Self::fill(
            self.input,
            &mut self.back,
            self.at,
            &mut self.pending[start..],
        )?;
        self.at += n as u64;
        Ok(&self.pending[start..])
    }

    /// The next byte, left unread.
    fn peek(&mut self) -> Result<u8, StreamError> {
        if let Some(b) = self.back {
            return Ok(b);
        }
        let mut b = [0u8; 1];
        Self::fill(self.input, &mut self.back, self.at, &mut b)?;
        self.back = Some(b[0]);
        Ok(b[0])
    }

    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.take(1)?[0])
    }
    fn be16(&mut self) -> Result<u16, StreamError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn be32(&mut self) -> Result<u32, StreamError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn be64(&mut self) -> Result<u64, StreamError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    /// A string of at most 255 bytes, its length in one byte.
    fn str8(&mut self) -> Result<String, StreamError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?.to_vec();
        String::from_utf8(b).map_err(|_| self.bad("a name that is not UTF-8"))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        if !self.pending.is_empty() {
            self.sink.raw(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Reads a page's content and hands it to the sink.
    fn page(&mut self, block: &str, offset: u64) -> Result<(), StreamError> {
        self.flush()?;
        let mut page = [0u8; PAGE];
        Self::fill(self.input, &mut self.back, self.at, &mut page)?;
        self.at += PAGE as u64;
        self.sink.page(block, offset, &page)
    }
}

fn unsupported(what: impl Into<String>, capability: &'static str) -> StreamError {
    StreamError::Unsupported {
        what: what.into(),
        capability,
    }
}

/// Reads a migration stream from `input` to its end, handing it to `sink`.
pub fn proxy(input: &mut impl Read, sink: &mut impl Sink) -> Result<StreamStats, StreamError> {
    let mut r = Reader {
        input,
        sink,
        at: 0,
        pending: Vec::with_capacity(64 << 10),
        back: None,
    };
    let mut st = StreamStats::default();
    let magic = r.be32()?;
    if magic != MAGIC {
        return Err(r.bad(format!(
            "magic {magic:#010x}, not QEMU's {MAGIC:#010x} (is this a QEMU migration stream?)"
        )));
    }
    let version = r.be32()?;
    if version != VERSION {
        return Err(r.bad(format!(
            "stream version {version}; pagecast parses version {VERSION}"
        )));
    }
    // The RAM section's id, once it started, and its blocks.
    let mut ram_id: Option<u32> = None;
    let mut blocks: HashMap<String, u64> = HashMap::new();
    // The block of the last page: QEMU names a block once, then continues
    // it, across sections.
    let mut block: Option<(String, u64)> = None;
    let mut first = true;
    loop {
        let t = r.u8()?;
        if first && t == SEC_CONFIGURATION {
            first = false;
            configuration(&mut r, &mut st)?;
            continue;
        }
        first = false;
        match t {
            SEC_START | SEC_FULL => {
                let id = r.be32()?;
                let name = r.str8()?;
                let _instance = r.be32()?;
                let _version = r.be32()?;
                if name != "ram" || t == SEC_FULL {
                    return Err(unsupported(
                        format!("a section pagecast does not know before RAM ends ({name:?})"),
                        match name.as_str() {
                            "block" => "block",
                            "dirty-bitmap" => "dirty-bitmaps",
                            _ => "(none: a device with early state, such as virtio-mem)",
                        },
                    ));
                }
                if ram_id.is_some() {
                    return Err(r.bad("RAM started twice"));
                }
                ram_id = Some(id);
                ram_setup(&mut r, &mut blocks, &mut st)?;
                ram_records(&mut r, &blocks, &mut block, &mut st)?;
                footer(&mut r, id)?;
            }
            SEC_PART | SEC_END => {
                let id = r.be32()?;
                if Some(id) != ram_id {
                    return Err(unsupported(
                        format!("an iterative section {id} that is not RAM"),
                        "block",
                    ));
                }
                st.ram_sections += 1;
                ram_records(&mut r, &blocks, &mut block, &mut st)?;
                footer(&mut r, id)?;
                if t == SEC_END {
                    // Device state follows, then EOF and QEMU's JSON
                    // description of the devices: all passed through.
                    st.ram_complete = true;
                    if let Some(b) = r.back.take() {
                        r.pending.push(b);
                        r.at += 1;
                    }
                    r.flush()?;
                    r.sink.drain()?;
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match r.input.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            Err(source) => return Err(StreamError::Read { at: r.at, source }),
                        };
                        r.at += n as u64;
                        r.sink.raw(&buf[..n])?;
                        r.sink.drain()?;
                    }
                    st.bytes = r.at;
                    return Ok(st);
                }
            }
            SEC_COMMAND => {
                let _cmd = r.be16()?;
                let len = r.be16()? as usize;
                r.take(len)?;
            }
            SEC_EOF => {
                return Err(r.bad("the stream ended before RAM did"));
            }
            other => return Err(r.bad(format!("unknown section type {other:#04x}"))),
        }
    }
}

fn configuration<R: Read, S: Sink>(
    r: &mut Reader<'_, R, S>,
    st: &mut StreamStats,
) -> Result<(), StreamError> {
    let len = r.be32()? as usize;
    if len > 256 {
        return Err(r.bad(format!("a machine type name of {len} bytes")));
    }
    let name = r.take(len)?.to_vec();
    st.machine = String::from_utf8_lossy(&name).into_owned();
    // Subsections, each: marker, name, version, then its fields.
    loop {
        if r.peek()? != SEC_SUBSECTION {
            return Ok(());
        }
        r.u8()?;
        let name = r.str8()?;
        let _version = r.be32()?;
        match name.as_str() {
            "configuration/target-page-bits" => {
                let bits = r.be32()?;
                if bits != 12 {
                    return Err(r.bad(format!(
                        "target pages of 2^{bits} bytes; pagecast parses 4 KiB pages"
                    )));
                }
            }
            "configuration/capabilities" => {
                let n = r.be32()?;
                if n > 64 {
                    return Err(r.bad(format!("{n} capabilities in the configuration")));
                }
                for _ in 0..n {
                    r.str8()?;
                }
            }
            "configuration/uuid" => {
                r.take(16)?;
            }
            other => {
                return Err(unsupported(
                    format!("a configuration subsection pagecast does not know ({other:?})"),
                    "(none: a newer QEMU than pagecast parses)",
                ));
            }
        }
    }
}

fn ram_setup<R: Read, S: Sink>(
    r: &mut Reader<'_, R, S>,
    blocks: &mut HashMap<String, u64>,
    st: &mut StreamStats,
) -> Result<(), StreamError> {
    let v = r.be64()?;
    if v & FLAG_MASK != F_MEM_SIZE {
        return Err(r.bad(format!(
            "RAM setup begins with flags {:#x}, not the memory size",
            v & FLAG_MASK
        )));
    }
    let total = v & !FLAG_MASK;
    if total > MAX_RAM_BYTES {
        return Err(r.bad(format!("{total} bytes of RAM declared")));
    }
    let mut got = 0u64;
    while got < total {
        let name = r.str8()?;
        let len = r.be64()?;
        if len == 0 || len % PAGE as u64 != 0 || len > total - got {
            return Err(r.bad(format!("RAMBlock {name:?} of {len} bytes")));
        }
        if blocks.len() >= MAX_BLOCKS || blocks.insert(name.clone(), len).is_some() {
            return Err(r.bad(format!("RAMBlock {name:?} declared twice, or too many")));
        }
        st.blocks.push((name, len));
        got += len;
    }
    Ok(())
}

/// RAM records up to the end-of-section flag.
fn ram_records<R: Read, S: Sink>(
    r: &mut Reader<'_, R, S>,
    blocks: &HashMap<String, u64>,
    block: &mut Option<(String, u64)>,
    st: &mut StreamStats,
) -> Result<(), StreamError> {
    loop {
        let v = r.be64()?;
        let flags = v & FLAG_MASK;
        let offset = v & !FLAG_MASK;
        if flags & F_EOS != 0 {
            if flags != F_EOS || offset != 0 {
                return Err(r.bad(format!("end of section with flags {flags:#x}")));
            }
            return Ok(());
        }
        if flags & F_MULTIFD_FLUSH != 0 {
            return Err(unsupported("multifd page channels", "multifd"));
        }
        if flags & F_XBZRLE != 0 {
            return Err(unsupported("XBZRLE page deltas", "xbzrle"));
        }
        if flags & F_COMPRESS_PAGE != 0 {
            return Err(unsupported("compressed pages", "compress"));
        }
        if flags & F_HOOK != 0 {
            return Err(unsupported("RDMA hooks", "rdma-pin-all"));
        }
        if flags & F_MEM_SIZE != 0 {
            return Err(r.bad("a memory size after the RAM setup"));
        }
        if flags & F_CONTINUE == 0 {
            let name = r.str8()?;
            let len = *blocks
                .get(&name)
                .ok_or_else(|| r.bad(format!("a page of undeclared RAMBlock {name:?}")))?;
            *block = Some((name, len));
        }
        let Some((name, len)) = &*block else {
            return Err(r.bad("a page continuing no RAMBlock"));
        };
        if offset >= *len {
            return Err(r.bad(format!(
                "a page at {offset:#x} beyond RAMBlock {name:?} of {len} bytes"
            )));
        }
        match flags & !F_CONTINUE {
            F_ZERO => {
                r.u8()?;
                st.zero_pages += 1;
            }
            F_PAGE => {
                let name = name.clone();
                r.page(&name, offset)?;
                st.pages += 1;
            }
            other => return Err(r.bad(format!("a RAM record with flags {other:#x}"))),
        }
    }
}

fn footer<R: Read, S: Sink>(r: &mut Reader<'_, R, S>, id: u32) -> Result<(), StreamError> {
    let t = r.u8()?;
    if t != SEC_FOOTER {
        return Err(r.bad(format!(
            "section {id} ends without its footer ({t:#04x}): is the machine type older than pc-2.5?"
        )));
    }
    let got = r.be32()?;
    if got != id {
        return Err(r.bad(format!("footer of section {got} ends section {id}")));
    }
    Ok(())
}

/// Small streams written as QEMU writes them, for tests, fuzz seeds and
/// benchmarks: a header, the configuration section if asked, RAM setup
/// with its blocks, RAM parts and the end of RAM, a device section, EOF.
pub mod sample {
    use super::*;

    /// What a stream's RAM holds, to write one.
    #[derive(Debug, Clone)]
    pub enum Rec {
        /// A zero page: block index, page index within the block.
        Zero(usize, u64),
        /// A page filled with one byte: block, page, the byte.
        Page(usize, u64, u8),
        /// The end of a RAM part (`RAM_SAVE_FLAG_EOS`), a new part after it.
        Eos,
    }

    /// Appends a one-byte-length name.
    pub(super) fn name(b: &mut Vec<u8>, s: &str) {
        b.push(s.len() as u8);
        b.extend_from_slice(s.as_bytes());
    }

    /// Writes a stream as QEMU 7.2 does: header, configuration, RAM start with
    /// the blocks, RAM parts split at `Eos`, RAM end, a device section and
    /// EOF passed through.
    pub fn write(blocks: &[(&str, u64)], recs: &[Rec], config: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&VERSION.to_be_bytes());
        if config {
            b.push(SEC_CONFIGURATION);
            b.extend_from_slice(&13u32.to_be_bytes());
            b.extend_from_slice(b"pc-i440fx-7.2");
            b.push(SEC_SUBSECTION);
            name(&mut b, "configuration/uuid");
            b.extend_from_slice(&1u32.to_be_bytes());
            b.extend_from_slice(&[7; 16]);
        }
        b.push(SEC_START);
        b.extend_from_slice(&2u32.to_be_bytes());
        name(&mut b, "ram");
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&4u32.to_be_bytes());
        let total: u64 = blocks.iter().map(|x| x.1).sum();
        b.extend_from_slice(&(total | F_MEM_SIZE).to_be_bytes());
        for (n, l) in blocks {
            name(&mut b, n);
            b.extend_from_slice(&l.to_be_bytes());
        }
        let mut last: Option<usize> = None;
        let section_end = |b: &mut Vec<u8>| {
            b.extend_from_slice(&F_EOS.to_be_bytes());
            b.push(SEC_FOOTER);
            b.extend_from_slice(&2u32.to_be_bytes());
        };
        for r in recs {
            match r {
                Rec::Eos => {
                    section_end(&mut b);
                    b.push(SEC_PART);
                    b.extend_from_slice(&2u32.to_be_bytes());
                }
                Rec::Zero(blk, off) | Rec::Page(blk, off, _) => {
                    let blk = blk % blocks.len();
                    let off = (off % (blocks[blk].1 / PAGE as u64)) * PAGE as u64;
                    let kind = if matches!(r, Rec::Zero(..)) {
                        F_ZERO
                    } else {
                        F_PAGE
                    };
                    let cont = if last == Some(blk) { F_CONTINUE } else { 0 };
                    b.extend_from_slice(&(off | kind | cont).to_be_bytes());
                    if cont == 0 {
                        name(&mut b, blocks[blk].0);
                    }
                    last = Some(blk);
                    match r {
                        Rec::Page(_, _, fill) => b.extend_from_slice(&[*fill; PAGE]),
                        _ => b.push(0),
                    }
                }
            }
        }
        section_end(&mut b);
        b.push(SEC_END);
        b.extend_from_slice(&2u32.to_be_bytes());
        section_end(&mut b);
        // A device section, EOF and a description: opaque bytes.
        b.push(SEC_FULL);
        b.extend_from_slice(&0u32.to_be_bytes());
        name(&mut b, "timer");
        b.extend_from_slice(&[
            0, 0, 0, 0, 0, 0, 0, 2, 1, 2, 3, SEC_FOOTER, 0, 0, 0, 0, SEC_EOF,
        ]);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::sample::{Rec, name, write};
    use super::*;
    use proptest::prelude::*;

    /// A sink that joins what it is handed, pages in place.
    #[derive(Default)]
    struct Join {
        out: Vec<u8>,
        pages: Vec<(String, u64)>,
    }
    impl Sink for Join {
        fn raw(&mut self, b: &[u8]) -> Result<(), StreamError> {
            self.out.extend_from_slice(b);
            Ok(())
        }
        fn page(&mut self, b: &str, o: u64, p: &[u8; PAGE]) -> Result<(), StreamError> {
            self.out.extend_from_slice(p);
            self.pages.push((b.to_owned(), o));
            Ok(())
        }
    }

    const BLOCKS: &[(&str, u64)] = &[("mem", 64 << 12), ("pc.bios", 4 << 12)];

    fn rec() -> impl Strategy<Value = Rec> {
        prop_oneof![
            (0usize..2, 0u64..64).prop_map(|(b, o)| Rec::Zero(b, o)),
            (0usize..2, 0u64..64, any::<u8>()).prop_map(|(b, o, f)| Rec::Page(b, o, f)),
            Just(Rec::Eos),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_byte_comes_back_in_order_and_pages_are_found(
            recs in proptest::collection::vec(rec(), 0..40),
            config in any::<bool>(),
        ) {
            let s = write(BLOCKS, &recs, config);
            let mut j = Join::default();
            let st = proxy(&mut &s[..], &mut j).unwrap();
            prop_assert_eq!(&j.out, &s);
            let pages = recs.iter().filter(|r| matches!(r, Rec::Page(..))).count();
            prop_assert_eq!(st.pages as usize, pages);
            prop_assert_eq!(j.pages.len(), pages);
            prop_assert!(st.ram_complete);
            prop_assert_eq!(st.bytes, s.len() as u64);
        }

        #[test]
        fn damaged_streams_are_refused_never_a_panic(
            recs in proptest::collection::vec(rec(), 0..10),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let s = write(BLOCKS, &recs, true);
            let mut d = s.clone();
            let i = flip.index(d.len());
            d[i] = byte;
            let _ = proxy(&mut &d[..], &mut Join::default());
            let short = &s[..cut.index(s.len())];
            // Cut before the last RAM section ends: refused.
            let ram_end = s.len() - 30;
            if short.len() < ram_end {
                prop_assert!(proxy(&mut &short[..], &mut Join::default()).is_err());
            }
        }
    }

    fn refused(s: &[u8]) -> StreamError {
        proxy(&mut &s[..], &mut Join::default()).unwrap_err()
    }

    /// A stream up to the RAM setup's blocks, then `tail`.
    fn with_records(tail: &[u8]) -> Vec<u8> {
        let mut s = write(BLOCKS, &[], false);
        // Cut after the blocks (header 8 + start 1+4+4+4+4 + size 8 + blocks).
        let cut = 8 + 17 + 8 + (1 + 3 + 8) + (1 + 7 + 8);
        s.truncate(cut);
        s.extend_from_slice(tail);
        s
    }

    #[test]
    fn features_it_does_not_parse_are_refused_by_capability() {
        let mut t = (F_MULTIFD_FLUSH).to_be_bytes().to_vec();
        t.extend_from_slice(&[0; 8]);
        let e = refused(&with_records(&t));
        assert!(
            matches!(
                &e,
                StreamError::Unsupported {
                    capability: "multifd",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("\"multifd\""), "{e}");
        let mut t = (F_XBZRLE | F_CONTINUE).to_be_bytes().to_vec();
        t.extend_from_slice(&[0; 8]);
        assert!(matches!(
            refused(&with_records(&t)),
            StreamError::Unsupported {
                capability: "xbzrle",
                ..
            }
        ));
        let t = (F_COMPRESS_PAGE).to_be_bytes();
        assert!(matches!(
            refused(&with_records(&t)),
            StreamError::Unsupported {
                capability: "compress",
                ..
            }
        ));
        // A section before RAM ends that is not RAM.
        let mut s = Vec::new();
        s.extend_from_slice(&MAGIC.to_be_bytes());
        s.extend_from_slice(&VERSION.to_be_bytes());
        s.push(SEC_START);
        s.extend_from_slice(&5u32.to_be_bytes());
        name(&mut s, "block");
        s.extend_from_slice(&[0; 8]);
        assert!(matches!(
            refused(&s),
            StreamError::Unsupported {
                capability: "block",
                ..
            }
        ));
    }

    #[test]
    fn bad_pages_and_headers_are_malformed() {
        // A page beyond its block.
        let mut t = ((64u64 << 12) | F_PAGE).to_be_bytes().to_vec();
        name(&mut t, "mem");
        assert!(matches!(
            refused(&with_records(&t)),
            StreamError::Malformed { .. }
        ));
        // An undeclared block.
        let mut t = (F_PAGE).to_be_bytes().to_vec();
        name(&mut t, "nope");
        let e = refused(&with_records(&t));
        assert!(
            e.to_string().contains("undeclared RAMBlock \"nope\""),
            "{e}"
        );
        // A continuation with no block named yet.
        let t = (F_PAGE | F_CONTINUE).to_be_bytes();
        assert!(matches!(
            refused(&with_records(&t)),
            StreamError::Malformed { .. }
        ));
        // Not a QEMU stream.
        let e = refused(b"GET / HTTP/1.1\r\n");
        assert!(e.to_string().contains("magic"), "{e}");
        // Blocks larger than the declared memory.
        let mut s = Vec::new();
        s.extend_from_slice(&MAGIC.to_be_bytes());
        s.extend_from_slice(&VERSION.to_be_bytes());
        s.push(SEC_START);
        s.extend_from_slice(&2u32.to_be_bytes());
        name(&mut s, "ram");
        s.extend_from_slice(&[0; 8]);
        s.extend_from_slice(&((4u64 << 12) | F_MEM_SIZE).to_be_bytes());
        name(&mut s, "mem");
        s.extend_from_slice(&(8u64 << 12).to_be_bytes());
        assert!(matches!(refused(&s), StreamError::Malformed { .. }));
    }
}
