//! Building SQL text. Every identifier the relay puts into a statement (schema, table, column,
//! publication and slot names) goes through [`ident`], and every literal that cannot be a
//! bound parameter (a snapshot name, advice text an operator pastes) through [`literal`].
//! Names come from the configuration and from the database's catalogs, where anyone who may
//! name a column may choose any characters: quoting is what keeps such a name from becoming
//! SQL run with the relay's REPLICATION role. `tests/sql_quoting.rs` fails on any statement
//! in `src/` that quotes a name by hand.

/// `name` as a quoted identifier: `"` around it, embedded `"` doubled (PostgreSQL's
/// `quote_ident`, always quoting). Case is kept, so `OutboxMessage` stays mixed-case.
pub fn ident(name: &str) -> String {
    quote(name, '"')
}

/// `schema.name` with both parts quoted by [`ident`].
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// `value` as a string literal: `'` around it, embedded `'` doubled. For
/// `standard_conforming_strings = on` (the default since PostgreSQL 9.1, and what the relay's
/// connections use); a backslash is then an ordinary character.
pub fn literal(value: &str) -> String {
    quote(value, '\'')
}

fn quote(text: &str, mark: char) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push(mark);
    for c in text.chars() {
        if c == mark {
            quoted.push(mark);
        }
        quoted.push(c);
    }
    quoted.push(mark);
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_embedded_quotes_doubled() {
        assert_eq!(ident("outbox"), "\"outbox\"");
        assert_eq!(ident("OutboxMessage"), "\"OutboxMessage\"");
        assert_eq!(
            ident("x\"::text, pg_drop_replication_slot('s')::text, \"y"),
            "\"x\"\"::text, pg_drop_replication_slot('s')::text, \"\"y\""
        );
        assert_eq!(qualified("my schema", "t\"1"), "\"my schema\".\"t\"\"1\"");
    }

    #[test]
    fn literals_double_embedded_quotes() {
        assert_eq!(literal("00000003-00000002-1"), "'00000003-00000002-1'");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\b"), "'a\\b'");
    }
}
