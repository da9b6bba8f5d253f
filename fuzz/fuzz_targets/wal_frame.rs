//! Feeds arbitrary bytes to the WAL frame parser: it must never panic, and a
//! frame it accepts must re-encode to exactly the bytes it came from.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walship_io::Frame;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let mut at = 0;
    while at < bytes.len() {
        match Frame::decode(&bytes.slice(at..)) {
            Ok((frame, len)) => {
                assert_eq!(frame.to_bytes(), bytes.slice(at..at + len));
                at += len;
            }
            Err(_) => break,
        }
    }
});
