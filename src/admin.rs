//! The operator commands beside `run`: `init` creates what the relay needs, `check` finds
//! every problem with the configuration and the database (one line each, with the fix),
//! and warnings that do not fail it (a setting that will not do what it says), and `status`
//! shows slot lag and checkpoints.

use crate::checkpoint::dropped_slot_problem;
use crate::config::{parse_table_name, Config, ConnectParams, Format, SinkConfig};
use crate::db;
use crate::origin::Origin;
use crate::source::replication::{ReplicationConnection, SystemInfo};
use crate::sql;
use crate::tables::{self, quoted_table, PublicationProblem};
use anyhow::Context;
use outbox_relay_sinks::SinkContext;
use tokio_postgres::Client;

const RELAY_SCHEMA_SQL: &str = include_str!("../migrations/002_relay_schema.sql");

/// One of the relay's own tables, quoted for SQL.
fn relay_table(config: &Config, name: &str) -> String {
    sql::qualified(&config.relay.schema, name)
}

/// Creates the relay schema, the publication (or adds missing tables to it) and the slot;
/// safe to run any number of times.
pub async fn init(config: &Config) -> anyhow::Result<Vec<String>> {
    let source = &config.source;
    let params = source.connect_params()?;
    let client = db::connect(&params).await?;
    let mut done = Vec::new();
    if source.failover_slot {
        if let Some(problem) = db::failover_slot_problem(&client).await? {
            anyhow::bail!(problem);
        }
    }

    // The file names the schema as a literal (a catalog lookup) and as an identifier.
    let schema_sql = RELAY_SCHEMA_SQL
        .replace("'outbox_relay'", "\0")
        .replace("outbox_relay", &sql::ident(&config.relay.schema))
        .replace('\0', &sql::literal(&config.relay.schema));
    client
        .batch_execute(&schema_sql)
        .await
        .map_err(db::explain)
        .with_context(|| format!("creating schema {} (the role needs CREATE on the database, or see migrations/003_relay_role.sql)", config.relay.schema))?;
    done.push(format!(
        "schema {} with checkpoints and dead_letters: ready",
        config.relay.schema
    ));

    let problems =
        tables::publication_problems(&client, &source.publication, &source.tables).await?;
    let publication = sql::ident(&source.publication);
    if problems
        .iter()
        .any(|p| matches!(p, PublicationProblem::Missing { .. }))
    {
        let tables: Vec<String> = source.tables.iter().map(|t| quoted_table(t)).collect();
        // Via the root: a partitioned outbox table's rows then arrive under its own name,
        // whichever partition holds them, and whenever a partition was attached.
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish_via_partition_root = true)",
                tables.join(", ")
            ))
            .await
            .map_err(db::explain)
            .with_context(|| {
                format!(
                    "creating publication {} (the table owner must do it)",
                    source.publication
                )
            })?;
        done.push(format!(
            "publication {}: created for {}",
            source.publication,
            source.tables.join(", ")
        ));
    } else {
        let missing: Vec<String> = problems
            .iter()
            .filter_map(|p| match p {
                PublicationProblem::Unpublished { table, .. } => Some(quoted_table(table)),
                _ => None,
            })
            .collect();
        if !missing.is_empty() {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {publication} ADD TABLE {}",
                    missing.join(", ")
                ))
                .await
                .map_err(db::explain)
                .with_context(|| format!("adding tables to publication {}", source.publication))?;
            done.push(format!(
                "publication {}: added {}",
                source.publication,
                missing.join(", ")
            ));
        }
        if problems
            .iter()
            .any(|p| matches!(p, PublicationProblem::ViaPartitions { .. }))
        {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
                ))
                .await
                .map_err(db::explain)
                .with_context(|| format!("changing publication {}", source.publication))?;
            done.push(format!(
                "publication {}: now publishes partitioned tables via their root",
                source.publication
            ));
        }
        let left: Vec<&PublicationProblem> = problems
            .iter()
            .filter(|p| {
                matches!(
                    p,
                    PublicationProblem::NoInserts { .. } | PublicationProblem::RowFilter { .. }
                )
            })
            .collect();
        if missing.is_empty() && left.is_empty() {
            done.push(format!(
                "publication {}: already covers the outbox tables",
                source.publication
            ));
        }
        for problem in left {
            done.push(format!("warning: {problem}"));
        }
    }

    // The relay's state must be this server's before a slot is created for it.
    if let Some(origin) = Origin::load(&client, &config.relay.schema, &source.slot).await? {
        origin.compare(
            &identify(&params).await?,
            &config.relay.schema,
            &source.slot,
        )?;
    }
    let slot = client
        .query_opt(
            &format!(
                "SELECT {}, {} FROM pg_replication_slots s WHERE slot_name = $1",
                db::SLOT_IS_FAILOVER,
                db::SLOT_USABILITY
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    let kind = if source.failover_slot {
        " (a failover slot)"
    } else {
        ""
    };
    if let Some(row) = slot {
        if let Some(problem) = db::slot_refusal(&row, 1, &source.slot, &config.relay.schema) {
            anyhow::bail!(problem);
        }
        if source.failover_slot && !row.get::<_, bool>(0) {
            ReplicationConnection::connect(&params)
                .await?
                .enable_failover(&source.slot)
                .await
                .with_context(|| format!("making replication slot {} a failover slot (stop the relay that is using it, or let `run` do it)", source.slot))?;
            done.push(format!(
                "replication slot {}: already exists, now a failover slot",
                source.slot
            ));
        } else {
            done.push(format!(
                "replication slot {}: already exists{kind}",
                source.slot
            ));
        }
    } else if source.backfill {
        done.push(format!(
            "replication slot {}: left to `run`, which creates it{kind} and backfills the rows already in the outbox first",
            source.slot
        ));
    } else {
        if let Some(problem) =
            dropped_slot_problem(&client, &config.relay.schema, &source.slot).await?
        {
            anyhow::bail!(problem);
        }
        let system = identify(&params).await?;
        let start: String = client
            .query_one(
                &format!(
                    "SELECT lsn::text FROM {}",
                    db::create_slot_call(source.failover_slot)
                ),
                &[&source.slot],
            )
            .await
            .map_err(db::explain)
            .with_context(|| format!("creating replication slot {}", source.slot))?
            .get(0);
        let start = start.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        Origin::record(&client, &config.relay.schema, &source.slot, &system, start).await?;
        done.push(format!("replication slot {}: created{kind}", source.slot));
    }
    if let Some(warning) = crate::backfill::skipped(&client, config).await? {
        done.push(format!("warning: {warning}"));
    }
    if source.failover_slot {
        for warning in db::failover_slot_warnings(&client).await? {
            done.push(format!("warning: {warning}"));
        }
    }
    Ok(done)
}

/// What the server says of itself over a replication connection: its system identifier and
/// timeline, as `run` sees them.
async fn identify(params: &ConnectParams) -> anyhow::Result<SystemInfo> {
    let mut connection = ReplicationConnection::connect(params).await?;
    Ok(connection.identify_system().await?)
}

/// What `check` found: problems, which stop the relay or lose events, and warnings, which
/// do neither but are not what the configuration asks for. One line each, with the fix.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// Every problem and warning found; no problem when the relay can run.
pub async fn check(config: &Config) -> CheckReport {
    let mut report = CheckReport {
        problems: check_sinks(config).await,
        warnings: Vec::new(),
    };
    let problems = &mut report.problems;
    let source = &config.source;
    let params = match source.connect_params() {
        Ok(params) => params,
        Err(err) => {
            problems.push(format!("{err:#}"));
            return report;
        }
    };
    let client = match db::connect(&params).await {
        Ok(client) => client,
        Err(err) => {
            problems.push(format!("{err:#}"));
            return report;
        }
    };
    if let Some(dir) = &config.validation.schema_dir {
        if let Err(err) = crate::validation::SchemaRegistry::load(dir, config.validation.required) {
            problems.push(format!("{err:#}"));
        }
    }
    let system = identify(&params).await;
    if let Err(err) = check_database(config, &client, system.is_ok(), problems).await {
        problems.push(format!("checking the database failed: {err:#}"));
    }
    match crate::backfill::skipped(&client, config).await {
        Ok(warning) => report.warnings.extend(warning),
        Err(err) => problems.push(format!("checking the backfill failed: {err:#}")),
    }
    match system {
        Ok(system) => match Origin::load(&client, &config.relay.schema, &source.slot).await {
            Ok(Some(origin)) => {
                if let Err(foreign) = origin.compare(&system, &config.relay.schema, &source.slot) {
                    problems.push(foreign.to_string());
                }
            }
            Ok(None) => {}
            Err(err) => problems.push(format!("checking the database failed: {err:#}")),
        },
        Err(err) => problems.push(format!("replication connection: {err}")),
    }
    report
}

/// Problems with the columns the mapping of `table` reads: missing, generated (logical
/// replication does not send generated columns), of a type the relay cannot read as text,
/// or a `bytea` payload that a sink can only dead-letter.
async fn column_problems(
    client: &Client,
    table: &str,
    config: &Config,
) -> anyhow::Result<Vec<String>> {
    let mapping = config.mapping_for(table);
    let rows = client
        .query(
            "SELECT attname::text, attgenerated <> '', format_type(atttypid, NULL) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&quoted_table(table)],
        )
        .await
        .map_err(db::explain)?;
    let mut problems = Vec::new();
    for column in mapping.columns() {
        let found = rows.iter().find(|r| r.get::<_, String>(0) == column.name);
        let Some(row) = found else {
            if column.required {
                problems.push(format!(
                    "outbox table {table} has no column {:?} (its {} column): add it (see \
                     migrations/001_outbox_table.sql), or map another column under [outbox.\"{table}\"]",
                    column.name, column.role
                ));
            }
            continue;
        };
        let (generated, type_name): (bool, String) = (row.get(1), row.get(2));
        if generated {
            problems.push(format!(
                "column {:?} of outbox table {table} (its {} column) is a generated column, which \
                 logical replication does not send: every row would be dead-lettered. Make it a plain \
                 column the application (or a trigger) fills",
                column.name, column.role
            ));
        }
        if column.role == "payload" && !PAYLOAD_TYPES.contains(&type_name.as_str()) {
            problems.push(format!(
                "the payload column {:?} of outbox table {table} is of type {type_name}: use jsonb \
                 (json and text holding JSON work too, bytea for bytes)",
                column.name
            ));
        }
        if column.role == "payload" && type_name == "bytea" {
            problems.extend(bytes_refused_by(config, table)?);
        }
    }
    Ok(problems)
}

/// Payload column types the relay reads: as JSON text, or as bytes (`bytea`).
const PAYLOAD_TYPES: [&str; 5] = ["jsonb", "json", "text", "character varying", "bytea"];

/// The EventBridge sinks that would dead-letter every event of `table`, whose payload is
/// bytes: their `raw` or `debezium` Detail must be a JSON object.
fn bytes_refused_by(config: &Config, table: &str) -> anyhow::Result<Vec<String>> {
    let names = parse_table_name(table)?;
    Ok(config
        .sinks
        .iter()
        .filter_map(|(name, sink)| match sink {
            SinkConfig::EventBridge(eventbridge)
                if eventbridge.format != Format::CloudEvents
                    && eventbridge.filter.takes_table(&names) =>
            {
                let format = if eventbridge.format == Format::Raw {
                    "raw"
                } else {
                    "debezium"
                };
                Some(format!(
                    "sink {name}: the payload column of outbox table {table} is bytea, and an \
                     EventBridge Detail in format \"{format}\" must be a JSON object: every event \
                     of the table would be dead-lettered. Use format = \"cloudevents\" (the bytes \
                     go into data_base64), or keep the table from the sink with match.tables"
                ))
            }
            _ => None,
        })
        .collect())
}

/// Problems with the sinks' destinations that a sink can see before it runs.
async fn check_sinks(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, sink) in &config.sinks {
        let slot = &config.source.slot;
        problems.extend(sink.check(&SinkContext { name, slot }).await);
    }
    problems
}

