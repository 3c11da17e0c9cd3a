//! Decoder for the messages of PostgreSQL's `pgoutput` logical decoding plugin,
//! protocol version 1 ("Logical Replication Message Formats" in the PostgreSQL 15 docs).
//!
//! It exists so that the replication stream can be turned into typed messages without
//! any I/O in the way: [`decode`] takes the payload of one `XLogData` (or one row of
//! `pg_logical_slot_get_binary_changes`) and returns a [`Message`] that borrows from it.
//! Tuple values and other byte fields are slices of the input; only [`Relation`]
//! messages own their strings, because the caller keeps them long after the buffer they
//! came in is gone.
//!
//! The input comes from the network, so the decoder treats it as untrusted: every
//! length and count is checked against the bytes that remain before anything is
//! allocated or sliced, trailing bytes are rejected, and no input makes it panic. A
//! problem is reported as a [`DecodeError`] naming the message kind and byte offset.
//!
//! Streaming (proto_version 2) and two-phase (proto_version 3) messages are recognised
//! only to be rejected with a clear error, since the relay asks for proto_version 1.

#![forbid(unsafe_code)]

/// A WAL location, as PostgreSQL's `XLogRecPtr`.
pub use outbox_relay_sinks::Lsn;

/// Why a buffer is not one well-formed pgoutput v1 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {kind} message at byte {offset}: {reason}")]
pub struct DecodeError {
    /// The message kind from the tag byte (`"Insert"`, `"Stream Start"`, ...), or
    /// `"unknown"` for an unrecognised tag (named in `reason`) and `"empty"` for no input.
    pub kind: &'static str,
    /// Offset into the input of the field that could not be decoded.
    pub offset: usize,
    pub reason: String,
}

/// One decoded pgoutput message, borrowing from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin<'a>),
    Relation(Relation),
    Type(TypeMessage<'a>),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    Message(LogicalMessage<'a>),
}

impl Message<'_> {
    /// The message kind, named as in [`DecodeError::kind`] (`"Insert"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Begin(_) => Kind::Begin,
            Message::Commit(_) => Kind::Commit,
            Message::Origin(_) => Kind::Origin,
            Message::Relation(_) => Kind::Relation,
            Message::Type(_) => Kind::Type,
            Message::Insert(_) => Kind::Insert,
            Message::Update(_) => Kind::Update,
            Message::Delete(_) => Kind::Delete,
            Message::Truncate(_) => Kind::Truncate,
            Message::Message(_) => Kind::Message,
        }
        .name()
    }
}

/// `B`: start of a transaction. It is sent only once the transaction has a change
/// to publish, so empty transactions produce nothing at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record; equals [`Commit::commit_lsn`].
    pub final_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

/// `C`: end of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm as flushed once the
    /// transaction has been relayed.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

/// `O`: the transaction was replayed from another node (replication origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    pub name: &'a str,
}

/// `R`: the shape of a table. Sent before the first change to the table in a
/// decoding session and sent again after any change to its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `REPLICA IDENTITY` setting: `b'd'` default, `b'n'` nothing, `b'f'` full,
    /// `b'i'` index. Under `b'f'` the old tuple of an update or delete is sent
    /// whole (`'O'`), otherwise only its key columns are (`'K'`).
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// 1 if the column is part of the replica identity key, else 0.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`; -1 when the type has none.
    pub type_modifier: i32,
}

/// `Y`: a user-defined data type used by a column of a following [`Relation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeMessage<'a> {
    pub id: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: &'a str,
    pub name: &'a str,
}

/// `I`: a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert<'a> {
    pub relation_id: u32,
    pub new: Tuple<'a>,
}

/// `U`: a changed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update<'a> {
    pub relation_id: u32,
    /// The old row (`'O'`, under `REPLICA IDENTITY FULL`) or its key columns with the
    /// other columns null (`'K'`, when the key changed); absent otherwise.
    pub old: Option<Tuple<'a>>,
    pub new: Tuple<'a>,
}

/// `D`: a deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete<'a> {
    pub relation_id: u32,
    /// The whole old row (`'O'`) or its key columns with the other columns null (`'K'`).
    pub old: Tuple<'a>,
}

/// `T`: `TRUNCATE` of one or more tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
    pub options: u8,
    pub relation_ids: Vec<u32>,
}

