//! Values: PostgreSQL's text output read into Eddy's types, shared by the CDC snapshot, its stream
//! and the lookup join.

use std::sync::Arc;

use eddy_jobs::time::parse_postgres_timestamp;
use eddy_jobs::{DataType, Value};

/// Decodes one value's text output as `ty`.
pub(crate) fn decode_value(text: &str, ty: DataType) -> std::result::Result<Value, String> {
    match ty {
        DataType::String => Ok(Value::String(Arc::from(text))),
        DataType::Int => text.parse::<i64>().map(Value::Int).map_err(|_| format!("`{text}` is not a BIGINT")),
        DataType::Float => text.parse::<f64>().map(Value::Float).map_err(|_| format!("`{text}` is not a DOUBLE")),
        DataType::Bool => match text {
            "t" | "true" => Ok(Value::Bool(true)),
            "f" | "false" => Ok(Value::Bool(false)),
            _ => Err(format!("`{text}` is not a BOOLEAN")),
        },
        DataType::Timestamp => parse_postgres_timestamp(text).map(Value::Timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_postgres_text() {
        let v = |text: &str, ty| decode_value(text, ty);
        assert_eq!(v("-42", DataType::Int), Ok(Value::Int(-42)));
        assert_eq!(v("9223372036854775807", DataType::Int), Ok(Value::Int(i64::MAX)));
        assert!(v("1.5", DataType::Int).is_err());
        assert_eq!(v("12.50", DataType::Float), Ok(Value::Float(12.5)));
        assert_eq!(v("1e-07", DataType::Float), Ok(Value::Float(1e-7)));
        assert_eq!(v("-Infinity", DataType::Float), Ok(Value::Float(f64::NEG_INFINITY)));
        assert!(matches!(v("NaN", DataType::Float), Ok(Value::Float(f)) if f.is_nan()));
        assert_eq!(v("t", DataType::Bool), Ok(Value::Bool(true)));
        assert_eq!(v("false", DataType::Bool), Ok(Value::Bool(false)));
        assert!(v("yes", DataType::Bool).is_err());
        assert_eq!(v("{\"a\": [1, 2]}", DataType::String), Ok(Value::String("{\"a\": [1, 2]}".into())));
        assert_eq!(v("2024-05-01 12:34:56.789+00", DataType::Timestamp), Ok(Value::Timestamp(1_714_566_896_789)));
    }
}
