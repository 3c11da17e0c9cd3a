//! `outbox-relay init`: creates the relay's schema, the publication (or adds missing tables
//! to it) and the slot. Safe to run any number of times.

use super::identify;
use crate::config::Config;
use crate::db;
use crate::source::origin::Origin;
use crate::source::replication::ReplicationConnection;
use crate::source::slot;
use crate::sql;
use crate::tables::{self, quoted_table, PublicationProblem};
use anyhow::Context;

const RELAY_SCHEMA_SQL: &str = include_str!("../../migrations/002_relay_schema.sql");

/// `tables` as a publication lists them: quoted, and for a key-sharded outbox each with the
/// shard's row filter on its key column (PostgreSQL 15 or later).
async fn published_tables(
    client: &tokio_postgres::Client,
    config: &Config,
    tables: &[String],
) -> anyhow::Result<Vec<String>> {
    let Some(shard) = config.source.sharding() else {
        return Ok(tables.iter().map(|t| quoted_table(t)).collect());
    };
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(db::explain)?
        .get(0);
    if version < 150000 {
        anyhow::bail!(
            "source.shards > 1 needs PostgreSQL 15 or later (publication row filters split the \
             rows by key); this server is PostgreSQL {}. Use source.shards = 1",
            version / 10000
        );
    }
    let mut published = Vec::new();
    for table in tables {
        let mapping = config.mapping_for(table);
        let column = mapping.key.as_deref().unwrap_or(&mapping.aggregate_id);
        let filter = tables::shard_filter(client, table, column, shard).await?;
        published.push(format!("{} WHERE ({filter})", quoted_table(table)));
    }
    Ok(published)
}

/// Creates the relay schema, the publication (or adds missing tables to it) and the slot;
/// safe to run any number of times.
pub async fn init(config: &Config) -> anyhow::Result<Vec<String>> {
    let source = &config.source;
    let params = source.connect_params()?;
    let client = db::connect(&params).await?;
    let mut done = Vec::new();
    if source.failover_slot {
        if let Some(problem) = slot::failover_slot_problem(&client).await? {
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

    let problems = tables::publication_problems(
        &client,
        &source.publication,
        &source.tables,
        source.sharding(),
    )
    .await?;
    let publication = sql::ident(&source.publication);
    if problems
        .iter()
        .any(|p| matches!(p, PublicationProblem::Missing { .. }))
    {
        let tables = published_tables(&client, config, &source.tables).await?;
        // Via the root: a partitioned outbox table's rows then arrive under its own name,
        // whichever partition holds them, and whenever a partition was attached. A shard's
        // publication publishes inserts only: with a row filter on a column outside the
        // replica identity, PostgreSQL refuses UPDATE and DELETE of the table.
        let publish = match source.sharding() {
            Some(shard) => format!(
                "publish = 'insert', publish_via_partition_root = true); COMMENT ON PUBLICATION \
                 {publication} IS {}",
                sql::literal(&shard.comment())
            ),
            None => "publish_via_partition_root = true)".to_owned(),
        };
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {publication} FOR TABLE {} WITH ({publish}",
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
        let unpublished: Vec<String> = problems
            .iter()
            .filter_map(|p| match p {
                PublicationProblem::Unpublished { table, .. } => Some(table.clone()),
                _ => None,
            })
            .collect();
        let missing = published_tables(&client, config, &unpublished).await?;
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
                    PublicationProblem::NoInserts { .. }
                        | PublicationProblem::RowFilter { .. }
                        | PublicationProblem::NotTheShard { .. }
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
                slot::SLOT_IS_FAILOVER,
                slot::SLOT_USABILITY
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
        if let Some(problem) = slot::slot_refusal(&row, 1, &source.slot, &config.relay.schema) {
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
        let system = identify(&params).await?;
        let start = slot::create(&client, source, &config.relay.schema).await?;
        Origin::record(&client, &config.relay.schema, &source.slot, &system, start).await?;
        done.push(format!("replication slot {}: created{kind}", source.slot));
    }
    if let Some(warning) = crate::backfill::skipped(&client, config).await? {
        done.push(format!("warning: {warning}"));
    }
    if source.failover_slot {
        for warning in slot::failover_slot_warnings(&client).await? {
            done.push(format!("warning: {warning}"));
        }
    }
    Ok(done)
}