/// The current role, and whether it may stream: REPLICATION or superuser of its own, or
/// membership in a role that grants it on a managed platform. Amazon RDS and Aurora grant
/// replication through membership in `rds_replication` (or `rds_superuser`); elsewhere a
/// member of a role with REPLICATION is counted too, and the replication connection `check`
/// opens says whether the server agrees (vanilla PostgreSQL does not pass the attribute on).
const REPLICATION_RIGHTS_SQL: &str =
    "SELECT current_user::text, r.rolreplication OR r.rolsuper OR EXISTS (\
     SELECT 1 FROM pg_roles g WHERE g.oid <> r.oid \
     AND (g.rolreplication OR g.rolname IN ('rds_replication', 'rds_superuser')) \
     AND pg_has_role(current_user, g.oid, 'MEMBER')) \
     FROM pg_roles r WHERE r.rolname = current_user";

/// The problem line for a role that cannot stream, with the fix on each platform.
fn cannot_stream_problem(user: &str) -> String {
    let role = sql::ident(user);
    format!(
        "role {user} cannot stream (it has neither REPLICATION nor a role that grants it): \
         ALTER ROLE {role} WITH REPLICATION as a superuser (see migrations/003_relay_role.sql); \
         on Amazon RDS or Aurora, GRANT rds_replication TO {role}; on Google Cloud SQL, \
         ALTER ROLE {role} WITH REPLICATION as a member of cloudsqlsuperuser; on Azure \
         Database for PostgreSQL flexible server, ALTER ROLE {role} WITH REPLICATION as a \
         member of azure_pg_admin"
    )
}

