//! pgoutput messages as a PostgreSQL server (or whatever answers on its address) may send them:
//! decoding never panics, whatever the bytes.
#![no_main]

#[allow(dead_code)]
#[path = "../../worker/src/connectors/postgres/pgoutput.rs"]
mod pgoutput;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pgoutput::decode_pgoutput(data);
});
