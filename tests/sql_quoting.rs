//! Every identifier and literal in SQL the relay builds goes through src/sql.rs. A name quoted
//! by hand (`"{name}"`, `'{slot}'`) or a schema glued on (`{schema}.table`) in a line of SQL
//! is how a column named to break out of a statement becomes SQL run with the relay's
//! REPLICATION role: this test reads the sources and fails on any.

use std::path::{Path, PathBuf};

/// Words that make a line SQL (upper case, as the relay writes its statements, or a cast).
const SQL_WORDS: [&str; 13] = [
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    "DELETE ",
    "FROM ",
    "INTO ",
    "TABLE ",
    "PUBLICATION ",
    "_SLOT ",
    "SNAPSHOT ",
    "WHERE ",
    "SET ",
    "\\\"::",
];

fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// Whether `line` interpolates a value between quotes it wrote itself, or after a schema.
fn quotes_by_hand(line: &str) -> bool {
    let interpolated_after = |mark: &str| {
        line.match_indices(mark).any(|(at, _)| {
            line[at + mark.len()..]
                .chars()
                .next()
                .is_some_and(|c| c == '}' || c.is_ascii_alphabetic() || c == '_')
        })
    };
    interpolated_after("\\\"{") || interpolated_after("'{") || line.contains("{schema}.")
}

#[test]
fn no_statement_quotes_a_name_by_hand() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    sources(&root.join("sinks/src"), &mut files);
    let mut found = Vec::new();
    for file in &files {
        if file.ends_with("src/sql.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if quotes_by_hand(line) && SQL_WORDS.iter().any(|word| line.contains(word)) {
                found.push(format!("{}:{}: {}", file.display(), number + 1, code));
            }
        }
    }
    assert!(
        found.is_empty(),
        "SQL built with hand-quoted names; use outbox_relay::sql::{{ident, qualified, literal}}:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_itself_sees_hand_quoting() {
    assert!(quotes_by_hand(r#"format!("SELECT \"{}\"::text", c.name)"#));
    assert!(quotes_by_hand(
        "format!(\"DELETE FROM {schema}.checkpoints WHERE slot = '{slot}'\")"
    ));
    assert!(!quotes_by_hand(
        "format!(\"SELECT {} FROM {}\", sql::ident(c), sql::qualified(s, t))"
    ));
    assert!(!quotes_by_hand("jsonb_set(row_data, '{{payload}}', x)"));
}
