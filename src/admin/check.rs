//! `outbox-relay check`: every problem with the configuration, the database and the sinks
//! (one line each, with the fix), and warnings that do not fail it.

use super::{identify, relay_table};
use crate::config::{parse_table_name, Config};
use crate::db;
use crate::source::origin::Origin;
use crate::source::slot::{self, dropped_slot_problem};
use crate::sql;
use crate::tables::{self, quoted_table};
use outbox_relay_sinks::SinkContext;
use tokio_postgres::Client;

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
        .filter(|(_, sink)| sink.filter().takes_table(&names))
        .filter_map(|(name, sink)| {
            let problem = sink.binary_payload_problem()?;
            Some(format!(
                "sink {name}: the payload column of outbox table {table} is bytea, and {problem}"
            ))
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
        match slot::failover_slot_problem(client).await? {
            Some(problem) => problems.push(problem),
            None => problems.extend(slot::standby_slot_problems(client).await?),
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
        tables::publication_problems(
            client,
            &source.publication,
            &source.tables,
            source.sharding(),
        )
        .await?
        .iter()
        .map(ToString::to_string),
    );

    let slot = client
        .query_opt(
            &format!(
                "SELECT {} FROM pg_replication_slots s WHERE slot_name = $1",
                slot::SLOT_USABILITY
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    match slot {
        Some(row) => {
            problems.extend(slot::slot_refusal(
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
        problems.extend(crate::dead_letters::schema_problem(client, schema).await?);
    }
    Ok(())
}
