//! Configuration loading, overrides, secrets and validation, without a database.

use super::*;
use std::collections::HashMap;
use std::io::Write;

fn load(toml: &str, env: &[(&str, &str)]) -> anyhow::Result<Config> {
    let mut file = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::load_with_env(Some(file.path()), Some(env))
}

const MINIMAL: &str = "[source]\nurl = \"postgres://app@db/app\"\n[sinks.out]\ntype = \"stdout\"\n";

#[test]
fn tombstones_are_refused_for_every_non_kafka_sink_that_takes_the_table() {
    let config = |sinks: &str| {
        load(
            &format!(
                "[source]\nurl = \"postgres://app@db/app\"\n\
                 tables = [\"public.outbox\", \"billing.events\"]\n\
                 [outbox.\"public.outbox\"]\non_null_payload = \"tombstone\"\n\
                 [sinks.k]\ntype = \"kafka\"\nbrokers = \"b:9092\"\n{sinks}"
            ),
            &[],
        )
        .map(|config| config.mapping_for("public.outbox").on_null_payload)
        .map_err(|e| e.to_string())
    };
    assert_eq!(config(""), Ok(NullPayloadPolicy::Tombstone));
    assert_eq!(
        config("[sinks.audit]\ntype = \"stdout\"\n[sinks.audit.match]\ntables = [\"billing.events\"]\n"),
        Ok(NullPayloadPolicy::Tombstone),
        "a sink whose match.tables leaves the table out never sees a tombstone"
    );
    for sink in [
        "[sinks.audit]\ntype = \"stdout\"\n",
        "[sinks.audit]\ntype = \"null\"\n[sinks.audit.match]\ntables = [\"public.outbox\"]\n",
        "[sinks.audit]\ntype = \"eventbridge\"\n[sinks.audit.match]\naggregate_types = [\"order\"]\n",
    ] {
        let err = config(sink).unwrap_err();
        assert!(
            err.contains("[outbox.\"public.outbox\"] has on_null_payload = \"tombstone\", but sink \"audit\"")
                && err.contains("sinks.audit.match.tables"),
            "{err}"
        );
    }
    assert_eq!(
        load(MINIMAL, &[])
            .unwrap()
            .mapping_for("public.outbox")
            .on_null_payload,
        NullPayloadPolicy::DeadLetter
    );
}

#[test]
fn match_tables_are_named_as_events_name_them_and_must_be_outbox_tables() {
    let sink = |tables: &str| {
        format!(
            "[source]\nurl = \"postgres://app@db/app\"\nmessage_prefixes = [\"outbox\"]\n\
             [sinks.out]\ntype = \"stdout\"\n[sinks.out.match]\ntables = [{tables}]\n"
        )
    };
    let config = load(&sink("\"outbox\", \"message:outbox\""), &[]).unwrap();
    assert_eq!(
        config.sinks["out"].filter().event_tables(),
        ["public.outbox", "message:outbox"]
    );
    for unknown in ["\"public.outbx\"", "\"message:other\""] {
        let err = format!("{:#}", load(&sink(unknown), &[]).unwrap_err());
        assert!(err.contains("sinks.out.match.tables names"), "{err}");
    }
}

#[test]
fn a_config_error_never_shows_the_values_of_the_file() {
    let cases = [
        // A backslash in the password: an invalid escape.
        "[source]\nurl = \"postgres://app:s3cr\\qet@db/app\"\n[sinks.out]\ntype = \"stdout\"\n",
        // A quote in the password ends the string early.
        "[source]\nurl = \"postgres://app:s3cr\"et@db/app\"\n[sinks.out]\ntype = \"stdout\"\n",
        // A missing closing quote.
        "[source]\nurl = \"postgres://app:s3cret@db/app\n[sinks.out]\ntype = \"stdout\"\n",
        // A value of the wrong type, echoed by serde.
        "[source]\nurl = \"postgres://app@db/app\"\ntables = \"s3cret\"\n[sinks.out]\ntype = \"stdout\"\n",
        "[source]\nurl = \"postgres://app@db/app\"\n[relay]\nbatch_size = \"s3cret\"\n[sinks.out]\ntype = \"stdout\"\n",
    ];
    for toml in cases {
        let err = format!("{:#}", load(toml, &[]).unwrap_err());
        assert!(!err.contains("s3cr"), "{err}");
        assert!(err.starts_with("invalid configuration"), "{err}");
    }
    let err = format!("{:#}", load(cases[0], &[]).unwrap_err());
    assert!(err.contains("line 2"), "where the error is stays: {err}");
}

