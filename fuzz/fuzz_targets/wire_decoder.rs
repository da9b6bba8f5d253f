//! Feeds arbitrary bytes to the wire decoder: it must never panic, and every
//! message it yields must re-encode to a frame that decodes to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};
use walship_io::WireCodec;

fuzz_target!(|data: &[u8]| {
    let mut codec = WireCodec::new(1 << 20);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(envelope)) = codec.decode(&mut buf) {
        let mut again = BytesMut::new();
        if codec.encode(envelope.clone(), &mut again).is_ok() {
            assert_eq!(codec.decode(&mut again).ok().flatten(), Some(envelope));
        }
    }
});