/// The database's problems. `streams`: a replication connection succeeded, which settles
/// whether the role may stream, however its rights were granted.
async fn check_database(
    config: &Config,
    client: &Client,
    streams: bool,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let source = &config.source;
    let one =
        |sql: &'static str| async move { client.query_one(sql, &[]).await.map_err(db::explain) };

    if db::is_standby(client).await? {
        problems.push(db::STANDBY_PROBLEM.to_owned());
    }
    if source.failover_slot {
        match db::failover_slot_problem(client).await? {
            Some(problem) => problems.push(problem),
            None => problems.extend(db::standby_slot_problems(client).await?),
        }
    }
    let wal_level: String = one("SHOW wal_level").await?.get(0);
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is {wal_level}: set wal_level = logical in postgresql.conf and restart PostgreSQL"
        ));
    }
    let role = one(REPLICATION_RIGHTS_SQL).await?;
    let (user, can_replicate): (String, bool) = (role.get(0), role.get(1));
    if !can_replicate && !streams {
        problems.push(cannot_stream_problem(&user));
    }

    for table in &source.tables {
        let row = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL, \
                 CASE WHEN to_regclass($1) IS NOT NULL THEN has_table_privilege(to_regclass($1), 'SELECT') END",
                &[&quoted_table(table)],
            )
            .await
            .map_err(db::explain)?;
        let (exists, readable): (bool, Option<bool>) = (row.get(0), row.get(1));
        if !exists {
            problems.push(format!(
                "outbox table {table} does not exist: create it (see migrations/001_outbox_table.sql) or fix source.tables (names are matched exactly, case included: a table created without quotes has a lower-case name)"
            ));
            continue;
        }
        if readable == Some(false) {
            problems.push(format!(
                "role {user} cannot read {table}: GRANT SELECT ON {table} TO {user}"
            ));
        }
        problems.extend(column_problems(client, table, config).await?);
    }

    problems.extend(
        tables::publication_problems(client, &source.publication, &source.tables)
            .await?
            .iter()
            .map(ToString::to_string),
    );

    let slot = client
        .query_opt(
            &format!(
                "SELECT {} FROM pg_replication_slots s WHERE slot_name = $1",
                db::SLOT_USABILITY
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    match slot {
        Some(row) => {
            problems.extend(db::slot_refusal(
                &row,
                0,
                &source.slot,
                &config.relay.schema,
            ));
        }
        None => {
            if let Some(problem) =
                dropped_slot_problem(client, &config.relay.schema, &source.slot).await?
            {
                problems.push(problem);
            } else if !source.create_slot {
                problems.push(format!(
                    "replication slot {} does not exist: run `outbox-relay init`, or set source.create_slot = true",
                    source.slot
                ));
            }
            let free: bool = one(
                "SELECT current_setting('max_replication_slots')::int > (SELECT count(*) FROM pg_replication_slots)",
            )
            .await?
            .get(0);
            if !free {
                problems.push(format!(
                    "replication slot {} does not exist and every slot is in use: raise max_replication_slots",
                    source.slot
                ));
            }
        }
    }

    let schema = &config.relay.schema;
    let checkpoints = relay_table(config, "checkpoints");
    let dead_letters = relay_table(config, "dead_letters");
    let state = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            &[&checkpoints, &dead_letters],
        )
        .await
        .map_err(db::explain)?;
    if !state.get::<_, bool>(0) {
        problems.push(format!(
            "the relay's tables in schema {schema} do not exist: run `outbox-relay init`"
        ));
    } else {
        let writable: bool = client
            .query_one(
                "SELECT has_table_privilege($1, 'INSERT, UPDATE') AND has_table_privilege($2, 'INSERT')",
                &[&checkpoints, &dead_letters],
            )
            .await
            .map_err(db::explain)?
            .get(0);
        if !writable {
            problems.push(format!("role {user} cannot write {checkpoints} / {dead_letters}: grant INSERT, UPDATE (see migrations/003_relay_role.sql)"));
        }
        problems.extend(crate::checkpoint::schema_problem(client, schema).await?);
    }
    Ok(())
}

