//! Arbitrary bytes as a cast datagram: decode must refuse or accept without
//! panicking, and an accepted datagram must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecast_multicast::wire::{decode, seal};

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    // As-is: almost always a datagram that does not open.
    let _ = decode(&mut data.to_vec(), &KEY, 0x1234);
    if data.len() < 22 {
        return;
    }
    // The same bytes sealed as a sender would, so the field checks behind
    // the tag are exercised; whatever is accepted re-encodes exactly.
    let mut plain = data.to_vec();
    plain[2..10].copy_from_slice(&0x1234u64.to_be_bytes());
    let mut sealed = plain.clone();
    seal(&KEY, &mut sealed);
    let original = sealed.clone();
    if let Ok(d) = decode(&mut sealed, &KEY, 0x1234) {
        let mut again = Vec::new();
        d.encode(&KEY, &mut again);
        assert_eq!(again, original);
    }
});
