//! Feeds arbitrary bytes to the manifest decoder, as a header and then as
//! chunks separated by 0xff bytes. It must refuse or accept, never panic or
//! hang; a manifest it accepts must survive a round trip through the
//! encoder unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecast_memory::manifest::ManifestDecoder;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let (header, rest) = data.split_at((split as usize * 2).min(data.len()));
    let Ok(mut d) = ManifestDecoder::from_header_bytes(header) else {
        return;
    };
    for piece in rest.split(|&b| b == 0xff) {
        let _ = d.push_bytes(piece);
    }
    if let Ok(m) = d.finish() {
        let mut again = ManifestDecoder::new(&m.header()).expect("own header");
        for c in m.chunks(1 + split as u32) {
            again.push_bytes(&c.encode_to_vec()).expect("own chunk");
        }
        assert_eq!(again.finish().expect("own manifest"), m);
    }
});