/// A human-readable report: slot activity and lag, checkpoints per sink, dead letters.
pub async fn status(config: &Config) -> anyhow::Result<String> {
    let source = &config.source;
    let client = db::connect(&source.connect_params()?).await?;
    let mut out = String::new();
    let slot = client
        .query_opt(
            &format!(
                "SELECT active, active_pid, confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, {} \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                db::SLOT_IS_FAILOVER
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    match slot {
        None => out.push_str(&format!(
            "slot {}: does not exist (run `outbox-relay init`)\n",
            source.slot
        )),
        Some(row) => {
            let active: bool = row.get(0);
            let pid: Option<i32> = row.get(1);
            let confirmed: Option<String> = row.get(2);
            let current: String = row.get(3);
            let lag: Option<i64> = row.get(4);
            let failover: bool = row.get(5);
            out.push_str(&format!(
                "slot {}: {}{}\n  confirmed_flush_lsn {}\n  server wal_lsn      {}\n  lag                 {} bytes\n",
                source.slot,
                match pid {
                    Some(pid) if active => format!("active (pid {pid})"),
                    _ => "inactive".into(),
                },
                if failover { ", a failover slot" } else { "" },
                confirmed.unwrap_or_else(|| "-".into()),
                current,
                lag.map_or_else(|| "-".into(), |l| l.to_string()),
            ));
        }
    }
    let rows = client
        .query(
            &format!("SELECT sink, commit_lsn::text, event_index, updated_at::text FROM {} WHERE slot = $1 ORDER BY sink", relay_table(config, "checkpoints")),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)
        .context("reading checkpoints (run `outbox-relay init` first)")?;
    out.push_str("checkpoints:\n");
    for name in config.sinks.keys() {
        match rows.iter().find(|r| r.get::<_, String>(0) == *name) {
            Some(row) => out.push_str(&format!(
                "  {name}: {}#{} (updated {})\n",
                row.get::<_, String>(1),
                row.get::<_, i32>(2),
                row.get::<_, String>(3)
            )),
            None => out.push_str(&format!("  {name}: none yet\n")),
        }
    }
    let dead: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE slot = $1",
                relay_table(config, "dead_letters")
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?
        .get(0);
    out.push_str(&format!("dead letters: {dead}\n"));
    Ok(out)
}

/// `dlq list`: the newest dead letters, one line each.
pub async fn dlq_list(config: &Config, limit: i64) -> anyhow::Result<String> {
    let client = db::connect(&config.source.connect_params()?).await?;
    let dead_letters = relay_table(config, "dead_letters");
    let rows = client
        .query(
            &format!(
                "SELECT id, created_at::text, sink, source_table, commit_lsn::text, event_index, reason, \
                 replayed_at IS NOT NULL FROM {dead_letters} WHERE slot = $1 ORDER BY id DESC LIMIT $2"
            ),
            &[&config.source.slot, &limit],
        )
        .await
        .map_err(db::explain)
        .context("reading dead letters (run `outbox-relay init` first)")?;
    let mut out = String::new();
    for row in rows.iter().rev() {
        let sink: String = row.get(2);
        out.push_str(&format!(
            "{:>6}  {}  {}  {}#{}{}{}  {}\n",
            row.get::<_, i64>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(3),
            row.get::<_, String>(4),
            row.get::<_, i32>(5),
            if sink.is_empty() {
                String::new()
            } else {
                format!("  sink={sink}")
            },
            if row.get::<_, bool>(7) {
                "  (replayed)"
            } else {
                ""
            },
            row.get::<_, String>(6),
        ));
    }
    if out.is_empty() {
        out.push_str("no dead letters\n");
    }
    Ok(out)
}

/// `dlq show ID`: one dead letter as JSON, with its raw row. When `row_data` is not exact
/// (NUL characters or bytes that are not UTF-8 became U+FFFD), `raw` shows the exact bytes,
/// escaped (`\xe9`, `\x00`): the content of a message, or each column of a row.
pub async fn dlq_show(config: &Config, id: i64) -> anyhow::Result<String> {
    let client = db::connect(&config.source.connect_params()?).await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT jsonb_build_object('id', id, 'created_at', created_at, 'sink', sink, 'table', source_table, \
                 'commit_lsn', commit_lsn::text, 'event_index', event_index, 'xid', xid, 'reason', reason, \
                 'row', row_data, 'replayed_at', replayed_at), raw FROM {}.dead_letters WHERE id = $1 AND slot = $2",
                config.relay.schema
            ),
            &[&id, &config.source.slot],
        )
        .await
        .map_err(db::explain)?
        .with_context(|| format!("there is no dead letter {id} for slot {}", config.source.slot))?;
    let mut letter: serde_json::Value = row.get(0);
    if let Some(raw) = row.get::<_, Option<Vec<u8>>>(1) {
        letter["raw"] = show_raw(&letter["row"], &raw);
    }
    Ok(serde_json::to_string_pretty(&letter)? + "\n")
}

