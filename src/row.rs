//! The neutral row that crosses from a source to the mapper ([`crate::outbox`]): a table's
//! shape, a row's values, and a logical message. The stream converts pgoutput's Relation,
//! Tuple and Message into these ([`crate::reader`]); the backfill builds them from a SQL
//! cursor ([`crate::backfill`]). The mapper knows neither source.
//!
//! Invariant: values are slices of `frame`, the buffer they arrived in, never copies; an
//! event keeps the frame alive by sharing it.

#![forbid(unsafe_code)]

use bytes::Bytes;

/// A table as the mapper knows it: the relation id the stream names it by (its OID), its
/// name, and its columns in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// One value of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value the change did not touch; its content is not sent.
    UnchangedToast,
    /// The value in text format, as sent: not checked to be UTF-8.
    Text(&'a [u8]),
    /// The value in binary format (only with pgoutput's `binary` option).
    Binary(&'a [u8]),
}

/// One row of a [`Table`]: its values in column order, borrowed from `frame`.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub values: &'a [Value<'a>],
    pub frame: &'a Bytes,
}

/// A transactional logical message: an event without a table.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub prefix: &'a str,
    pub content: &'a [u8],
    /// The buffer `content` is a slice of.
    pub frame: &'a Bytes,
}
