//! Binary encoding of messages for exchanges between processes: a tag byte per value, fixed-width
//! little-endian numbers, length-prefixed strings. Compact and allocation-light; versioned by the
//! leading byte so a future format can be told apart.

use std::sync::Arc;

use eddy_jobs::Value;

use crate::batch::{Batch, Message, Op};

const VERSION: u8 = 1;
const MSG_DATA: u8 = 0;
const MSG_WATERMARK: u8 = 1;
const MSG_END: u8 = 2;
const MSG_BARRIER: u8 = 3;

/// A frame that could not be decoded: a bug or a version mismatch between workers.
#[derive(Debug, thiserror::Error)]
#[error("corrupt exchange frame: {0}")]
pub struct DecodeError(&'static str);

/// Encodes a message into a new buffer.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(match msg {
        Message::Data(b) => 16 + b.rows.iter().map(|r| 1 + r.len() * 9).sum::<usize>(),
        _ => 16,
    });
    out.push(VERSION);
    match msg {
        Message::Data(batch) => {
            out.push(MSG_DATA);
            out.extend_from_slice(&(batch.rows.len() as u32).to_le_bytes());
            for (row, op) in batch.rows.iter().zip(&batch.ops) {
                out.push(u8::from(*op == Op::Retract));
                out.extend_from_slice(&(row.len() as u16).to_le_bytes());
                for v in row {
                    encode_value(v, &mut out);
                }
            }
        }
        Message::Watermark(w) => {
            out.push(MSG_WATERMARK);
            out.extend_from_slice(&w.to_le_bytes());
        }
        Message::End => out.push(MSG_END),
        Message::Barrier(id) => {
            out.push(MSG_BARRIER);
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out
}

/// Appends one value's encoding (also used for state keys).
pub fn encode_value(v: &Value, out: &mut Vec<u8>) {
    let (tag, bytes): (u8, &[u8]) = match v {
        Value::Null => (0, &[]),
        Value::Bool(b) => (1, &[*b as u8]),
        Value::Int(i) => (2, &i.to_le_bytes()),
        Value::Float(f) => (3, &f.to_bits().to_le_bytes()),
        Value::String(s) => (4, &(s.len() as u32).to_le_bytes()),
        Value::Timestamp(t) => (5, &t.to_le_bytes()),
    };
    out.push(tag);
    out.extend_from_slice(bytes);
    if let Value::String(s) = v {
        out.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self.buf.split_at_checked(n).ok_or(DecodeError("truncated"))?;
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError("truncated"))
    }
    fn value(&mut self) -> Result<Value, DecodeError> {
        Ok(match self.u8()? {
            0 => Value::Null,
            1 => Value::Bool(self.u8()? != 0),
            2 => Value::Int(i64::from_le_bytes(self.fixed()?)),
            3 => Value::Float(f64::from_bits(u64::from_le_bytes(self.fixed()?))),
            4 => {
                let len = u32::from_le_bytes(self.fixed()?) as usize;
                let s = std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError("invalid utf-8"))?;
                Value::String(Arc::from(s))
            }
            5 => Value::Timestamp(i64::from_le_bytes(self.fixed()?)),
            _ => return Err(DecodeError("unknown value tag")),
        })
    }
    /// `v`, if nothing is left to read.
    fn end<T>(self, v: T) -> Result<T, DecodeError> {
        self.buf.is_empty().then_some(v).ok_or(DecodeError("trailing bytes"))
    }
}

/// Decodes a message produced by [`encode`].
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf };
    if r.u8()? != VERSION {
        return Err(DecodeError("unknown format version"));
    }
    let msg = match r.u8()? {
        MSG_DATA => {
            // Counts come from the sender: room is reserved only for what the bytes left can hold
            // (a row takes 3 bytes at least, a value 1), so a forged count allocates nothing large.
            let n = u32::from_le_bytes(r.fixed()?) as usize;
            let mut batch = Batch::with_capacity(n.min(r.buf.len() / 3));
            for _ in 0..n {
                let op = if r.u8()? == 0 { Op::Insert } else { Op::Retract };
                let width = u16::from_le_bytes(r.fixed()?) as usize;
                let mut row = Vec::with_capacity(width.min(r.buf.len()));
                for _ in 0..width {
                    row.push(r.value()?);
                }
                batch.push(row, op);
            }
            Message::Data(batch)
        }
        MSG_WATERMARK => Message::Watermark(i64::from_le_bytes(r.fixed()?)),
        MSG_END => Message::End,
        MSG_BARRIER => Message::Barrier(u64::from_le_bytes(r.fixed()?)),
        _ => return Err(DecodeError("unknown message tag")),
    };
    r.end(msg)
}

/// Decodes `n` values written one after another by [`encode_value`] (a state key).
pub fn decode_values(buf: &[u8], n: usize) -> Result<Vec<Value>, DecodeError> {
    let mut r = Reader { buf };
    let values = (0..n).map(|_| r.value()).collect::<Result<Vec<_>, _>>()?;
    r.end(values)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any value (for property tests here and of the state backends).
    pub(crate) fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_filter("NaN never equals itself", |f| !f.is_nan()).prop_map(Value::Float),
            ".{0,12}".prop_map(|s| Value::string(&s)),
            any::<i64>().prop_map(Value::Timestamp),
        ]
    }

    proptest! {
        #[test]
        fn batches_round_trip(rows in prop::collection::vec((prop::collection::vec(value(), 0..6), any::<bool>()), 0..20)) {
            let mut batch = Batch::default();
            for (row, retract) in rows {
                batch.push(row, if retract { Op::Retract } else { Op::Insert });
            }
            let msg = Message::Data(batch);
            prop_assert_eq!(decode(&encode(&msg)).unwrap(), msg);
        }
    }

    #[test]
    fn control_messages_round_trip() {
        for m in [Message::Watermark(-5), Message::Watermark(i64::MAX), Message::End, Message::Barrier(7)] {
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
        assert!(decode(&[9, 0]).is_err());
    }

    /// A frame claiming four billion rows (or a row of 65,535 values) in a few bytes is refused
    /// for what it lacks, without reserving room for what it claims (about 100 GB: an abort).
    #[test]
    fn a_forged_count_is_refused_without_a_large_allocation() {
        let mut rows = vec![VERSION, MSG_DATA];
        rows.extend(u32::MAX.to_le_bytes());
        assert!(matches!(decode(&rows), Err(DecodeError("truncated"))));
        let mut wide = vec![VERSION, MSG_DATA];
        wide.extend(1u32.to_le_bytes());
        wide.push(0);
        wide.extend(u16::MAX.to_le_bytes());
        assert!(matches!(decode(&wide), Err(DecodeError("truncated"))));
    }
}