/// A dead letter's exact bytes, readably: escaped text for a message's content (its `row` is
/// a string), an object of escaped column values for a row.
fn show_raw(row: &serde_json::Value, raw: &[u8]) -> serde_json::Value {
    use serde_json::Value;
    let escaped = |bytes: &[u8]| Value::String(bytes.escape_ascii().to_string());
    match (row, crate::outbox::unframe_columns(raw)) {
        (Value::Object(_), Some(columns)) => Value::Object(
            columns
                .into_iter()
                .map(|(name, value)| (name, value.map_or(Value::Null, |v| escaped(&v))))
                .collect(),
        ),
        _ => escaped(raw),
    }
}

/// `dlq replay ID`: publishes a dead letter again, after it was fixed in place (its
/// `row_data`), as a transactional logical message the relay maps like the original row;
/// marks it replayed in the same transaction.
pub async fn dlq_replay(config: &Config, id: i64) -> anyhow::Result<String> {
    let mut client = db::connect(&config.source.connect_params()?).await?;
    let dead_letters = relay_table(config, "dead_letters");
    let tx = client.transaction().await.map_err(db::explain)?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT source_table, row_data, replayed_at IS NOT NULL FROM {dead_letters} \
                 WHERE id = $1 AND slot = $2 FOR UPDATE"
            ),
            &[&id, &config.source.slot],
        )
        .await
        .map_err(db::explain)?
        .with_context(|| {
            format!(
                "there is no dead letter {id} for slot {}",
                config.source.slot
            )
        })?;
    let (table, row_data, replayed): (String, serde_json::Value, bool) =
        (row.get(0), row.get(1), row.get(2));
    if replayed {
        anyhow::bail!("dead letter {id} was already replayed");
    }
    let document = replay_document(config, &table, row_data).with_context(|| {
        format!(
            "dead letter {id} cannot be replayed as it is: fix it first, e.g. \
             UPDATE {dead_letters} SET row_data = jsonb_set(row_data, '{{payload}}', to_jsonb('{{\"fixed\": true}}'::text)) WHERE id = {id}"
        )
    })?;
    let key = crate::checkpoint::load_replay_key(&tx, &config.relay.schema)
        .await?
        .context("the relay's schema has no replay key: run `outbox-relay init` (it adds one), then replay again")?;
    tx.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&crate::outbox::REPLAY_PREFIX, &key.sign(&document)],
    )
    .await
    .map_err(db::explain)
    .context("publishing the replay (the role needs EXECUTE on pg_logical_emit_message)")?;
    tx.execute(
        &format!("UPDATE {dead_letters} SET replayed_at = now() WHERE id = $1"),
        &[&id],
    )
    .await
    .map_err(db::explain)?;
    tx.commit().await.map_err(db::explain)?;
    Ok(format!(
        "dead letter {id} replayed: the relay publishes it as a new event of {table}\n"
    ))
}

