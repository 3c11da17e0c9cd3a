//! Table names as the configuration writes them (`schema.table`, `table`, double-quoted parts)
//! and as the catalog holds them: the one parser for `source.tables`, `[outbox."…"]` keys and
//! `match.tables`, so that every place names a table the same way.

/// A table name that is not `schema.table` with names of 1–63 bytes.
#[derive(Debug, thiserror::Error)]
#[error(
    "source.tables entry {0:?} must be \"schema.table\": names of 1–63 bytes, \
     double-quoted where they hold a dot or a quote (\"\\\"my.schema\\\".outbox\")"
)]
pub struct TableNameError(String);

/// Splits `schema.table` (a bare name means `public`) into the names as the catalog holds
/// them: no case folding, so `public.OutboxMessage` is the table EF Core or MassTransit created
/// as "OutboxMessage". A part may be double-quoted (`"my.schema"."Out""box"`), for names that
/// hold a dot or a quote; every name reaches SQL quoted (src/sql.rs).
pub fn parse_table_name(name: &str) -> Result<(String, String), TableNameError> {
    let parsed = split_name(name).and_then(|parts| match parts.as_slice() {
        [table] => Some(("public".to_owned(), table.clone())),
        [schema, table] => Some((schema.clone(), table.clone())),
        _ => None,
    });
    let ok = parsed.as_ref().is_some_and(|(schema, table)| {
        [schema, table]
            .iter()
            .all(|part| !part.is_empty() && part.len() <= 63 && !part.contains('\0'))
    });
    match parsed {
        Some(names) if ok => Ok(names),
        _ => Err(TableNameError(name.to_owned())),
    }
}

/// The dot-separated parts of a name, each bare or double-quoted (`""` inside quotes is one
/// quote); `None` when the quoting is broken.
fn split_name(name: &str) -> Option<Vec<String>> {
    let mut parts = vec![String::new()];
    let mut chars = name.chars().peekable();
    let mut quoted = false;
    let mut part_quoted = false;
    while let Some(c) = chars.next() {
        let part = parts.last_mut().expect("parts is never empty");
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                part.push('"');
            }
            (true, '"') => {
                quoted = false;
                if chars.peek().is_some_and(|next| *next != '.') {
                    return None;
                }
            }
            (true, c) => part.push(c),
            (false, '"') if part.is_empty() && !part_quoted => {
                quoted = true;
                part_quoted = true;
            }
            (false, '"') => return None,
            (false, '.') => {
                parts.push(String::new());
                part_quoted = false;
            }
            (false, c) => part.push(c),
        }
    }
    (!quoted).then_some(parts)
}

/// Whether one of `tables` (configured `schema.table` names) names the table `names`.
pub fn names_one_of(tables: &[String], names: &(String, String)) -> bool {
    tables
        .iter()
        .any(|t| parse_table_name(t).ok().as_ref() == Some(names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_taken_as_the_catalog_holds_them_quoted_where_needed() {
        let parsed = |name: &str| parse_table_name(name).map_err(|e| e.to_string());
        let pair = |schema: &str, table: &str| Ok((schema.to_owned(), table.to_owned()));
        assert_eq!(parsed("outbox"), pair("public", "outbox"));
        assert_eq!(
            parsed("Billing.OutboxMessage"),
            pair("Billing", "OutboxMessage")
        );
        assert_eq!(
            parsed("\"my.schema\".\"Out\"\"box\""),
            pair("my.schema", "Out\"box")
        );
        assert_eq!(parsed("\"a.b\""), pair("public", "a.b"));
        for bad in [
            "",
            "a.",
            ".b",
            "a.b.c",
            "\"open",
            "a\"b",
            "\"x\"y.z",
            &"x".repeat(64),
        ] {
            assert!(parsed(bad).is_err(), "{bad:?}");
        }
    }
}