/// `M`: a message written by `pg_logical_emit_message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogicalMessage<'a> {
    /// True when sent inside a transaction's `Begin`/`Commit`; a non-transactional
    /// message arrives on its own, as soon as it is decoded.
    pub transactional: bool,
    /// The end of the message's WAL record.
    pub lsn: Lsn,
    /// [`PREFIX_NOT_UTF8`] when the prefix is not UTF-8 (a `SQL_ASCII` database).
    pub prefix: &'a str,
    pub content: &'a [u8],
}

/// What a logical message's prefix that is not UTF-8 reads as. Any session of a `SQL_ASCII`
/// database can emit one; it is no outbox prefix (those are configured as UTF-8, and none
/// holds U+FFFD), so the message is ignored like any other, instead of stopping the stream.
pub const PREFIX_NOT_UTF8: &str = "\u{FFFD}";

/// The column values of a row, in the order of the relation's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple<'a> {
    pub columns: Vec<Value<'a>>,
}

/// A tuple's values are the neutral row's ([`crate::row::Value`]): the stream hands them to
/// the mapper as they are decoded.
pub use crate::row::Value;

/// Decodes one complete pgoutput v1 message; the buffer must hold exactly one.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let Some((&tag, rest)) = buf.split_first() else {
        return Err(DecodeError {
            kind: "empty",
            offset: 0,
            reason: "empty input".to_owned(),
        });
    };
    let kind = Kind::from_tag(tag)?;
    let mut r = Cursor {
        rest,
        len: buf.len(),
        kind: kind.name(),
    };
    let message = match kind {
        Kind::Begin => Message::Begin(Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        Kind::Commit => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_time: r.i64("commit timestamp")?,
        }),
        Kind::Origin => Message::Origin(Origin {
            commit_lsn: Lsn(r.u64("origin commit LSN")?),
            name: r.str("origin name")?,
        }),
        Kind::Relation => Message::Relation(r.relation()?),
        Kind::Type => Message::Type(TypeMessage {
            id: r.u32("type OID")?,
            namespace: r.str("type namespace")?,
            name: r.str("type name")?,
        }),
        Kind::Insert => {
            let relation_id = r.u32("relation id")?;
            r.expect_marker(b'N', "new tuple marker 'N'")?;
            Message::Insert(Insert {
                relation_id,
                new: r.tuple()?,
            })
        }
        Kind::Update => {
            let relation_id = r.u32("relation id")?;
            let at = r.offset();
            let old = match r.u8("tuple marker")? {
                b'K' | b'O' => {
                    let old = r.tuple()?;
                    r.expect_marker(b'N', "new tuple marker 'N'")?;
                    Some(old)
                }
                b'N' => None,
                other => {
                    return Err(r.error(
                        at,
                        format!(
                            "expected tuple marker 'K', 'O' or 'N', found {}",
                            show(other)
                        ),
                    ))
                }
            };
            Message::Update(Update {
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        Kind::Delete => {
            let relation_id = r.u32("relation id")?;
            let at = r.offset();
            match r.u8("old tuple marker")? {
                b'K' | b'O' => {}
                other => {
                    return Err(r.error(
                        at,
                        format!(
                            "expected old tuple marker 'K' or 'O', found {}",
                            show(other)
                        ),
                    ))
                }
            }
            Message::Delete(Delete {
                relation_id,
                old: r.tuple()?,
            })
        }
        Kind::Truncate => Message::Truncate(r.truncate()?),
        Kind::Message => Message::Message(r.logical_message()?),
    };
    r.finish()?;
    Ok(message)
}

/// The message kinds of proto_version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Begin,
    Commit,
    Origin,
    Relation,
    Type,
    Insert,
    Update,
    Delete,
    Truncate,
    Message,
}

