//! Arbitrary bytes as a stream of authenticated control frames carrying
//! cast messages: the frame layer and the message decoder must refuse or
//! accept without panicking, whatever the lengths claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecast_channel::FrameDecoder;
use pagecast_proto::v1;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let key = [5u8; 32];
    // Raw bytes: nearly always refused by length or MAC.
    let mut d = FrameDecoder::new(key);
    let mut input = data;
    while let Ok(p) = d.next(&mut input) {
        let _ = v1::CastFrame::decode(&p[..]);
    }
    // The same bytes as a correctly framed payload: exercises the message
    // decoder on arbitrary content.
    let framed = FrameDecoder::encode(key, 0, data);
    let mut d = FrameDecoder::new(key);
    let p = d.next(&mut &framed[..]).expect("own frame");
    assert_eq!(p, data);
    let _ = v1::CastFrame::decode(&p[..]);
    let _ = v1::AuthHello::decode(data);
});