/// The outbox event document for a dead letter's (fixed) row: the table's column mapping
/// applied to the stored columns, or the stored message content.
fn replay_document(
    config: &Config,
    table: &str,
    row: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::{json, Value};
    let mut document = match (table.strip_prefix("message:"), row) {
        (Some(_), Value::String(content)) => {
            serde_json::from_str(&content).context("the stored message content is not JSON")?
        }
        (Some(_), other) => other,
        (None, Value::Object(columns)) => {
            let mapping = config.mapping_for(table);
            let text = |column: &str| {
                columns
                    .get(column)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let required = |column: &str| {
                text(column)
                    .with_context(|| format!("column {column:?} is missing or NULL in row_data"))
            };
            let payload = required(&mapping.payload)?;
            let mut document = json!({
                "id": required(&mapping.id)?,
                "aggregatetype": required(&mapping.aggregate_type)?,
                "aggregateid": required(&mapping.aggregate_id)?,
                "type": required(&mapping.event_type)?,
                "payload": serde_json::from_str::<Value>(&payload).context("the payload is not valid JSON")?,
            });
            if let Some(key) = mapping.key.as_deref().and_then(text) {
                document["key"] = json!(key);
            }
            let optional = [
                (
                    "schema_version",
                    mapping
                        .schema_version
                        .as_deref()
                        .unwrap_or("schema_version"),
                ),
                ("headers", mapping.headers.as_deref().unwrap_or("headers")),
                (
                    "occurred_at",
                    mapping.occurred_at.as_deref().unwrap_or("occurred_at"),
                ),
                (
                    "traceparent",
                    mapping.traceparent.as_deref().unwrap_or("traceparent"),
                ),
            ];
            for (field, column) in optional {
                if let Some(value) = text(column) {
                    document[field] = match field {
                        "schema_version" => json!(value
                            .parse::<i64>()
                            .context("schema_version is not an integer")?),
                        "headers" => {
                            serde_json::from_str(&value).context("headers is not a JSON object")?
                        }
                        "occurred_at" => json!(crate::outbox::pg_timestamp_to_rfc3339(&value)
                            .context("occurred_at is not a timestamp")?),
                        _ => json!(value),
                    };
                }
            }
            document
        }
        (None, _) => anyhow::bail!("the stored row is not an object of columns"),
    };
    document["table"] = json!(table);
    Ok(document)
}
