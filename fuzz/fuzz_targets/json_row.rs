//! JSON records as a Kafka topic may hold them, read as rows of a schema with every column type:
//! never a panic, and a row written as JSON reads back as the same row (but for what JSON cannot
//! hold: a float that is not finite is written as null).
#![no_main]

use eddy_jobs::{DataType, Field, Schema};

#[allow(dead_code)]
#[path = "../../worker/src/json.rs"]
mod json;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(record) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let schema = Schema::new(vec![
        Field::new("i", DataType::Int),
        Field::new("f", DataType::Float),
        Field::new("s", DataType::String),
        Field::new("b", DataType::Bool),
        Field::new("t", DataType::Timestamp),
    ]);
    let Ok(row) = json::row_from_json(&schema, &record) else { return };
    if row.iter().any(|v| matches!(v, eddy_jobs::Value::Float(f) if !f.is_finite())) {
        return;
    }
    let object = serde_json::Value::Object(json::row_to_json(&schema, &row, None));
    let again = json::row_from_json(&schema, &object).unwrap_or_else(|e| panic!("{row:?} written as {object} reads back: {e}"));
    assert_eq!(format!("{row:?}"), format!("{again:?}"));
});
