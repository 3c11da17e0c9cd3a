//! docs/reference.md stays true to the code.
//!
//! 1. Every field of every configuration struct has a row in its section of the reference,
//!    under its serde name, and every row names a field (no stale keys). The fields are read
//!    from the source files by a line scanner: it knows `#[serde(rename = "…")]` and
//!    `#[serde(skip)]`, and refuses `flatten` and a struct-level `rename_all`, which it would
//!    have to be taught.
//! 2. Every top-level section of `Config` and every kind of sink has a section.
//! 3. The examples of each section, written as `key = example` into a configuration with
//!    whatever else the section needs, load through `Config::load_with_env`, the loader `run`
//!    uses (with an empty environment, so `OUTBOX_RELAY__*` variables do not interfere).
//! 4. Every complete configuration (a TOML block with a `[source]` table) in README.md and
//!    docs/sinks/*.md loads the same way.
//!
//! No database, broker or network: loading a configuration checks it without connecting.

use outbox_relay::config::Config;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const REFERENCE: &str = "docs/reference.md";

/// A group of reference sections documenting the fields of some structs; `extra` are keys
/// that are not struct fields (the sink's `type` tag).
struct Group {
    headings: &'static [&'static str],
    structs: &'static [(&'static str, &'static str)],
    extra: &'static [&'static str],
}

