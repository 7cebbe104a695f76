//! Arbitrary bytes as the plaintext a TLS connection delivers: the frame
//! layer (`[u32 length][protobuf]`) and the message decoders must refuse or
//! accept without panicking, whatever the lengths claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecast_channel::FrameDecoder;
use pagecast_proto::v1;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder;
    let mut input = data;
    while let Ok(p) = d.next(&mut input, "fuzz") {
        let _ = v1::CastFrame::decode(&p[..]);
        let _ = v1::AgentRequest::decode(&p[..]);
        let _ = v1::MigrateFrame::decode(&p[..]);
    }
    // The same bytes as one well-framed payload: the decoders on arbitrary
    // content.
    let mut framed = (data.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(data);
    if data.len() <= pagecast_proto::MAX_CONTROL_FRAME_BYTES {
        let p = d.next(&mut &framed[..], "fuzz").expect("own frame");
        assert_eq!(p, data);
    }
    let _ = v1::AgentRequest::decode(data);
});
