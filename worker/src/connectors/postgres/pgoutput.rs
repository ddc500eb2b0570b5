//! pgoutput, protocol version 1: the logical replication messages PostgreSQL sends, decoded.

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PgOutput<'a> {
    Begin { final_lsn: u64, xid: u32 },
    Commit { lsn: u64, end_lsn: u64 },
    Origin { name: &'a str },
    Relation(Relation),
    Type { oid: u32, name: &'a str },
    Insert { relation: u32, new: Vec<Datum<'a>> },
    Update { relation: u32, old: Option<OldTuple<'a>>, new: Vec<Datum<'a>> },
    Delete { relation: u32, old: OldTuple<'a> },
    Truncate { relations: Vec<u32> },
    Message { prefix: &'a str },
}

/// A relation message: a table's identity and columns, sent before its first change in a session
/// and again after its definition changes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Relation {
    pub(crate) id: u32,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) replica_identity: u8,
    pub(crate) columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RelationColumn {
    pub(crate) name: String,
    pub(crate) type_oid: u32,
    pub(crate) key: bool,
}

/// An update's or delete's old row: the whole row (`REPLICA IDENTITY FULL`) or its key only.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OldTuple<'a> {
    Full(Vec<Datum<'a>>),
    Key(Vec<Datum<'a>>),
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Datum<'a> {
    Null,
    /// A TOASTed value the update did not change (not sent).
    Unchanged,
    Text(&'a str),
}

pub(crate) fn decode_pgoutput(data: &[u8]) -> std::result::Result<PgOutput<'_>, String> {
    let mut w = Wire { b: data, i: 0 };
    let tag = w.u8()?;
    let message = match tag {
        b'B' => {
            let final_lsn = w.u64()?;
            let _commit_time = w.u64()?;
            PgOutput::Begin { final_lsn, xid: w.u32()? }
        }
        b'C' => {
            let _flags = w.u8()?;
            let lsn = w.u64()?;
            let end_lsn = w.u64()?;
            let _commit_time = w.u64()?;
            PgOutput::Commit { lsn, end_lsn }
        }
        b'O' => {
            let _lsn = w.u64()?;
            PgOutput::Origin { name: w.cstr()? }
        }
        b'R' => {
            let id = w.u32()?;
            let namespace = w.cstr()?.to_string();
            let name = w.cstr()?.to_string();
            let replica_identity = w.u8()?;
            let n = w.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let key = w.u8()? & 1 == 1;
                let name = w.cstr()?.to_string();
                let type_oid = w.u32()?;
                let _type_modifier = w.u32()?;
                columns.push(RelationColumn { name, type_oid, key });
            }
            PgOutput::Relation(Relation { id, namespace, name, replica_identity, columns })
        }
        b'Y' => {
            let oid = w.u32()?;
            let _namespace = w.cstr()?;
            PgOutput::Type { oid, name: w.cstr()? }
        }
        b'I' => {
            let relation = w.u32()?;
            w.tag(b'N')?;
            PgOutput::Insert { relation, new: w.tuple()? }
        }
        b'U' => {
            let relation = w.u32()?;
            // The old tuple, if any, comes first; the new one always follows an `N`.
            let old = if w.b.get(w.i) == Some(&b'N') { None } else { Some(w.old_tuple("update")?) };
            w.tag(b'N')?;
            PgOutput::Update { relation, old, new: w.tuple()? }
        }
        b'D' => PgOutput::Delete { relation: w.u32()?, old: w.old_tuple("delete")? },
        b'T' => {
            let n = w.u32()?;
            let _options = w.u8()?;
            let relations = (0..n).map(|_| w.u32()).collect::<std::result::Result<_, _>>()?;
            PgOutput::Truncate { relations }
        }
        b'M' => {
            let _flags = w.u8()?;
            let _lsn = w.u64()?;
            let prefix = w.cstr()?;
            let n = w.u32()?;
            w.take(n as usize)?;
            PgOutput::Message { prefix }
        }
        other => return Err(format!("unexpected pgoutput message `{}`", other as char)),
    };
    if w.i != data.len() {
        return Err(format!("pgoutput `{}` message has {} trailing bytes", tag as char, data.len() - w.i));
    }
    Ok(message)
}

/// A cursor over a pgoutput message (big-endian integers, NUL-terminated strings).
pub(crate) struct Wire<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) i: usize,
}

impl<'a> Wire<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.i.checked_add(n).filter(|e| *e <= self.b.len()).ok_or("truncated pgoutput message")?;
        let bytes = &self.b[self.i..end];
        self.i = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    fn tag(&mut self, expected: u8) -> std::result::Result<(), String> {
        match self.u8()? {
            b if b == expected => Ok(()),
            b => Err(format!("expected `{}`, found `{}`", expected as char, b as char)),
        }
    }
    fn cstr(&mut self) -> std::result::Result<&'a str, String> {
        let rest = &self.b[self.i..];
        let n = rest.iter().position(|b| *b == 0).ok_or("unterminated string in pgoutput message")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a name in a pgoutput message is not UTF-8".to_string())?;
        self.i += n + 1;
        Ok(s)
    }
    /// An update's or delete's old tuple: the whole row (`O`) or its key (`K`).
    fn old_tuple(&mut self, what: &str) -> std::result::Result<OldTuple<'a>, String> {
        match self.u8()? {
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            other => Err(format!("{what}: unexpected tuple kind `{}`", other as char)),
        }
    }
    fn tuple(&mut self) -> std::result::Result<Vec<Datum<'a>>, String> {
        let n = self.u16()?;
        let mut datums = Vec::with_capacity(n as usize);
        for _ in 0..n {
            datums.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Datum::Text(std::str::from_utf8(self.take(len)?).map_err(|_| "a text value is not UTF-8".to_string())?)
                }
                b'b' => return Err("binary tuple data was not asked for".into()),
                other => return Err(format!("unexpected tuple data kind `{}`", other as char)),
            });
        }
        Ok(datums)
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    pub fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    // Captured from PostgreSQL 15 (`pg_logical_slot_peek_binary_changes`, proto_version 1) for
    // `fx (id bigint, u uuid, t text, ts timestamptz, n int, j jsonb, b bool, m numeric)`, REPLICA
    // IDENTITY FULL, OID 16390: an insert, `UPDATE fx SET t = 'bye', n = 7`, then a delete.
    pub const FX_BEGIN: &str = "42000000000196ba6800030470b78f4966000002e4";
    pub const FX_RELATION: &str = "52000040067075626c6963006678006600080169640000000014ffffffff01750000000b86ffffffff01740000000019ffffffff01747300000004a0ffffffff016e0000000017ffffffff016a0000000edaffffffff01620000000010ffffffff016d00000006a4ffffffff";
    pub const FX_INSERT: &str = "49000040064e0008740000000131740000002461306565626339392d396330622d346566382d626236642d366262396264333830613131740000000668c3a96c6c6f740000001a323032342d30352d30312031323a33343a35362e3738392b30306e740000000d7b2261223a205b312c20325d7d740000000174740000000531322e3530";
    pub const FX_COMMIT: &str = "4300000000000196ba68000000000196ba9800030470b78f4966";
    pub const FX_UPDATE: &str = "55000040064f0008740000000131740000002461306565626339392d396330622d346566382d626236642d366262396264333830613131740000000668c3a96c6c6f740000001a323032342d30352d30312031323a33343a35362e3738392b30306e740000000d7b2261223a205b312c20325d7d740000000174740000000531322e35304e0008740000000131740000002461306565626339392d396330622d346566382d626236642d3662623962643338306131317400000003627965740000001a323032342d30352d30312031323a33343a35362e3738392b3030740000000137740000000d7b2261223a205b312c20325d7d740000000174740000000531322e3530";
    pub const FX_DELETE: &str = "44000040064f0008740000000131740000002461306565626339392d396330622d346566382d626236642d3662623962643338306131317400000003627965740000001a323032342d30352d30312031323a33343a35362e3738392b3030740000000137740000000d7b2261223a205b312c20325d7d740000000174740000000531322e3530";
    // `fy (id int, big text STORAGE EXTERNAL, k int)`, OID 16399: `UPDATE fy SET k = 2` leaves the
    // 3000-byte `big` out of the new tuple ('u'); then `TRUNCATE fy`.
    pub const FY_RELATION: &str =
        "520000400f7075626c6963006679006600030169640000000017ffffffff016269670000000019ffffffff016b0000000017ffffffff";
    pub const FY_TRUNCATE: &str = "5400000001000000400f";

    pub fn fy_update() -> Vec<u8> {
        let mut b = hex("550000400f4f00037400000001317400000bb8");
        b.extend(std::iter::repeat_n(b'x', 3000));
        b.extend(hex("7400000001314e000374000000013175740000000132"));
        b
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn pgoutput_messages_decode() {
        assert_eq!(decode_pgoutput(&hex(FX_BEGIN)), Ok(PgOutput::Begin { final_lsn: 0x196_BA68, xid: 740 }));
        assert_eq!(decode_pgoutput(&hex(FX_COMMIT)), Ok(PgOutput::Commit { lsn: 0x196_BA68, end_lsn: 0x196_BA98 }));
        let Ok(PgOutput::Relation(rel)) = decode_pgoutput(&hex(FX_RELATION)) else { panic!("not a relation") };
        assert_eq!((rel.id, rel.namespace.as_str(), rel.name.as_str(), rel.replica_identity), (16390, "public", "fx", b'f'));
        let columns: Vec<(&str, u32, bool)> = rel.columns.iter().map(|c| (c.name.as_str(), c.type_oid, c.key)).collect();
        assert_eq!(
            columns,
            [
                ("id", 20, true),
                ("u", 2950, true),
                ("t", 25, true),
                ("ts", 1184, true),
                ("n", 23, true),
                ("j", 3802, true),
                ("b", 16, true),
                ("m", 1700, true)
            ],
            "with REPLICA IDENTITY FULL every column is part of the identity"
        );
        let new = vec![
            Datum::Text("1"),
            Datum::Text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Datum::Text("héllo"),
            Datum::Text("2024-05-01 12:34:56.789+00"),
            Datum::Null,
            Datum::Text("{\"a\": [1, 2]}"),
            Datum::Text("t"),
            Datum::Text("12.50"),
        ];
        assert_eq!(decode_pgoutput(&hex(FX_INSERT)), Ok(PgOutput::Insert { relation: 16390, new: new.clone() }));
        let mut updated = new.clone();
        updated[2] = Datum::Text("bye");
        updated[4] = Datum::Text("7");
        assert_eq!(
            decode_pgoutput(&hex(FX_UPDATE)),
            Ok(PgOutput::Update { relation: 16390, old: Some(OldTuple::Full(new)), new: updated.clone() })
        );
        let delete = hex(FX_DELETE);
        assert_eq!(decode_pgoutput(&delete), Ok(PgOutput::Delete { relation: 16390, old: OldTuple::Full(updated) }));
        let fy_update = fy_update();
        let Ok(PgOutput::Update { old: Some(OldTuple::Full(old)), new, .. }) = decode_pgoutput(&fy_update) else { panic!("not an update") };
        assert!(matches!(old[1], Datum::Text(t) if t.len() == 3000));
        assert_eq!(new, [Datum::Text("1"), Datum::Unchanged, Datum::Text("2")]);
        assert_eq!(decode_pgoutput(&hex(FY_TRUNCATE)), Ok(PgOutput::Truncate { relations: vec![16399] }));

        // Hand-built: a type, an origin and a logical message; then malformed input.
        let mut ty = hex("590000abcd");
        ty.extend(b"public\0mood\0");
        assert_eq!(decode_pgoutput(&ty), Ok(PgOutput::Type { oid: 0xabcd, name: "mood" }));
        let mut origin = hex("4f0000000000000010");
        origin.extend(b"node_a\0");
        assert_eq!(decode_pgoutput(&origin), Ok(PgOutput::Origin { name: "node_a" }));
        let mut message = hex("010000000000000020");
        message.insert(0, b'M');
        message.extend(b"eddy\0");
        message.extend(hex("00000002"));
        message.extend(b"hi");
        assert_eq!(decode_pgoutput(&message), Ok(PgOutput::Message { prefix: "eddy" }));
        let insert = hex(FX_INSERT);
        assert!(decode_pgoutput(&insert[..insert.len() - 1]).is_err(), "truncated");
        let mut longer = insert.clone();
        longer.push(0);
        assert!(decode_pgoutput(&longer).is_err(), "trailing bytes");
        assert!(decode_pgoutput(b"Z").is_err(), "unknown message");
        assert!(decode_pgoutput(&[]).is_err(), "empty");
    }
}
