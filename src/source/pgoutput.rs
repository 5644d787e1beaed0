//! Decoder for the pgoutput logical replication protocol, version 1: turns the
//! payload of one XLogData message into a typed [`PgOutputMessage`].
//!
//! This module owns the wire format only. It knows nothing about relations seen
//! earlier in the stream, column types or how values are interpreted; callers
//! keep the relation cache and convert column text (see `super::value`).
//!
//! Column values are zero-copy slices of the input buffer: a large transaction
//! passes every row through here, and copying each value would double the
//! memory traffic for no gain.

use bytes::Bytes;

/// A PostgreSQL WAL location (XLogRecPtr).
pub type Lsn = u64;

/// One decoded pgoutput (protocol version 1) message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutputMessage {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 00:00:00 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        /// Microseconds since 2000-01-01 00:00:00 UTC.
        commit_time: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        rel_id: u32,
        new: TupleData,
    },
    Update {
        rel_id: u32,
        old: Option<OldTuple>,
        new: TupleData,
    },
    Delete {
        rel_id: u32,
        old: OldTuple,
    },
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        rel_ids: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// Describes a relation's columns; sent before the first change to it in a
/// session and again whenever its definition changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `relreplident`: `b'd'` default, `b'n'` nothing, `b'f'` full, `b'i'` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old row carried by an Update or Delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// Only the replica identity columns are meaningful (`'K'`); the others are
    /// sent as [`ColumnValue::Null`].
    Key(TupleData),
    /// The whole old row (`'O'`, replica identity FULL).
    Full(TupleData),
}

/// One row, column values in the relation's column order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TupleData(pub Vec<ColumnValue>);

#[derive(Debug, Clone, PartialEq)]
pub enum ColumnValue {
    Null,
    /// A TOASTed value that the change did not modify, so the server did not
    /// send it; the consumer must keep the value it already has.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("truncated pgoutput {message} message: missing {field}")]
    Truncated {
        message: &'static str,
        field: &'static str,
    },
    #[error("unknown pgoutput message tag 0x{tag:02x}")]
    UnknownTag { tag: u8 },
    #[error(
        "unsupported pgoutput message {name} (tag {:?}): only protocol version 1 is supported",
        char::from(*tag)
    )]
    Unsupported { tag: u8, name: &'static str },
    #[error("unknown tuple column kind 0x{kind:02x} in pgoutput {message} message")]
    UnknownColumnKind { message: &'static str, kind: u8 },
    #[error(
        "unexpected tuple marker 0x{found:02x} in pgoutput {message} message, expected {expected}"
    )]
    UnexpectedTupleMarker {
        message: &'static str,
        found: u8,
        expected: &'static str,
    },
    #[error("invalid UTF-8 in {field} of pgoutput {message} message")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
    },
    #[error("negative length {len} for {field} in pgoutput {message} message")]
    NegativeLength {
        message: &'static str,
        field: &'static str,
        len: i32,
    },
    #[error("{count} unexpected trailing bytes after pgoutput {message} message")]
    TrailingBytes { message: &'static str, count: usize },
}

