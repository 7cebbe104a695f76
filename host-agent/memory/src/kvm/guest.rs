//! The guest program (see `guest.S`, assembled with GNU as) and the layout
//! of the first two guest frames it uses.

/// Guest physical address of the program's first instruction (frame 0).
pub const CODE_ADDR: u64 = 0;
/// Guest physical address of the GDT (in frame 0, after the code).
pub const GDT_ADDR: u64 = 0x800;
/// Guest physical address of the parameter block (frame 1).
pub const PARAMS_ADDR: u64 = 0x1000;
/// Frames the program and its parameters occupy; the working set must lie
/// above them.
pub const RESERVED_FRAMES: u64 = 2;

/// Offsets inside the parameter block.
pub mod params {
    /// `u32` magic.
    pub const MAGIC: usize = 0x00;
    /// `u32` pages per batch.
    pub const BATCH: usize = 0x04;
    /// `u32` number of working-set ranges.
    pub const RANGE_COUNT: usize = 0x08;
    /// `u32` current range.
    pub const CURRENT_RANGE: usize = 0x0c;
    /// `u32` offset inside the current range.
    pub const CURRENT_OFFSET: usize = 0x10;
    /// `u64` progress counter.
    pub const PROGRESS: usize = 0x18;
    /// 16 bytes: the VM's identity, random for each VM and each clone (as
    /// a VM generation ID is): a guest that reads it can tell it was
    /// cloned and reseed what must not repeat across copies.
    pub const IDENTITY: usize = 0x20;
    /// First `{u32 first, u32 count}` range.
    pub const RANGES: usize = 0x100;
}

/// The magic at the start of the parameter block: "TGCP".
pub const MAGIC: u32 = 0x5043_4754;
/// Most working-set ranges the parameter block holds.
pub const MAX_RANGES: usize = (4096 - params::RANGES) / 8;
/// I/O port the guest writes after each batch of page writes.
pub const PORT_BATCH: u16 = 0x10;
/// I/O port the guest writes when its batch size is zero (an idle tick).
pub const PORT_IDLE: u16 = 0x11;

/// Machine code of `guest.S`.
pub const PROGRAM: &[u8] = &[
    0xbe, 0x00, 0x10, 0x00, 0x00, 0x8b, 0x4e, 0x04, 0x85, 0xc9, 0x74, 0x4f, 0x83, 0x7e, 0x08, 0x00,
    0x74, 0x49, 0x8b, 0x5e, 0x0c, 0x8b, 0x56, 0x10, 0x8b, 0xbc, 0xde, 0x00, 0x01, 0x00, 0x00, 0x01,
    0xd7, 0xc1, 0xe7, 0x0c, 0x8b, 0x46, 0x18, 0x89, 0xc5, 0x81, 0xe5, 0xff, 0x03, 0x00, 0x00, 0x89,
    0x04, 0xaf, 0x83, 0x46, 0x18, 0x01, 0x83, 0x56, 0x1c, 0x00, 0x42, 0x3b, 0x94, 0xde, 0x04, 0x01,
    0x00, 0x00, 0x72, 0x0a, 0x31, 0xd2, 0x43, 0x3b, 0x5e, 0x08, 0x72, 0x02, 0x31, 0xdb, 0x49, 0x75,
    0xc7, 0x89, 0x5e, 0x0c, 0x89, 0x56, 0x10, 0xe6, 0x10, 0xeb, 0xaa, 0x83, 0x46, 0x18, 0x01, 0x83,
    0x56, 0x1c, 0x00, 0xe6, 0x11, 0xeb, 0x9e,
];

/// The GDT: null, flat 32-bit code (selector 0x08), flat data (0x10).
pub const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The embedded bytes must be what guest.S assembles to (needs GNU as
    /// and objcopy: `pagecast_testkit`).
    #[test]
    fn program_matches_its_source() {
        if !pagecast_testkit::needs(
            "program_matches_its_source",
            &[pagecast_testkit::Need::Binutils],
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kvm/guest.S");
        let obj = dir.path().join("guest.o");
        let bin = dir.path().join("guest.bin");
        let assembled = Command::new("as")
            .args(["--32", "-o"])
            .arg(&obj)
            .arg(src)
            .output();
        let out = assembled.expect("running as");
        assert!(
            out.status.success(),
            "as failed on guest.S: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let copied = Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .expect("objcopy runs where as does");
        assert!(copied.success());
        assert_eq!(std::fs::read(bin).unwrap(), PROGRAM);
    }

    const _LAYOUT_FITS: () = {
        assert!(CODE_ADDR as usize + PROGRAM.len() < GDT_ADDR as usize);
        assert!(GDT_ADDR as usize + GDT.len() * 8 <= PARAMS_ADDR as usize);
        assert!(params::RANGES + MAX_RANGES * 8 <= 4096);
    };
}
