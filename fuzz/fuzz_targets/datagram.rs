//! Arbitrary bytes as a cast datagram: decode must refuse or accept without
//! panicking, and an accepted datagram must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecast_index::PageHash;
use pagecast_multicast::wire::decode;

const KEY: [u8; 32] = [7; 32];
const H: PageHash = PageHash::from_bytes([3; 32]);

fuzz_target!(|data: &[u8]| {
    // Try as-is (almost always a MAC failure), and with a valid MAC
    // appended so the field checks behind it are exercised too.
    let _ = decode(data, &KEY, 0x1234, |_, _| Some(H));
    if data.len() < 38 {
        return;
    }
    let mut signed = data.to_vec();
    signed[4..12].copy_from_slice(&0x1234u64.to_be_bytes());
    // The MAC a real sender would compute: data datagrams bind the page's
    // hash in place of the payload.
    let mac = if signed[1] == 1 {
        let mut h = blake3::Hasher::new_keyed(&KEY);
        h.update(&signed[..38]);
        h.update(H.as_bytes());
        h.finalize()
    } else {
        blake3::keyed_hash(&KEY, &signed)
    };
    signed.extend_from_slice(&mac.as_bytes()[..16]);
    if let Ok(d) = decode(&signed, &KEY, 0x1234, |_, _| Some(H)) {
        let mut again = Vec::new();
        d.encode(&KEY, &H, &mut again);
        assert_eq!(again, signed);
    }
});
