//! Arbitrary bytes as a QEMU migration stream reaching the source agent's
//! proxy: it must refuse or pass through without panicking, and whatever
//! it accepts it hands back byte for byte, pages in place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecast_qemu::{PAGE, Sink, StreamError, proxy};

struct Join(Vec<u8>);

impl Sink for Join {
    fn raw(&mut self, b: &[u8]) -> Result<(), StreamError> {
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn page(&mut self, _: &str, _: u64, p: &[u8; PAGE]) -> Result<(), StreamError> {
        self.0.extend_from_slice(p);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut j = Join(Vec::new());
    if proxy(&mut &data[..], &mut j).is_ok() {
        assert_eq!(j.0, data);
    }
});
