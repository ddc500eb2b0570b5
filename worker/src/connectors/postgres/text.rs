//! Values: PostgreSQL's text output read into Eddy's types, shared by the CDC snapshot, its stream
//! and the lookup join; and the rows of `COPY … TO STDOUT` (text format) split into those values.

use std::borrow::Cow;
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

/// Splits one line of `COPY … TO STDOUT` text output (without its newline) into its fields'
/// text, `None` for `\N`. The format escapes a backslash, tab, newline, carriage return, backspace,
/// form feed and vertical tab with a backslash; octal (`\123`) and hex (`\x41`) escapes are
/// read too. Fields without a backslash are borrowed.
pub(crate) fn copy_fields<'a>(line: &'a [u8], out: &mut Vec<Option<Cow<'a, str>>>) -> std::result::Result<(), String> {
    out.clear();
    for field in line.split(|b| *b == b'\t') {
        if field == b"\\N" {
            out.push(None);
            continue;
        }
        let text = if field.contains(&b'\\') { Cow::Owned(unescape(field)) } else { Cow::Borrowed(field) };
        out.push(Some(match text {
            Cow::Borrowed(b) => Cow::Borrowed(std::str::from_utf8(b).map_err(|e| format!("a COPY field is not UTF-8: {e}"))?),
            Cow::Owned(v) => Cow::Owned(String::from_utf8(v).map_err(|e| format!("a COPY field is not UTF-8: {e}"))?),
        }));
    }
    Ok(())
}

fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i == field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        out.push(match c {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                v as u8
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                v as u8
            }
            other => other,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_split_into_fields() {
        let mut out = Vec::new();
        copy_fields("1\t\\N\tplain\ta\\tb\\nc\\\\d\t\\101\\x42\\\\N\tdéjà".as_bytes(), &mut out).unwrap();
        let got: Vec<Option<&str>> = out.iter().map(|f| f.as_deref()).collect();
        assert_eq!(got, [Some("1"), None, Some("plain"), Some("a\tb\nc\\d"), Some("AB\\N"), Some("déjà")]);
        copy_fields(b"", &mut out).unwrap();
        assert_eq!(out, [Some(Cow::Borrowed(""))], "one empty field");
        assert!(copy_fields(b"\xff", &mut out).is_err());
    }

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
