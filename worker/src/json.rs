//! Rows as JSON objects and back, as the Kafka connector (and other JSON speakers) exchange them.
//! Timestamps are written as ISO 8601 UTC strings and read from such strings, from PostgreSQL-style
//! `YYYY-MM-DD HH:MM:SS[.fff][+HH]` text, or from epoch milliseconds.

use std::sync::Arc;

use eddy_jobs::time::{format_iso8601, parse_timestamp};
use eddy_jobs::{DataType, Schema, Value};
use serde_json::{Map, Number, Value as Json};

/// A value as JSON.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::Number((*i).into()),
        Value::Float(f) => Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        Value::String(s) => Json::String(s.to_string()),
        Value::Timestamp(t) => Json::String(format_iso8601(*t)),
    }
}

/// The columns `columns` of a row as a JSON object (all columns when `None`).
pub fn row_to_json(schema: &Schema, row: &[Value], columns: Option<&[usize]>) -> Map<String, Json> {
    match columns {
        Some(cols) => cols.iter().map(|&c| (schema.fields[c].name.clone(), to_json(&row[c]))).collect(),
        None => schema.fields.iter().zip(row).map(|(f, v)| (f.name.clone(), to_json(v))).collect(),
    }
}

/// A string as a JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// How a row's timestamps are written as JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamps {
    /// ISO 8601 UTC strings, as [`to_json`] writes them (Kafka, HTTP, ClickHouse).
    Iso8601,
    /// Milliseconds since the epoch, as numbers (files, which the file source reads back).
    EpochMillis,
}

/// Some columns of a row as the text of a JSON object, in their order: each column is given as its
/// name already quoted (by [`json_string`], once, not per row) and its index in the row.
pub fn object_text(columns: &[(String, usize)], row: &[Value], timestamps: Timestamps) -> String {
    let mut out = String::with_capacity(32 * columns.len() + 2);
    push_object(&mut out, columns, row, timestamps);
    out
}

/// Appends [`object_text`] to `out`.
pub fn push_object(out: &mut String, columns: &[(String, usize)], row: &[Value], timestamps: Timestamps) {
    out.push('{');
    for (i, (name, idx)) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push(':');
        push_value(out, row.get(*idx).unwrap_or(&Value::Null), timestamps);
    }
    out.push('}');
}

/// Appends a value as JSON text: what [`to_json`] gives, written without building it.
fn push_value(out: &mut String, v: &Value, timestamps: Timestamps) {
    use std::fmt::Write;
    let _ = match v {
        Value::Null => out.write_str("null"),
        Value::Bool(b) => write!(out, "{b}"),
        Value::Int(i) => write!(out, "{i}"),
        Value::Timestamp(t) if timestamps == Timestamps::EpochMillis => write!(out, "{t}"),
        Value::Timestamp(t) => out.write_str(&json_string(&format_iso8601(*t))),
        Value::Float(f) => match Number::from_f64(*f) {
            Some(n) => write!(out, "{n}"),
            None => out.write_str("null"),
        },
        Value::String(s) => out.write_str(&json_string(s)),
    };
}

/// A JSON value read as `ty`; the error says what was found.
pub fn from_json(j: &Json, ty: DataType) -> Result<Value, String> {
    Ok(match (j, ty) {
        (Json::Null, _) => Value::Null,
        (Json::Bool(b), DataType::Bool) => Value::Bool(*b),
        (Json::Number(n), DataType::Int) => Value::Int(n.as_i64().ok_or_else(|| format!("{n} is not a BIGINT"))?),
        (Json::String(s), DataType::Int) => Value::Int(s.trim().parse().map_err(|_| format!("\"{s}\" is not a BIGINT"))?),
        (Json::Number(n), DataType::Float) => Value::Float(n.as_f64().ok_or_else(|| format!("{n} is not a DOUBLE"))?),
        (Json::String(s), DataType::Float) => Value::Float(s.trim().parse().map_err(|_| format!("\"{s}\" is not a DOUBLE"))?),
        (Json::String(s), DataType::String) => Value::String(Arc::from(s.as_str())),
        (other, DataType::String) => Value::String(Arc::from(other.to_string())),
        (Json::Number(n), DataType::Timestamp) => Value::Timestamp(n.as_i64().ok_or_else(|| format!("{n} is not epoch milliseconds"))?),
        (Json::String(s), DataType::Timestamp) => {
            Value::Timestamp(parse_timestamp(s).ok_or_else(|| format!("\"{s}\" is not a timestamp"))?)
        }
        (Json::String(s), DataType::Bool) => match s.as_str() {
            "true" | "t" => Value::Bool(true),
            "false" | "f" => Value::Bool(false),
            _ => return Err(format!("\"{s}\" is not a BOOLEAN")),
        },
        (other, ty) => return Err(format!("{other} is not a {ty}")),
    })
}