impl Kind {
    /// The kind a tag byte announces, or the error for a tag proto_version 1 lacks.
    fn from_tag(tag: u8) -> Result<Self, DecodeError> {
        let unsupported = |kind: &'static str, feature: &str, version: u8| DecodeError {
            kind,
            offset: 0,
            reason: format!(
                "message type {} is not supported for proto_version 1 \
                 ({feature} messages need proto_version {version})",
                show(tag)
            ),
        };
        Ok(match tag {
            b'B' => Self::Begin,
            b'C' => Self::Commit,
            b'O' => Self::Origin,
            b'R' => Self::Relation,
            b'Y' => Self::Type,
            b'I' => Self::Insert,
            b'U' => Self::Update,
            b'D' => Self::Delete,
            b'T' => Self::Truncate,
            b'M' => Self::Message,
            b'S' => return Err(unsupported("Stream Start", "streaming", 2)),
            b'E' => return Err(unsupported("Stream Stop", "streaming", 2)),
            b'c' => return Err(unsupported("Stream Commit", "streaming", 2)),
            b'A' => return Err(unsupported("Stream Abort", "streaming", 2)),
            b'b' => return Err(unsupported("Begin Prepare", "two-phase", 3)),
            b'P' => return Err(unsupported("Prepare", "two-phase", 3)),
            b'K' => return Err(unsupported("Commit Prepared", "two-phase", 3)),
            b'r' => return Err(unsupported("Rollback Prepared", "two-phase", 3)),
            b'p' => return Err(unsupported("Stream Prepare", "two-phase", 3)),
            _ => {
                return Err(DecodeError {
                    kind: "unknown",
                    offset: 0,
                    reason: format!("unknown message tag {}", show(tag)),
                })
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Begin => "Begin",
            Self::Commit => "Commit",
            Self::Origin => "Origin",
            Self::Relation => "Relation",
            Self::Type => "Type",
            Self::Insert => "Insert",
            Self::Update => "Update",
            Self::Delete => "Delete",
            Self::Truncate => "Truncate",
            Self::Message => "Message",
        }
    }
}

/// A byte as `'X' (0x58)`, or just `0x01` when it is not printable ASCII.
fn show(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}' (0x{byte:02x})", char::from(byte))
    } else {
        format!("0x{byte:02x}")
    }
}

