//! Exchange frames as another worker (or anyone reaching the data port) may send them: decoding
//! never panics nor allocates more than the frame can describe, and what decodes encodes back to
//! a frame that decodes to the same message.
#![no_main]

// The worker's own modules, compiled here without the rest of the worker (whose RocksDB and
// librdkafka would otherwise be built again with coverage instrumentation).
#[allow(dead_code)]
#[path = "../../worker/src/batch.rs"]
mod batch;
#[allow(dead_code)]
#[path = "../../worker/src/codec.rs"]
mod codec;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(message) = codec::decode(data) {
        let again = codec::decode(&codec::encode(&message)).expect("an encoded message decodes");
        assert_eq!(format!("{message:?}"), format!("{again:?}"));
    }
});