/// A JSON object read as a row of `schema`; absent fields are NULL.
pub fn row_from_json(schema: &Schema, object: &Json) -> Result<Vec<Value>, String> {
    let map = object.as_object().ok_or_else(|| format!("expected a JSON object, got {}", kind(object)))?;
    schema
        .fields
        .iter()
        .map(|f| match map.get(&f.name) {
            None => Ok(Value::Null),
            Some(j) => from_json(j, f.data_type).map_err(|e| format!("field `{}`: {e}", f.name)),
        })
        .collect()
}

fn kind(j: &Json) -> &'static str {
    match j {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_jobs::Field;

    #[test]
    fn rows_round_trip() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int),
            Field::new("name", DataType::String),
            Field::new("score", DataType::Float),
            Field::new("at", DataType::Timestamp),
            Field::new("ok", DataType::Bool),
        ]);
        let row = vec![Value::Int(7), Value::string("a\"b"), Value::Null, Value::Timestamp(1_714_566_896_789), Value::Bool(true)];
        let json = Json::Object(row_to_json(&schema, &row, None));
        assert_eq!(json["at"], "2024-05-01T12:34:56.789Z");
        assert_eq!(row_from_json(&schema, &json).unwrap(), row);
    }

    #[test]
    fn bad_fields_are_named() {
        let schema = Schema::new(vec![Field::new("id", DataType::Int)]);
        let e = row_from_json(&schema, &serde_json::json!({"id": "seven"})).unwrap_err();
        assert!(e.contains("field `id`"), "{e}");
        assert!(row_from_json(&schema, &serde_json::json!([1])).unwrap_err().contains("JSON object"));
    }

    #[test]
    fn object_text_has_the_chosen_columns_in_order() {
        let row = vec![Value::Int(42), Value::string("a\"b\n"), Value::Timestamp(1_714_566_896_789), Value::Float(f64::NAN), Value::Null];
        let cols: Vec<(String, usize)> =
            [("id", 0), ("ts", 2), ("text", 1), ("nan", 3), ("gone", 4)].iter().map(|(n, i)| (json_string(n), *i)).collect();
        let body = object_text(&cols, &row, Timestamps::Iso8601);
        assert_eq!(body, r#"{"id":42,"ts":"2024-05-01T12:34:56.789Z","text":"a\"b\n","nan":null,"gone":null}"#);
        assert_eq!(serde_json::from_str::<Json>(&body).unwrap()["ts"], "2024-05-01T12:34:56.789Z");
        // What the JSON values give, written directly.
        let row = vec![Value::Float(0.1), Value::Float(1.0), Value::Int(-7), Value::Bool(true), Value::Timestamp(-1)];
        let cols: Vec<(String, usize)> = (0..row.len()).map(|i| (json_string(&format!("c{i}")), i)).collect();
        let built: serde_json::Map<String, Json> = (0..row.len()).map(|i| (format!("c{i}"), to_json(&row[i]))).collect();
        assert_eq!(object_text(&cols, &row, Timestamps::Iso8601), Json::Object(built).to_string());
        // Files keep timestamps as epoch milliseconds.
        assert_eq!(object_text(&cols[4..], &row, Timestamps::EpochMillis), r#"{"c4":-1}"#);
    }
}