/// A cursor over one message. It never indexes: every read goes through `take`,
/// which checks the length first.
struct Cursor<'a> {
    rest: &'a [u8],
    /// Length of the whole message, to turn `rest` back into offsets.
    len: usize,
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> usize {
        self.len - self.rest.len()
    }

    fn error(&self, offset: usize, reason: String) -> DecodeError {
        DecodeError {
            kind: self.kind,
            offset,
            reason,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(self.error(
                self.offset(),
                format!(
                    "truncated: {what} needs {n} bytes but {} remain",
                    self.rest.len()
                ),
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(self.error(
                self.offset(),
                format!(
                    "truncated: {what} needs {N} bytes but {} remain",
                    self.rest.len()
                ),
            )),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        self.array(what).map(i16::from_be_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// The bytes of a NUL-terminated string, without the NUL.
    fn c_bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let start = self.offset();
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(self.error(
                start,
                format!(
                    "{what} has no NUL terminator in the {} remaining bytes",
                    self.rest.len()
                ),
            ));
        };
        Ok(&self.take(nul + 1, what)?[..nul])
    }

    /// A NUL-terminated UTF-8 string.
    fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let start = self.offset();
        let bytes = self.c_bytes(what)?;
        std::str::from_utf8(bytes).map_err(|e| {
            self.error(
                start + e.valid_up_to(),
                format!("{what} is not valid UTF-8"),
            )
        })
    }

    fn expect_marker(&mut self, marker: u8, what: &str) -> Result<(), DecodeError> {
        let at = self.offset();
        let found = self.u8(what)?;
        if found == marker {
            Ok(())
        } else {
            Err(self.error(at, format!("expected {what}, found {}", show(found))))
        }
    }

    /// A count whose items take at least `min_item_len` bytes each, checked against
    /// the bytes left after `reserved` more bytes, so that a garbage count can
    /// neither allocate nor loop beyond what the buffer could hold.
    fn count(
        &self,
        at: usize,
        n: i64,
        min_item_len: usize,
        reserved: usize,
        what: &str,
    ) -> Result<usize, DecodeError> {
        let available = self.rest.len().saturating_sub(reserved);
        match usize::try_from(n) {
            Err(_) => Err(self.error(at, format!("{what} is negative ({n})"))),
            Ok(n) if n.saturating_mul(min_item_len) > available => Err(self.error(
                at,
                format!(
                    "{what} {n} needs at least {} bytes but {available} remain",
                    n.saturating_mul(min_item_len)
                ),
            )),
            Ok(n) => Ok(n),
        }
    }

    /// A byte string preceded by its Int32 length.
    fn length_prefixed(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let at = self.offset();
        let n = self.i32(what)?;
        let n = self.count(at, n.into(), 1, 0, what)?;
        self.take(n, what)
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32("relation id")?;
        let namespace = self.str("namespace")?.to_owned();
        let name = self.str("relation name")?.to_owned();
        let replica_identity = self.u8("replica identity")?;
        let at = self.offset();
        let n = self.i16("column count")?;
        // flags (1) + name (at least its NUL) + type OID (4) + type modifier (4)
        let n = self.count(at, n.into(), 10, 0, "column count")?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            columns.push(RelationColumn {
                flags: self.u8("column flags")?,
                name: self.str("column name")?.to_owned(),
                type_oid: self.u32("column type OID")?,
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

    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let at = self.offset();
        let n = self.i16("tuple column count")?;
        let n = self.count(at, n.into(), 1, 0, "tuple column count")?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.offset();
            columns.push(match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.length_prefixed("text value length")?),
                b'b' => Value::Binary(self.length_prefixed("binary value length")?),
                other => {
                    return Err(self.error(
                        at,
                        format!(
                            "expected column kind 'n', 'u', 't' or 'b', found {}",
                            show(other)
                        ),
                    ))
                }
            });
        }
        Ok(Tuple { columns })
    }

    fn truncate(&mut self) -> Result<Truncate, DecodeError> {
        let at = self.offset();
        let n = self.i32("relation count")?;
        // the options byte sits between the count and the ids
        let n = self.count(at, n.into(), 4, 1, "relation count")?;
        let options = self.u8("options")?;
        let mut relation_ids = Vec::with_capacity(n);
        for _ in 0..n {
            relation_ids.push(self.u32("relation id")?);
        }
        Ok(Truncate {
            options,
            relation_ids,
        })
    }

    fn logical_message(&mut self) -> Result<LogicalMessage<'a>, DecodeError> {
        let at = self.offset();
        let transactional = match self.u8("flags")? {
            0 => false,
            1 => true,
            other => {
                return Err(self.error(at, format!("flags must be 0 or 1, found {other}")));
            }
        };
        Ok(LogicalMessage {
            transactional,
            lsn: Lsn(self.u64("message LSN")?),
            prefix: std::str::from_utf8(self.c_bytes("prefix")?).unwrap_or(PREFIX_NOT_UTF8),
            content: self.length_prefixed("content length")?,
        })
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.error(
                self.offset(),
                format!(
                    "{} trailing bytes after a complete message",
                    self.rest.len()
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Real messages captured by `scripts/capture-pgoutput.sh`, one hex line each.
    fn fixture() -> Vec<Vec<u8>> {
        include_str!("testdata/pgoutput-v1.hex")
            .lines()
            .filter(|line| !line.is_empty())
            .map(unhex)
            .collect()
    }

    fn unhex(line: &str) -> Vec<u8> {
        assert_eq!(line.len() % 2, 0, "odd-length hex line");
        (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex digit"))
            .collect()
    }

    fn id(n: u8) -> String {
        format!("00000000-0000-0000-0000-{n:012}")
    }

    fn t(s: &str) -> Value<'_> {
        Value::Text(s.as_bytes())
    }

    macro_rules! next {
        ($it:expr, $variant:ident) => {
            match $it.next() {
                Some(Message::$variant(m)) => m,
                other => panic!("expected {}, got {other:?}", stringify!($variant)),
            }
        };
    }

    /// Follows the capture script statement by statement.
    #[test]
    fn fixture_decodes_to_what_the_capture_script_did() {
        let raw = fixture();
        let messages: Vec<Message<'_>> = raw
            .iter()
            .map(|m| decode(m).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let mut it = messages.iter();
        let (id1, id2, id3, id4) = (id(1), id(2), id(3), id(4));
        let (id5, id6, id7, id8, id9) = (id(5), id(6), id(7), id(8), id(9));

        // 1. single insert; the relation is described before its first row
        next!(it, Begin);
        let rel = next!(it, Relation);
        assert_eq!(
            (rel.namespace.as_str(), rel.name.as_str()),
            ("public", "outbox")
        );
        assert_eq!(rel.replica_identity, b'd');
        let cols: Vec<_> = rel
            .columns
            .iter()
            .map(|c| (c.flags, c.name.as_str(), c.type_oid, c.type_modifier))
            .collect();
        assert_eq!(
            cols,
            [
                (1, "id", 2950, -1),
                (0, "aggregatetype", 25, -1),
                (0, "aggregateid", 25, -1),
                (0, "type", 25, -1),
                (0, "payload", 3802, -1),
            ]
        );
        let rel_id = rel.id;
        let ins = next!(it, Insert);
        assert_eq!(ins.relation_id, rel_id);
        assert_eq!(
            ins.new.columns,
            [
                t(&id1),
                t("order"),
                t("o-1"),
                t("OrderCreated"),
                t(r#"{"total": 42}"#)
            ]
        );
        next!(it, Commit);

        // 2. multi-row transaction: one Begin/Commit around three inserts
        next!(it, Begin);
        let rows: Vec<_> = (0..3)
            .map(|_| next!(it, Insert).new.columns.clone())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    t(&id2),
                    t("order"),
                    t("o-2"),
                    t("OrderCreated"),
                    t(r#"{"total": 7}"#)
                ],
                vec![
                    t(&id3),
                    t("order"),
                    t("o-3"),
                    t("OrderCreated"),
                    t(r#"{"total": 8}"#)
                ],
                vec![
                    t(&id4),
                    t("customer"),
                    t("c-1"),
                    t("CustomerRegistered"),
                    t("{}")
                ],
            ]
        );
        next!(it, Commit);

        // 3. REPLICA IDENTITY FULL: relation resent with every column flagged as key,
        //    and the update carries the whole old row
        next!(it, Begin);
        let rel = next!(it, Relation);
        assert_eq!(rel.replica_identity, b'f');
        assert!(rel.columns.iter().all(|c| c.flags == 1));
        let upd = next!(it, Update);
        assert_eq!(upd.relation_id, rel_id);
        let old = upd
            .old
            .as_ref()
            .expect("old tuple under REPLICA IDENTITY FULL");
        assert_eq!(
            old.columns,
            [
                t(&id1),
                t("order"),
                t("o-1"),
                t("OrderCreated"),
                t(r#"{"total": 42}"#)
            ]
        );
        assert_eq!(
            upd.new.columns,
            [
                t(&id1),
                t("order"),
                t("o-1"),
                t("OrderPaid"),
                t(r#"{"total": 42}"#)
            ]
        );
        next!(it, Commit);

        // ... back to the default identity: the delete carries only the key, the other
        //    columns as nulls
        next!(it, Begin);
        assert_eq!(next!(it, Relation).replica_identity, b'd');
        let del = next!(it, Delete);
        assert_eq!(del.relation_id, rel_id);
        assert_eq!(
            del.old.columns,
            [t(&id2), Value::Null, Value::Null, Value::Null, Value::Null]
        );
        next!(it, Commit);

        // 4. TRUNCATE ... RESTART IDENTITY (a new relfilenode, so the relation is resent)
        next!(it, Begin);
        assert_eq!(next!(it, Relation).id, rel_id);
        let trunc = next!(it, Truncate);
        assert_eq!(trunc.options, 2);
        assert_eq!(trunc.relation_ids, [rel_id]);
        next!(it, Commit);

        // 5. a transactional message is framed by Begin/Commit, a non-transactional one
        //    is not
        let begin = next!(it, Begin);
        let msg = next!(it, Message);
        assert!(msg.transactional);
        assert_eq!(msg.prefix, "outbox");
        assert_eq!(msg.content, br#"{"kind":"transactional"}"#);
        assert!(msg.lsn <= begin.final_lsn);
        let commit = next!(it, Commit);
        let msg = next!(it, Message);
        assert!(!msg.transactional);
        assert_eq!(msg.prefix, "outbox");
        assert_eq!(msg.content, br#"{"kind":"non-transactional"}"#);
        assert!(msg.lsn > commit.end_lsn);

        // 6. ALTER TABLE ADD COLUMN: a second shape of the same relation id
        next!(it, Begin);
        let rel = next!(it, Relation);
        assert_eq!(rel.id, rel_id);
        assert_eq!(rel.columns.len(), 6);
        let trace = &rel.columns[5];
        assert_eq!((trace.name.as_str(), trace.type_oid), ("trace_id", 25));
        let ins = next!(it, Insert);
        assert_eq!(
            ins.new.columns,
            [
                t(&id5),
                t("order"),
                t("o-5"),
                t("OrderCreated"),
                t(r#"{"total": 5}"#),
                t("trace-5")
            ]
        );
        next!(it, Commit);
        next!(it, Begin);
        let ins = next!(it, Insert);
        assert_eq!(
            ins.new.columns,
            [
                t(&id6),
                t("order"),
                t("o-6"),
                t("OrderCreated"),
                t(r#"{"total": 6}"#),
                Value::Null
            ]
        );
        next!(it, Commit);

        // 7. an out-of-line value is sent in full on insert, as 'u' on an update that
        //    leaves it alone
        next!(it, Begin);
        let ins = next!(it, Insert);
        assert_eq!(
            ins.new.columns[..4],
            [t(&id7), t("blob"), t("b-7"), t("BlobStored")]
        );
        // md5('1') starts the 100 concatenated 32-digit hashes
        let Value::Text(payload) = ins.new.columns[4] else {
            panic!("payload is not text: {:?}", ins.new.columns[4]);
        };
        assert!(payload.starts_with(br#"{"blob": "c4ca4238a0b923820dcc509a6f75849b"#));
        assert_eq!(payload.len(), r#"{"blob": ""}"#.len() + 100 * 32);
        assert_eq!(ins.new.columns[5], Value::Null);
        next!(it, Commit);
        next!(it, Begin);
        let upd = next!(it, Update);
        assert_eq!(upd.old, None);
        assert_eq!(
            upd.new.columns,
            [
                t(&id7),
                t("blob"),
                t("b-7"),
                t("BlobTouched"),
                Value::UnchangedToast,
                Value::Null
            ]
        );
        next!(it, Commit);

        // 8. a user-defined type is described (Type) before the relation using it
        next!(it, Begin);
        let ty = next!(it, Type);
        assert_eq!((ty.namespace, ty.name), ("public", "outbox_status"));
        let rel = next!(it, Relation);
        assert_eq!(rel.columns.len(), 7);
        let status = &rel.columns[6];
        assert_eq!((status.name.as_str(), status.type_oid), ("status", ty.id));
        let ins = next!(it, Insert);
        assert_eq!(ins.new.columns[0], t(&id8));
        assert_eq!(ins.new.columns[5..], [Value::Null, t("pending")]);
        next!(it, Commit);

        // 9. a replayed transaction: Origin right after Begin, and the commit time
        //    is the one the origin set (2024-01-01 00:00:00 UTC)
        let begin = next!(it, Begin);
        let origin = next!(it, Origin);
        assert_eq!(
            (origin.name, origin.commit_lsn),
            ("upstream", Lsn(0xAB_CDEF))
        );
        let ins = next!(it, Insert);
        assert_eq!(ins.new.columns[0], t(&id9));
        assert_eq!(ins.new.columns[6], t("published"));
        let commit = next!(it, Commit);
        let jan_2024 = 8766 * 86_400 * 1_000_000;
        assert_eq!(
            (begin.commit_time, commit.commit_time),
            (jan_2024, jan_2024)
        );

        assert_eq!(it.next(), None);
    }

    /// Properties of the whole stream: transaction framing, LSN order, and rows that
    /// match the latest shape of their relation.
    #[test]
    fn fixture_transactions_are_framed_and_ordered() {
        let raw = fixture();
        let mut cache: HashMap<u32, Relation> = HashMap::new();
        let mut open: Option<Begin> = None;
        let mut last_end = Lsn(0);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for bytes in &raw {
            let message = decode(bytes).unwrap_or_else(|e| panic!("{e}"));
            let width = |id: u32| cache.get(&id).map(|r: &Relation| r.columns.len());
            match &message {
                Message::Begin(b) => {
                    assert!(open.is_none(), "nested Begin");
                    assert!(b.final_lsn > last_end);
                    open = Some(*b);
                }
                Message::Commit(c) => {
                    let b = open.take().expect("Commit without Begin");
                    assert_eq!(c.flags, 0);
                    assert_eq!(c.commit_lsn, b.final_lsn);
                    assert_eq!(c.commit_time, b.commit_time);
                    assert!(c.end_lsn > c.commit_lsn);
                    last_end = c.end_lsn;
                }
                Message::Message(m) => {
                    assert_eq!(m.transactional, open.is_some());
                }
                Message::Relation(r) => {
                    cache.insert(r.id, r.clone());
                }
                Message::Insert(i) => {
                    assert_eq!(width(i.relation_id), Some(i.new.columns.len()));
                }
                Message::Update(u) => {
                    assert_eq!(width(u.relation_id), Some(u.new.columns.len()));
                }
                Message::Delete(d) => {
                    assert_eq!(width(d.relation_id), Some(d.old.columns.len()));
                }
                Message::Truncate(t) => {
                    assert!(t.relation_ids.iter().all(|&id| width(id).is_some()));
                }
                Message::Origin(_) | Message::Type(_) => {}
            }
            if !matches!(
                message,
                Message::Begin(_) | Message::Commit(_) | Message::Message(_)
            ) {
                assert!(open.is_some(), "{} outside a transaction", message.kind());
            }
            *counts.entry(message.kind()).or_default() += 1;
        }
        assert!(open.is_none());
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("Begin", 12),
                ("Commit", 12),
                ("Delete", 1),
                ("Insert", 9),
                ("Message", 2),
                ("Origin", 1),
                ("Relation", 6),
                ("Truncate", 1),
                ("Type", 1),
                ("Update", 2),
            ]
        );
    }

    #[test]
    fn every_strict_prefix_of_a_captured_message_is_an_error() {
        for message in fixture() {
            let kind = decode(&message).unwrap_or_else(|e| panic!("{e}")).kind();
            for end in 0..message.len() {
                let err = decode(&message[..end]).expect_err("a strict prefix decoded");
                assert!(err.offset <= end, "{err} for a prefix of {end} bytes");
                assert_eq!(err.kind, if end == 0 { "empty" } else { kind }, "{err}");
            }
        }
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn broken_inputs_are_errors_with_kind_and_offset() {
        let rel: &[u8] = &16389u32.to_be_bytes();
        let commit = cat(&[b"C\0", &[1; 8], &[2; 8], &[3; 8]]);
        let relation_head = cat(&[b"R", rel, b"public\0"]);
        let cases: Vec<(&str, Vec<u8>, &str, usize, &str)> = vec![
            ("empty", vec![], "empty", 0, "empty input"),
            (
                "unknown tag",
                b"X\0\0\0".to_vec(),
                "unknown",
                0,
                "'X' (0x58)",
            ),
            ("unprintable tag", vec![0x01], "unknown", 0, "0x01"),
            (
                "truncated begin",
                b"B\0\0\0".to_vec(),
                "Begin",
                1,
                "final LSN needs 8 bytes but 3 remain",
            ),
            (
                "huge tuple column count",
                cat(&[b"I", rel, b"N\x7f\xffn"]),
                "Insert",
                6,
                "tuple column count 32767 needs at least 32767 bytes but 1 remain",
            ),
            (
                "negative tuple column count",
                cat(&[b"I", rel, b"N\xff\xff"]),
                "Insert",
                6,
                "negative",
            ),
            (
                "huge relation column count",
                cat(&[&relation_head, b"outbox\0d\x7f\xff", &[0; 10]]),
                "Relation",
                20,
                "column count 32767 needs at least 327670 bytes but 10 remain",
            ),
            (
                "huge truncate relation count",
                cat(&[b"T\x7f\xff\xff\xff\0", rel]),
                "Truncate",
                1,
                "relation count 2147483647",
            ),
            (
                "huge text value length",
                cat(&[b"I", rel, b"N\0\x01t\x7f\xff\xff\xffabc"]),
                "Insert",
                9,
                "text value length 2147483647 needs at least 2147483647 bytes but 3 remain",
            ),
            (
                "negative text value length",
                cat(&[b"I", rel, b"N\0\x01t\xff\xff\xff\xff"]),
                "Insert",
                9,
                "negative",
            ),
            (
                "missing NUL in relation name",
                cat(&[&relation_head, b"outbox"]),
                "Relation",
                12,
                "NUL",
            ),
            (
                "invalid UTF-8 in relation name",
                cat(&[&relation_head, b"out\xffbox\0d\0\0"]),
                "Relation",
                15,
                "relation name is not valid UTF-8",
            ),
            (
                "invalid UTF-8 in column name",
                cat(&[&relation_head, b"outbox\0d\0\x01\x01i\xc3\0", &[0; 8]]),
                "Relation",
                24,
                "column name is not valid UTF-8",
            ),
            (
                "trailing bytes",
                cat(&[&commit, b"\0"]),
                "Commit",
                26,
                "1 trailing bytes",
            ),
            (
                "insert without 'N'",
                cat(&[b"I", rel, b"K\0\0"]),
                "Insert",
                5,
                "found 'K'",
            ),
            (
                "unknown column kind",
                cat(&[b"I", rel, b"N\0\x01x"]),
                "Insert",
                8,
                "found 'x'",
            ),
            (
                "bad update marker",
                cat(&[b"U", rel, b"Z\0\0"]),
                "Update",
                5,
                "found 'Z'",
            ),
            (
                "update old without new",
                cat(&[b"U", rel, b"O\0\0O\0\0"]),
                "Update",
                8,
                "found 'O'",
            ),
            (
                "delete without old",
                cat(&[b"D", rel, b"N\0\0"]),
                "Delete",
                5,
                "'K' or 'O'",
            ),
            (
                "message flags",
                cat(&[b"M\x02", &[0; 8], b"p\0\0\0\0\0"]),
                "Message",
                1,
                "flags must be 0 or 1",
            ),
            (
                "origin name without NUL",
                cat(&[b"O", &[0; 8], b"up"]),
                "Origin",
                9,
                "NUL",
            ),
        ];
        for (name, input, kind, offset, reason) in cases {
            let err = decode(&input).expect_err(name);
            assert_eq!((err.kind, err.offset), (kind, offset), "{name}: {err}");
            assert!(err.reason.contains(reason), "{name}: {err}");
        }
        assert!(decode(&commit).is_ok());
    }

    #[test]
    fn streaming_and_two_phase_messages_are_unsupported() {
        let cases = [
            (b'S', "Stream Start"),
            (b'E', "Stream Stop"),
            (b'c', "Stream Commit"),
            (b'A', "Stream Abort"),
            (b'b', "Begin Prepare"),
            (b'P', "Prepare"),
            (b'K', "Commit Prepared"),
            (b'r', "Rollback Prepared"),
            (b'p', "Stream Prepare"),
        ];
        for (tag, kind) in cases {
            let err = decode(&[tag, 0, 0, 0, 1]).expect_err(kind);
            assert_eq!((err.kind, err.offset), (kind, 0));
            assert!(
                err.reason.contains("not supported for proto_version 1"),
                "{err}"
            );
        }
    }

    #[test]
    fn error_message_names_kind_offset_and_reason() {
        let err = decode(b"I\0\0\0").expect_err("truncated");
        assert_eq!(
            err.to_string(),
            "malformed pgoutput Insert message at byte 1: \
             truncated: relation id needs 4 bytes but 3 remain"
        );
    }

    /// Deterministic xorshift64 mutations of the captured messages: decoding must
    /// return, never panic, whatever the bytes.
    #[test]
    fn random_mutations_never_panic() {
        let corpus = fixture();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % u64::try_from(bound).expect("bound")).expect("index")
        };
        const INTERESTING: [u8; 12] = [
            0, 1, 0x7f, 0x80, 0xff, b'n', b'u', b't', b'b', b'K', b'O', b'N',
        ];
        let (mut decoded, mut rejected) = (0, 0);
        for _ in 0..20_000 {
            let mut bytes = corpus[next(corpus.len())].clone();
            for _ in 0..=next(3) {
                let at = next(bytes.len() + 1);
                match next(7) {
                    0 if at < bytes.len() => bytes[at] ^= 1 << next(8),
                    1 if at < bytes.len() => bytes[at] = next(256) as u8,
                    2 if at < bytes.len() => bytes[at] = INTERESTING[next(INTERESTING.len())],
                    3 => bytes.truncate(at),
                    4 => bytes.insert(at, next(256) as u8),
                    5 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    6 if at + 4 <= bytes.len() => {
                        let word: [u8; 4] = [[0x7f, 0xff, 0xff, 0xff], [0xff; 4], [0; 4]][next(3)];
                        bytes[at..at + 4].copy_from_slice(&word);
                    }
                    _ => {}
                }
            }
            match decode(&bytes) {
                Ok(_) => decoded += 1,
                Err(e) => {
                    assert!(e.offset <= bytes.len(), "{e}");
                    rejected += 1;
                }
            }
        }
        assert!(
            decoded > 0 && rejected > 0,
            "{decoded} decoded, {rejected} rejected"
        );
    }

    #[test]
    fn a_message_prefix_that_is_not_utf8_is_no_error() {
        let bytes = cat(&[b"M\x01", &[0; 8], b"caf\xe9\0", &[0, 0, 0, 1], b"x"]);
        match decode(&bytes).unwrap() {
            Message::Message(message) => {
                assert_eq!(message.prefix, PREFIX_NOT_UTF8);
                assert_eq!(message.content, b"x");
            }
            _ => panic!("expected a logical message"),
        }
    }
}