#[test]
fn tls_settings_in_a_key_value_connection_string_are_honoured() {
    let toml = MINIMAL.replace(
        "postgres://app@db/app",
        "host=db user=relay password='p w' sslmode=verify-full sslrootcert='/etc/ca dir/ca.pem' dbname=shop",
    );
    let params = load(&toml, &[]).unwrap().source.connect_params().unwrap();
    assert_eq!(params.sslmode, SslMode::VerifyFull);
    assert_eq!(
        params.sslrootcert.as_deref(),
        Some(std::path::Path::new("/etc/ca dir/ca.pem"))
    );
    assert_eq!(
        (params.user.as_str(), params.dbname.as_str()),
        ("relay", "shop")
    );
    let require = MINIMAL.replace(
        "postgres://app@db/app",
        "host=db user=relay sslmode=require",
    );
    let params = load(&require, &[])
        .unwrap()
        .source
        .connect_params()
        .unwrap();
    assert_eq!(params.sslmode, SslMode::Require);
}

#[test]
fn defaults_and_env_overrides() {
    let config = load(
        MINIMAL,
        &[
            (
                "OUTBOX_RELAY__SOURCE__URL",
                "postgres://relay@other:6543/shop?sslmode=verify-full",
            ),
            ("OUTBOX_RELAY__SOURCE__STATUS_INTERVAL", "2s"),
            (
                "OUTBOX_RELAY__SOURCE__TABLES",
                "public.outbox,billing.outbox",
            ),
            ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "10"),
        ],
    )
    .unwrap();
    assert_eq!(config.source.slot, "outbox_relay");
    assert_eq!(config.source.status_interval, Duration::from_secs(2));
    assert_eq!(config.source.tables, ["public.outbox", "billing.outbox"]);
    assert_eq!(config.relay.batch_size, 10);
    let params = config.source.connect_params().unwrap();
    assert_eq!(params.host, Host::Tcp("other".into()));
    assert_eq!(
        (params.port, params.user.as_str(), params.dbname.as_str()),
        (6543, "relay", "shop")
    );
    assert_eq!(params.sslmode, SslMode::VerifyFull);
}

#[test]
fn unknown_keys_and_wrong_types_name_the_key() {
    let err = load(&format!("{MINIMAL}[relay]\nbatch_sise = 3\n"), &[]).unwrap_err();
    assert!(format!("{err:#}").contains("batch_sise"), "{err:#}");
    let err = load(&format!("{MINIMAL}[relay]\nbatch_size = \"many\"\n"), &[]).unwrap_err();
    assert!(format!("{err:#}").contains("batch_size"), "{err:#}");
    let err = load(MINIMAL, &[("OUTBOX_RELAY__SINKS__OUT__COLOR", "red")]).unwrap_err();
    assert!(format!("{err:#}").contains("color"), "{err:#}");
    let err = load(
        "[source]\nurl = \"postgres://a@b/c\"\n[sinks.out]\ntype = \"kafak\"\n",
        &[],
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("kafak"), "{err:#}");
}

#[test]
fn password_file_wins_and_is_redacted() {
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    writeln!(secret, "s3cret-from-file").unwrap();
    let config = load(
        MINIMAL,
        &[
            ("OUTBOX_RELAY__SOURCE__URL", "postgres://app:inline@db/app"),
            (
                "OUTBOX_RELAY__SOURCE__PASSWORD_FILE",
                secret.path().to_str().unwrap(),
            ),
        ],
    )
    .unwrap();
    let params = config.source.connect_params().unwrap();
    assert_eq!(
        params.password.as_ref().unwrap().expose(),
        "s3cret-from-file"
    );
    let shown = format!("{params:?} {params}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("inline"),
        "{shown}"
    );
}

#[test]
fn missing_file_and_bad_names_say_what_to_do() {
    let err = Config::load(Some(Path::new("/nonexistent/relay.toml"))).unwrap_err();
    assert!(err.to_string().contains("--config"), "{err}");
    let err = load(MINIMAL, &[("OUTBOX_RELAY__SOURCE__SLOT", "Bad-Slot")]).unwrap_err();
    assert!(err.to_string().contains("source.slot"), "{err}");
}