const GROUPS: &[Group] = &[
    Group {
        headings: &["[source]"],
        structs: &[("src/config/source.rs", "SourceConfig")],
        extra: &[],
    },
    Group {
        headings: &["[relay]"],
        structs: &[("src/config/mod.rs", "RelayConfig")],
        extra: &[],
    },
    Group {
        headings: &["[leader]"],
        structs: &[("src/config/mod.rs", "LeaderConfig")],
        extra: &[],
    },
    Group {
        headings: &["[http]"],
        structs: &[("src/config/mod.rs", "HttpConfig")],
        extra: &[],
    },
    Group {
        headings: &["[log]"],
        structs: &[("src/config/mod.rs", "LogConfig")],
        extra: &[],
    },
    Group {
        headings: &["[validation]"],
        structs: &[("src/config/mod.rs", "ValidationConfig")],
        extra: &[],
    },
    Group {
        headings: &["[upcast.<type>.<version>]"],
        structs: &[("src/upcast/mod.rs", "UpcastStep")],
        extra: &[],
    },
    Group {
        headings: &["[outbox.\"schema.table\"]"],
        structs: &[("src/config/mapping.rs", "TableMapping")],
        extra: &[],
    },
    Group {
        headings: &["additional entries"],
        structs: &[("src/config/mapping.rs", "AdditionalColumn")],
        extra: &[],
    },
    Group {
        headings: &["[sinks.<name>.match]"],
        structs: &[("sinks/src/routing.rs", "MatchRule")],
        extra: &[],
    },
    Group {
        headings: &["[sinks.<name>.upcast]"],
        structs: &[("sinks/src/upcast_rule.rs", "UpcastRule")],
        extra: &[],
    },
    Group {
        headings: &["type = \"stdout\""],
        structs: &[("sinks/src/stdout.rs", "StdoutConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"null\""],
        structs: &[("sinks/src/null.rs", "NullConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"file\""],
        structs: &[("sinks/src/file.rs", "FileConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"kafka\""],
        structs: &[("sinks/src/kafka/config.rs", "KafkaConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"eventbridge\""],
        structs: &[("sinks/src/eventbridge/config.rs", "EventBridgeConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"sqs\""],
        structs: &[("sinks/src/sqs/config.rs", "SqsConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"sns\""],
        structs: &[("sinks/src/sqs/config.rs", "SnsConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"webhook\""],
        structs: &[("sinks/src/webhook/config.rs", "WebhookConfig")],
        extra: &["type"],
    },
    Group {
        headings: &[
            "type = \"rabbitmq\"",
            "mode = \"exchange\"",
            "mode = \"stream\"",
        ],
        structs: &[("sinks/src/rabbitmq/config.rs", "RabbitMqConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"redis\""],
        structs: &[("sinks/src/redis/config.rs", "RedisConfig")],
        extra: &["type"],
    },
    Group {
        headings: &["type = \"nats\""],
        structs: &[("sinks/src/nats/config.rs", "NatsConfig")],
        extra: &["type"],
    },
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The serde names of the fields of `pub struct name` in `source`.
fn serde_fields(source: &str, file: &str, name: &str) -> Vec<String> {
    let lines: Vec<&str> = source.lines().collect();
    let start = lines
        .iter()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with(&format!("pub struct {name} {{"))
                || l.starts_with(&format!("struct {name} {{"))
        })
        .unwrap_or_else(|| panic!("{file}: no `struct {name} {{`: update tests/reference_doc.rs"));
    // Struct-level attributes: the lines right above the struct.
    for line in lines[..start].iter().rev() {
        let line = line.trim();
        if !(line.starts_with("#[") || line.starts_with("///")) {
            break;
        }
        assert!(
            !line.contains("rename_all"),
            "{file}: {name} has a struct-level rename_all, which this test does not apply yet"
        );
    }
    let mut fields = Vec::new();
    let mut attribute = String::new();
    let mut in_attribute = false;
    let (mut rename, mut skip) = (None, false);
    for line in &lines[start + 1..] {
        let line = line.trim();
        if line == "}" {
            return fields;
        }
        if in_attribute || line.starts_with("#[") {
            attribute.push_str(line);
            in_attribute = !line.ends_with(")]") && !line.ends_with(']');
            if in_attribute {
                continue;
            }
            if attribute.starts_with("#[serde") {
                assert!(
                    !attribute.contains("flatten"),
                    "{file}: {name} has a flattened field, which this test does not follow yet"
                );
                if let Some(at) = attribute.find("rename = \"") {
                    let rest = &attribute[at + "rename = \"".len()..];
                    rename = Some(rest[..rest.find('"').unwrap()].to_owned());
                }
                let words: Vec<&str> = attribute
                    .trim_start_matches("#[serde(")
                    .trim_end_matches(")]")
                    .split([',', ' '])
                    .collect();
                skip |= words.contains(&"skip") || words.contains(&"skip_deserializing");
            }
            attribute.clear();
            continue;
        }
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let declaration = line
            .strip_prefix("pub(crate) ")
            .or_else(|| line.strip_prefix("pub(super) "))
            .or_else(|| line.strip_prefix("pub "))
            .unwrap_or(line);
        if let Some((field, _)) = declaration.split_once(':') {
            if !skip {
                fields.push(rename.take().unwrap_or_else(|| field.trim().to_owned()));
            }
            (rename, skip) = (None, false);
        }
    }
    panic!("{file}: struct {name} does not end with a `}}` line");
}

/// A heading's text without the `#`s and backticks.
fn heading_text(line: &str) -> Option<String> {
    line.starts_with('#')
        .then(|| line.trim_start_matches('#').trim().replace('`', ""))
}

/// The rows (key, example) of the table under the heading whose text is `heading`.
fn rows(doc: &str, heading: &str) -> Vec<(String, String)> {
    let mut lines = doc
        .lines()
        .skip_while(|l| heading_text(l).as_deref() != Some(heading));
    assert!(
        lines.next().is_some(),
        "{REFERENCE} has no heading {heading:?}"
    );
    let mut rows = Vec::new();
    for line in lines.take_while(|l| !l.starts_with('#')) {
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(
            cells.len(),
            7,
            "{REFERENCE}, {heading}: a row needs the five cells key | type | default | example | \
             meaning, and no `|` inside them: {line}"
        );
        let key = cells[1].trim_matches('`').to_owned();
        let example = cells[4];
        let example = example
            .strip_prefix('`')
            .and_then(|e| e.split_once('`'))
            .map(|(e, _)| e.to_owned())
            .unwrap_or_else(|| panic!("{REFERENCE}, {heading}, {key}: no `example`"));
        rows.push((key, example));
    }
    assert!(!rows.is_empty(), "{REFERENCE}, {heading}: no rows");
    rows
}

#[test]
fn every_config_field_is_documented_and_every_documented_key_is_a_field() {
    let doc = read(REFERENCE);
    for group in GROUPS {
        let mut fields = BTreeSet::new();
        for (file, name) in group.structs {
            fields.extend(serde_fields(&read(file), file, name));
        }
        fields.extend(group.extra.iter().map(|k| k.to_string()));
        let mut documented = BTreeSet::new();
        for heading in group.headings {
            for (key, _) in rows(&doc, heading) {
                assert!(
                    documented.insert(key.clone()),
                    "{REFERENCE}: {key} is documented twice in {:?}",
                    group.headings
                );
            }
        }
        let missing: Vec<_> = fields.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&fields).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "{REFERENCE}, {:?} against {:?}: keys of the code without a row: {missing:?}; \
             rows that name no field: {stale:?}",
            group.headings,
            group.structs
        );
    }
}

#[test]
fn every_section_and_every_kind_of_sink_has_its_heading() {
    let doc = read(REFERENCE);
    let headings: Vec<String> = doc.lines().filter_map(heading_text).collect();
    let mod_rs = read("src/config/mod.rs");
    for section in serde_fields(&mod_rs, "src/config/mod.rs", "Config") {
        assert!(
            headings
                .iter()
                .any(|h| h.starts_with(&format!("[{section}"))),
            "{REFERENCE} has no section for [{section}]"
        );
    }
    // `SinkConfig` is tagged by `type`, its variants renamed to lower case.
    let sinks = read("sinks/src/config.rs");
    let body = sinks
        .split("pub enum SinkConfig {")
        .nth(1)
        .expect("sinks/src/config.rs: no `pub enum SinkConfig {`");
    let body = &body[..body.find("\n}").unwrap()];
    let kinds: Vec<String> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && l.contains('('))
        .map(|l| l[..l.find('(').unwrap()].to_lowercase())
        .collect();
    assert!(kinds.len() >= 6, "sink kinds found: {kinds:?}");
    for kind in kinds {
        let heading = format!("type = \"{kind}\"");
        assert!(
            headings.contains(&heading),
            "{REFERENCE} has no section {heading:?}"
        );
    }
}

/// Loads `toml` as `run` would, without the process's environment.
fn load(toml: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).unwrap();
    if let Err(err) = Config::load_with_env(Some(path.as_path()), Some(HashMap::new())) {
        panic!("{what} does not load: {err:#}\n---\n{toml}");
    }
}

/// `key = value` lines, plus `defaults` for the keys the lines lack.
fn body(pairs: &[(String, String)], defaults: &[(&str, &str)]) -> String {
    let mut text = String::new();
    for (key, value) in pairs {
        text.push_str(&format!("{key} = {value}\n"));
    }
    for (key, value) in defaults {
        if !pairs.iter().any(|(k, _)| k == key) {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    text
}

const SOURCE: &str = "[source]\nurl = \"postgres://relay@localhost:5432/app\"\n";
const STDOUT_SINK: &str = "[sinks.out]\ntype = \"stdout\"\n";
/// An upcaster producing version 2 of `OrderPlaced`, for the sinks' `upcast` examples.
const UPCASTER: &str = "[upcast.OrderPlaced.1]\nto = 2\nprogram = '.'\n";

/// A whole configuration around the examples of one section.
fn config_for(heading: &str, pairs: &[(String, String)]) -> String {
    let sink = |defaults: &[(&str, &str)]| {
        format!("{SOURCE}[sinks.s]\n{}{UPCASTER}", body(pairs, defaults))
    };
    match heading {
        "[source]" => format!("[source]\n{}{STDOUT_SINK}", body(pairs, &[])),
        "[relay]" | "[leader]" | "[http]" | "[log]" | "[validation]" => {
            format!("{SOURCE}{heading}\n{}{STDOUT_SINK}", body(pairs, &[]))
        }
        "[upcast.<type>.<version>]" => format!(
            "{SOURCE}[upcast.OrderPlaced.1]\n{}{STDOUT_SINK}",
            body(pairs, &[])
        ),
        "[outbox.\"schema.table\"]" => format!(
            "{SOURCE}[outbox.\"public.outbox\"]\n{}{STDOUT_SINK}",
            body(pairs, &[])
        ),
        "additional entries" => {
            let entry: Vec<String> = pairs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!(
                "{SOURCE}[outbox.\"public.outbox\"]\nadditional = [{{ {} }}]\n{STDOUT_SINK}",
                entry.join(", ")
            )
        }
        "[sinks.<name>.upcast]" => format!(
            "{SOURCE}{UPCASTER}{STDOUT_SINK}[sinks.out.upcast]\n{}",
            body(pairs, &[])
        ),
        "[sinks.<name>.match]" => format!(
            "{SOURCE}{STDOUT_SINK}[sinks.out.match]\n{}",
            body(pairs, &[])
        ),
        "type = \"rabbitmq\"" => sink(&[("exchange", "\"outbox\"")]),
        "mode = \"exchange\"" => sink(&[
            ("type", "\"rabbitmq\""),
            ("mode", "\"exchange\""),
            ("url", "\"amqp://guest:guest@localhost:5672/%2f\""),
        ]),
        "mode = \"stream\"" => sink(&[
            ("type", "\"rabbitmq\""),
            ("mode", "\"stream\""),
            (
                "url",
                "\"rabbitmq-stream://guest:guest@localhost:5552/%2f\"",
            ),
        ]),
        _ => sink(&[]),
    }
}

#[test]
fn the_examples_of_every_section_load() {
    let doc = read(REFERENCE);
    // Password and secret files are read when the configuration loads: point them at a real
    // one.
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "secret\n").unwrap();
    for heading in GROUPS.iter().flat_map(|g| g.headings) {
        let pairs: Vec<(String, String)> = rows(&doc, heading)
            .into_iter()
            .map(|(key, example)| {
                match key.ends_with("password_file")
                    || ["token_file", "secret_file", "authorization_file"].contains(&key.as_str())
                {
                    true => (key, format!("'{}'", secret.path().display())),
                    false => (key, example),
                }
            })
            .collect();
        // Keys that exclude each other are loaded one choice at a time.
        let choices = EXCLUSIVE
            .iter()
            .find(|(h, _)| *h == *heading)
            .map_or(&[][..], |(_, choices)| choices);
        let excluded: Vec<&str> = choices.iter().flat_map(|c| c.iter().copied()).collect();
        let runs: Vec<Vec<&str>> = if choices.is_empty() {
            vec![Vec::new()]
        } else {
            choices.iter().map(|c| c.to_vec()).collect()
        };
        for chosen in runs {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .filter(|(key, _)| {
                    !excluded.contains(&key.as_str()) || chosen.contains(&key.as_str())
                })
                .cloned()
                .collect();
            load(
                &config_for(heading, &pairs),
                &format!("{REFERENCE}, the examples of {heading} ({chosen:?})"),
            );
        }
    }
}

/// Sections whose keys exclude each other: each choice is loaded alone.
const EXCLUSIVE: &[(&str, &[&[&str]])] = &[(
    "type = \"nats\"",
    &[
        &["credentials_file"],
        &["username", "password_file"],
        &["token_file"],
    ],
)];

/// The fenced TOML blocks of a Markdown file.
fn toml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let fence = line.trim_start().starts_with("```");
        match current.take() {
            None if line.trim_start().starts_with("```toml") => current = Some(String::new()),
            None => {}
            Some(block) if fence => blocks.push(block),
            Some(mut block) => {
                block.push_str(line);
                block.push('\n');
                current = Some(block);
            }
        }
    }
    blocks
}

#[test]
fn every_complete_configuration_in_the_user_docs_loads() {
    let mut files = vec![PathBuf::from("README.md")];
    let mut sinks: Vec<PathBuf> = std::fs::read_dir(root().join("docs/sinks"))
        .expect("docs/sinks")
        .map(|entry| Path::new("docs/sinks").join(entry.unwrap().file_name()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    sinks.sort();
    files.extend(sinks);
    let mut loaded = 0;
    for file in &files {
        let file = file.to_str().unwrap();
        for block in toml_blocks(&read(file)) {
            if block.lines().any(|l| l.trim() == "[source]") {
                load(&block, &format!("a configuration in {file}"));
                loaded += 1;
            }
        }
    }
    assert!(
        loaded >= 6,
        "only {loaded} complete configurations found in {files:?}"
    );
}

#[test]
fn the_quickstart_configuration_is_at_most_ten_lines() {
    let readme = read("README.md");
    let quickstart = readme
        .split("## Quickstart")
        .nth(1)
        .expect("README.md has a Quickstart section");
    let block = toml_blocks(quickstart)
        .into_iter()
        .find(|b| b.contains("[source]"))
        .expect("the Quickstart has a configuration");
    let lines = block.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        lines <= 10,
        "the Quickstart configuration has {lines} lines"
    );
}
