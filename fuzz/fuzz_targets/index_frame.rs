//! Arbitrary bytes as a stream of content-index frames, and as a stored
//! holder list: both decoders must refuse or accept without panicking,
//! whatever the lengths claim, and what they accept must re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecast_index::holders::HolderList;
use pagecast_index::wire::{decode_frame, encode_frame, read_frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((frame, used)) = decode_frame(rest, "fuzz") {
        // A decoded frame re-encodes to a frame that decodes the same.
        let again = encode_frame(&frame);
        assert_eq!(decode_frame(&again, "fuzz").expect("own frame").0, frame);
        rest = &rest[used..];
    }
    let mut r = data;
    while read_frame(&mut r, "fuzz").is_ok() {}
    if let Ok(l) = HolderList::decode(data) {
        assert_eq!(l.encode(), data);
    }
});