/// Decodes one pgoutput message (the payload of an XLogData message).
///
/// The whole buffer must be exactly one message: trailing bytes are an error,
/// because they mean the server speaks a different protocol version than the
/// one we asked for, and guessing would silently misread every later field.
pub fn decode(buf: &Bytes) -> Result<PgOutputMessage, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty);
    };
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        _ => {
            return Err(match unsupported_name(tag) {
                Some(name) => DecodeError::Unsupported { tag, name },
                None => DecodeError::UnknownTag { tag },
            })
        }
    };
    let mut r = Reader {
        buf,
        pos: 1,
        message,
    };
    let decoded = match tag {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        },
        b'C' => PgOutputMessage::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_time: r.i64("commit timestamp")?,
        },
        b'O' => PgOutputMessage::Origin {
            commit_lsn: r.u64("commit LSN")?,
            name: r.string("origin name")?,
        },
        b'R' => PgOutputMessage::Relation(r.relation()?),
        b'Y' => PgOutputMessage::Type {
            oid: r.u32("type oid")?,
            namespace: r.string("namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let rel_id = r.u32("relation id")?;
            let marker = r.u8("new tuple marker")?;
            if marker != b'N' {
                return Err(r.unexpected_marker(marker, "'N'"));
            }
            PgOutputMessage::Insert {
                rel_id,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let rel_id = r.u32("relation id")?;
            let mut marker = r.u8("tuple marker")?;
            let old = match marker {
                b'K' | b'O' => {
                    let tuple = r.tuple()?;
                    let old = if marker == b'K' {
                        OldTuple::Key(tuple)
                    } else {
                        OldTuple::Full(tuple)
                    };
                    marker = r.u8("new tuple marker")?;
                    Some(old)
                }
                _ => None,
            };
            if marker != b'N' {
                let expected = if old.is_some() {
                    "'N'"
                } else {
                    "'K', 'O' or 'N'"
                };
                return Err(r.unexpected_marker(marker, expected));
            }
            PgOutputMessage::Update {
                rel_id,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel_id = r.u32("relation id")?;
            let old = match r.u8("old tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => return Err(r.unexpected_marker(other, "'K' or 'O'")),
            };
            PgOutputMessage::Delete { rel_id, old }
        }
        b'T' => {
            let count = r.u32("relation count")?;
            let options = r.u8("options")?;
            // The count comes off the wire: bound the allocation by what the
            // buffer can actually hold so a corrupt count cannot exhaust memory.
            let mut rel_ids = Vec::with_capacity((count as usize).min(r.remaining() / 4));
            for _ in 0..count {
                rel_ids.push(r.u32("relation id")?);
            }
            PgOutputMessage::Truncate { options, rel_ids }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.u64("LSN")?;
            let prefix = r.string("prefix")?;
            let len = r.length("content length")?;
            PgOutputMessage::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            }
        }
        // Every tag reaching here was named in the first match.
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish()?;
    Ok(decoded)
}

/// Tags that later protocol versions (2: streaming, 3: two-phase commit) send;
/// naming them tells the operator the slot was asked for the wrong version.
fn unsupported_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

/// Cursor over one message; carries the message name so every error can say
/// where it happened.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, field: &'static str) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
        }
    }

    fn unexpected_marker(&self, found: u8, expected: &'static str) -> DecodeError {
        DecodeError::UnexpectedTupleMarker {
            message: self.message,
            found,
            expected,
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N).ok_or(self.truncated(field))?;
        let slice = self.buf.get(self.pos..end).ok_or(self.truncated(field))?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    /// An Int32 byte count; the server never sends a negative one.
    fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(field)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field,
            len,
        })
    }

    fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(field));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated string. Names are small and outlive the buffer in the
    /// relation cache, so they are copied rather than sliced.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(self.truncated(field))?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
        })?;
        self.pos += nul + 1;
        Ok(s.to_owned())
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32("relation id")?;
        let namespace = self.string("namespace")?;
        let name = self.string("relation name")?;
        let replica_identity = self.u8("replica identity")?;
        let count = self.u16("column count")?;
        // Smallest column: flags, empty name, type oid, type modifier.
        let mut columns = Vec::with_capacity(usize::from(count).min(self.remaining() / 10));
        for _ in 0..count {
            let flags = self.u8("column flags")?;
            columns.push(RelationColumn {
                is_key: flags & 1 != 0,
                name: self.string("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.u16("tuple column count")?;
        // Every column takes at least its kind byte.
        let mut values = Vec::with_capacity(usize::from(count).min(self.remaining()));
        for _ in 0..count {
            let value = match self.u8("tuple column kind")? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => {
                    let len = self.length("column value length")?;
                    ColumnValue::Text(self.bytes(len, "column value")?)
                }
                b'b' => {
                    let len = self.length("column value length")?;
                    ColumnValue::Binary(self.bytes(len, "column value")?)
                }
                kind => {
                    return Err(DecodeError::UnknownColumnKind {
                        message: self.message,
                        kind,
                    })
                }
            };
            values.push(value);
        }
        Ok(TupleData(values))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                count,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test-only encoder that writes fields the way the server does.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn tag(t: u8) -> Self {
            Enc(vec![t])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn tuple(mut self, cols: &[ColumnValue]) -> Self {
            self = self.u16(cols.len() as u16);
            for c in cols {
                self = match c {
                    ColumnValue::Null => self.u8(b'n'),
                    ColumnValue::UnchangedToast => self.u8(b'u'),
                    ColumnValue::Text(b) => self.u8(b't').i32(b.len() as i32).raw(b),
                    ColumnValue::Binary(b) => self.u8(b'b').i32(b.len() as i32).raw(b),
                };
            }
            self
        }
        fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn text(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn hex(s: &str) -> Bytes {
        let digits: Vec<u8> = s
            .as_bytes()
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect();
        Bytes::from(digits)
    }

    fn row() -> Vec<ColumnValue> {
        vec![
            text("42"),
            ColumnValue::Null,
            ColumnValue::UnchangedToast,
            ColumnValue::Binary(Bytes::from_static(&[0, 1, 2])),
            text(""),
            text("héllo"),
        ]
    }

    /// One hand-built sample of every message type with the value it must
    /// decode to.
    fn samples() -> Vec<(Bytes, PgOutputMessage)> {
        vec![
            (
                Enc::tag(b'B').u64(0x0153_37e0).i64(-5).u32(729).bytes(),
                PgOutputMessage::Begin {
                    final_lsn: 0x0153_37e0,
                    commit_time: -5,
                    xid: 729,
                },
            ),
            (
                Enc::tag(b'C')
                    .u8(0)
                    .u64(1)
                    .u64(u64::MAX)
                    .i64(i64::MIN)
                    .bytes(),
                PgOutputMessage::Commit {
                    flags: 0,
                    commit_lsn: 1,
                    end_lsn: u64::MAX,
                    commit_time: i64::MIN,
                },
            ),
            (
                Enc::tag(b'O').u64(77).str("node_a").bytes(),
                PgOutputMessage::Origin {
                    commit_lsn: 77,
                    name: "node_a".into(),
                },
            ),
            (
                Enc::tag(b'R')
                    .u32(16389)
                    .str("")
                    .str("users")
                    .u8(b'f')
                    .u16(2)
                    .u8(1)
                    .str("id")
                    .u32(20)
                    .i32(-1)
                    .u8(0)
                    .str("naïve")
                    .u32(1043)
                    .i32(259)
                    .bytes(),
                PgOutputMessage::Relation(Relation {
                    id: 16389,
                    namespace: String::new(),
                    name: "users".into(),
                    replica_identity: b'f',
                    columns: vec![
                        RelationColumn {
                            is_key: true,
                            name: "id".into(),
                            type_oid: 20,
                            type_modifier: -1,
                        },
                        RelationColumn {
                            is_key: false,
                            name: "naïve".into(),
                            type_oid: 1043,
                            type_modifier: 259,
                        },
                    ],
                }),
            ),
            (
                Enc::tag(b'Y').u32(16385).str("public").str("mood").bytes(),
                PgOutputMessage::Type {
                    oid: 16385,
                    namespace: "public".into(),
                    name: "mood".into(),
                },
            ),
            (
                Enc::tag(b'I').u32(7).u8(b'N').tuple(&row()).bytes(),
                PgOutputMessage::Insert {
                    rel_id: 7,
                    new: TupleData(row()),
                },
            ),
            (
                Enc::tag(b'U').u32(7).u8(b'N').tuple(&row()).bytes(),
                PgOutputMessage::Update {
                    rel_id: 7,
                    old: None,
                    new: TupleData(row()),
                },
            ),
            (
                Enc::tag(b'U')
                    .u32(7)
                    .u8(b'K')
                    .tuple(&[text("1"), ColumnValue::Null])
                    .u8(b'N')
                    .tuple(&[text("2"), text("x")])
                    .bytes(),
                PgOutputMessage::Update {
                    rel_id: 7,
                    old: Some(OldTuple::Key(TupleData(vec![text("1"), ColumnValue::Null]))),
                    new: TupleData(vec![text("2"), text("x")]),
                },
            ),
            (
                Enc::tag(b'U')
                    .u32(7)
                    .u8(b'O')
                    .tuple(&row())
                    .u8(b'N')
                    .tuple(&[])
                    .bytes(),
                PgOutputMessage::Update {
                    rel_id: 7,
                    old: Some(OldTuple::Full(TupleData(row()))),
                    new: TupleData::default(),
                },
            ),
            (
                Enc::tag(b'D').u32(9).u8(b'K').tuple(&[text("1")]).bytes(),
                PgOutputMessage::Delete {
                    rel_id: 9,
                    old: OldTuple::Key(TupleData(vec![text("1")])),
                },
            ),
            (
                Enc::tag(b'D').u32(9).u8(b'O').tuple(&row()).bytes(),
                PgOutputMessage::Delete {
                    rel_id: 9,
                    old: OldTuple::Full(TupleData(row())),
                },
            ),
            (
                Enc::tag(b'T').u32(2).u8(3).u32(10).u32(11).bytes(),
                PgOutputMessage::Truncate {
                    options: 3,
                    rel_ids: vec![10, 11],
                },
            ),
            (
                Enc::tag(b'M')
                    .u8(1)
                    .u64(99)
                    .str("pfx")
                    .i32(3)
                    .raw(&[0, 0xff, 7])
                    .bytes(),
                PgOutputMessage::Message {
                    transactional: true,
                    lsn: 99,
                    prefix: "pfx".into(),
                    content: Bytes::from_static(&[0, 0xff, 7]),
                },
            ),
            (
                Enc::tag(b'M').u8(0).u64(5).str("").i32(0).bytes(),
                PgOutputMessage::Message {
                    transactional: false,
                    lsn: 5,
                    prefix: String::new(),
                    content: Bytes::new(),
                },
            ),
        ]
    }

    #[test]
    fn decodes_every_message_type() {
        for (bytes, expected) in samples() {
            let got = decode(&bytes).unwrap_or_else(|e| panic!("{expected:?}: {e}"));
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn every_proper_prefix_is_an_error() {
        for (bytes, _) in samples() {
            for len in 0..bytes.len() {
                let prefix = bytes.slice(..len);
                assert!(decode(&prefix).is_err(), "prefix {len} of {bytes:?}");
            }
        }
    }

    #[test]
    fn truncation_names_message_and_field() {
        let bytes = Enc::tag(b'B').u64(1).u32(0).bytes();
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Truncated {
                message: "Begin",
                field: "commit timestamp"
            }
        ));
        assert_eq!(
            err.to_string(),
            "truncated pgoutput Begin message: missing commit timestamp"
        );
        let bytes = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(10)
            .raw(b"abc")
            .bytes();
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::Truncated {
                message: "Insert",
                field: "column value"
            })
        ));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for (bytes, _) in samples() {
            let mut longer = bytes.to_vec();
            longer.push(0);
            let err = decode(&Bytes::from(longer)).unwrap_err();
            assert!(
                matches!(err, DecodeError::TrailingBytes { count: 1, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn values_are_slices_of_the_input() {
        let bytes = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[text("abcdef")])
            .bytes();
        let Ok(PgOutputMessage::Insert { new, .. }) = decode(&bytes) else {
            panic!("not an insert");
        };
        let ColumnValue::Text(value) = &new.0[0] else {
            panic!("not text");
        };
        let start = bytes.as_ptr() as usize;
        let at = value.as_ptr() as usize;
        assert!(at >= start && at + value.len() <= start + bytes.len());
        assert_eq!(at - start, bytes.len() - 6);
    }

    #[test]
    fn empty_and_unknown_tags() {
        assert!(matches!(decode(&Bytes::new()), Err(DecodeError::Empty)));
        let err = decode(&Bytes::from_static(b"Z")).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownTag { tag: b'Z' }));
        assert_eq!(err.to_string(), "unknown pgoutput message tag 0x5a");
        assert!(matches!(
            decode(&Bytes::from_static(&[0xff, 1, 2])),
            Err(DecodeError::UnknownTag { tag: 0xff })
        ));
    }

    #[test]
    fn streaming_and_two_phase_tags_are_unsupported() {
        for (tag, name) in [
            (b'S', "Stream Start"),
            (b'E', "Stream Stop"),
            (b'c', "Stream Commit"),
            (b'A', "Stream Abort"),
            (b'b', "Begin Prepare"),
            (b'P', "Prepare"),
            (b'K', "Commit Prepared"),
            (b'r', "Rollback Prepared"),
            (b'p', "Stream Prepare"),
        ] {
            let err = decode(&Bytes::from(vec![tag, 0, 0, 0, 1])).unwrap_err();
            match &err {
                DecodeError::Unsupported { tag: t, name: n } => {
                    assert_eq!((*t, *n), (tag, name));
                }
                other => panic!("{other:?}"),
            }
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn unknown_column_kind() {
        let bytes = Enc::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'x').bytes();
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::UnknownColumnKind {
                message: "Insert",
                kind: b'x'
            }
        ));
    }

    #[test]
    fn wrong_tuple_markers() {
        let insert = Enc::tag(b'I').u32(1).u8(b'K').tuple(&[]).bytes();
        assert!(matches!(
            decode(&insert),
            Err(DecodeError::UnexpectedTupleMarker { found: b'K', .. })
        ));
        let update = Enc::tag(b'U').u32(1).u8(b'X').tuple(&[]).bytes();
        assert!(matches!(
            decode(&update),
            Err(DecodeError::UnexpectedTupleMarker { found: b'X', .. })
        ));
        // An old tuple followed by another old tuple instead of the new one.
        let update = Enc::tag(b'U')
            .u32(1)
            .u8(b'K')
            .tuple(&[])
            .u8(b'O')
            .tuple(&[])
            .bytes();
        assert!(matches!(
            decode(&update),
            Err(DecodeError::UnexpectedTupleMarker { found: b'O', .. })
        ));
        let delete = Enc::tag(b'D').u32(1).u8(b'N').tuple(&[]).bytes();
        assert!(matches!(
            decode(&delete),
            Err(DecodeError::UnexpectedTupleMarker { found: b'N', .. })
        ));
    }

    #[test]
    fn invalid_utf8_in_names() {
        let bytes = Enc::tag(b'R')
            .u32(1)
            .str("public")
            .raw(&[b'u', 0xff, 0])
            .u8(b'd')
            .u16(0)
            .bytes();
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::InvalidUtf8 {
                message: "Relation",
                field: "relation name"
            }
        ));
    }

    #[test]
    fn negative_lengths() {
        let bytes = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(-1)
            .bytes();
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::NegativeLength { len: -1, .. })
        ));
        let bytes = Enc::tag(b'M').u8(0).u64(1).str("p").i32(i32::MIN).bytes();
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::NegativeLength { .. })
        ));
    }

    #[test]
    fn huge_counts_do_not_allocate_or_panic() {
        let truncate = Enc::tag(b'T').u32(u32::MAX).u8(0).u32(1).bytes();
        assert!(matches!(
            decode(&truncate),
            Err(DecodeError::Truncated {
                field: "relation id",
                ..
            })
        ));
        let insert = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(u16::MAX)
            .u8(b'n')
            .bytes();
        assert!(decode(&insert).is_err());
        let relation = Enc::tag(b'R')
            .u32(1)
            .str("")
            .str("t")
            .u8(b'd')
            .u16(u16::MAX)
            .bytes();
        assert!(decode(&relation).is_err());
        let value = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b'b')
            .i32(i32::MAX)
            .bytes();
        assert!(decode(&value).is_err());
    }

    /// Messages captured from a PostgreSQL 15 server with pgoutput
    /// proto_version 1 (pg_logical_slot_peek_binary_changes); the key update's
    /// new tuple is cut down to one column to keep the sample short.
    #[test]
    fn decodes_real_server_messages() {
        let begin = decode(&hex("42000000000153385000030413a0a6ce7e000002da")).unwrap();
        assert_eq!(
            begin,
            PgOutputMessage::Begin {
                final_lsn: 0x0153_3850,
                commit_time: 0x0003_0413_a0a6_ce7e,
                xid: 730,
            }
        );
        let ty = decode(&hex("59000040017075626c6963006d6f6f6400")).unwrap();
        assert_eq!(
            ty,
            PgOutputMessage::Type {
                oid: 16385,
                namespace: "public".into(),
                name: "mood".into(),
            }
        );
        let rel = decode(&hex(
            "520000400c7075626c69630066756c6c5f740066000201610000000017ffffffff01620000000019ffffffff",
        ))
        .unwrap();
        let PgOutputMessage::Relation(rel) = rel else {
            panic!("not a relation");
        };
        assert_eq!(rel.id, 16396);
        assert_eq!(
            (rel.namespace.as_str(), rel.name.as_str()),
            ("public", "full_t")
        );
        assert_eq!(rel.replica_identity, b'f');
        assert_eq!(rel.columns.len(), 2);
        assert_eq!(rel.columns[0].name, "a");
        assert_eq!(rel.columns[0].type_oid, 23);
        assert_eq!(rel.columns[0].type_modifier, -1);
        assert!(rel.columns[1].is_key);
        let update = decode(&hex(
            "550000400c4f00027400000001316e4e0002740000000131740000000171",
        ))
        .unwrap();
        assert_eq!(
            update,
            PgOutputMessage::Update {
                rel_id: 16396,
                old: Some(OldTuple::Full(TupleData(vec![
                    text("1"),
                    ColumnValue::Null
                ]))),
                new: TupleData(vec![text("1"), text("q")]),
            }
        );
        let key_update = decode(&hex(
            "55000040054b00057400000001316e6e6e6e4e0001740000000132",
        ))
        .unwrap();
        let PgOutputMessage::Update {
            old: Some(OldTuple::Key(key)),
            ..
        } = key_update
        else {
            panic!("not a key update");
        };
        assert_eq!(key.0.len(), 5);
        let delete = decode(&hex("44000040054b00057400000001326e6e6e6e")).unwrap();
        assert!(matches!(
            delete,
            PgOutputMessage::Delete {
                rel_id: 16389,
                old: OldTuple::Key(_)
            }
        ));
        let truncate = decode(&hex("540000000203000040050000400c")).unwrap();
        assert_eq!(
            truncate,
            PgOutputMessage::Truncate {
                options: 3,
                rel_ids: vec![16389, 16396],
            }
        );
        let message = decode(&hex("4d0100000000015337e0706678000000000568656c6c6f")).unwrap();
        assert_eq!(
            message,
            PgOutputMessage::Message {
                transactional: true,
                lsn: 0x0153_37e0,
                prefix: "pfx".into(),
                content: Bytes::from_static(b"hello"),
            }
        );
        let commit = decode(&hex("430000000000015337e0000000000153381000030413a0a6cb35")).unwrap();
        assert!(matches!(
            commit,
            PgOutputMessage::Commit {
                flags: 0,
                commit_lsn: 0x0153_37e0,
                end_lsn: 0x0153_3810,
                ..
            }
        ));
    }

    /// Deterministic pseudo-random garbage, including inputs that start with
    /// every valid tag, must never panic.
    #[test]
    fn garbage_never_panics() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = b"BCORYIUDTMSEcAxnKN\0";
        for i in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = buf.first_mut() {
                *first = tags[i % tags.len()];
            }
            let _ = decode(&Bytes::from(buf));
        }
        // Mutate valid samples one byte at a time.
        for (bytes, _) in samples() {
            for pos in 0..bytes.len() {
                let mut buf = bytes.to_vec();
                buf[pos] = next() as u8;
                let _ = decode(&Bytes::from(buf));
            }
        }
    }
}
