//! Lines of `COPY … TO STDOUT` text output as a PostgreSQL server (or whatever answers on its
//! address) may send them, split into fields and read as every column type: never a panic.
#![no_main]

use eddy_jobs::DataType;

#[allow(dead_code)]
#[path = "../../worker/src/connectors/postgres/text.rs"]
mod text;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut fields = Vec::new();
    if text::copy_fields(data, &mut fields).is_err() {
        return;
    }
    for field in fields.iter().flatten() {
        for ty in [DataType::Int, DataType::Float, DataType::Bool, DataType::Timestamp, DataType::String] {
            let _ = text::decode_value(field, ty);
        }
    }
});
