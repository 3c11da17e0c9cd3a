//! What the relay must know of its outbox tables in the database, beyond their rows: which
//! relation each configured table is (its OID, so that a renamed table is noticed rather than
//! skipped), which partitioned table a partition belongs to (pgoutput sends a partition's rows
//! under the partition's own name unless the publication publishes via the root), and whether
//! the publication really delivers every table's inserts (it may leave a table out, not
//! publish inserts, or filter rows).
//!
//! Invariant: a row of a configured outbox table either becomes an event or a dead letter, or
//! the relay stops with the fix. What the publication keeps from the stream cannot be seen in
//! the stream, so `run` refuses to start on any [`PublicationProblem`] but
//! [`PublicationProblem::ViaPartitions`], `check` reports them all, and the publication
//! watch logs them while the relay streams.

use crate::config::{parse_table_name, Shard};
use crate::db;
use crate::sql;
use std::collections::HashMap;
use tokio_postgres::GenericClient;

/// Something about the publication that keeps outbox rows from the relay, or may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationProblem {
    /// The publication does not exist.
    Missing { publication: String },
    /// `publish` leaves out `insert`: no row of any table arrives.
    NoInserts { publication: String },
    /// An outbox table (or, for a partitioned table, its partitions) is not published.
    Unpublished { publication: String, table: String },
    /// A row filter (PostgreSQL 15+) keeps some of a table's rows from the relay.
    RowFilter {
        publication: String,
        table: String,
        filter: String,
    },
    /// A shard's publication that publishes every row of a table, or one whose row filter is
    /// not this shard's (its comment is not the one `init` writes for the shard).
    NotTheShard {
        publication: String,
        table: String,
        shard: Shard,
    },
    /// A partitioned outbox table in a publication that publishes through the partitions:
    /// the relay maps each partition to its table, but a partition detached before its rows
    /// are read is no longer known as one.
    ViaPartitions { publication: String, table: String },
}

impl PublicationProblem {
    /// Whether `run` may stream with it (the relay copes, but the setting is better changed).
    pub fn is_warning(&self) -> bool {
        matches!(self, PublicationProblem::ViaPartitions { .. })
    }
}

impl std::fmt::Display for PublicationProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublicationProblem::Missing { publication } => write!(
                f,
                "publication {publication} does not exist: run `outbox-relay init` (as the tables' owner), or fix source.publication"
            ),
            PublicationProblem::NoInserts { publication } => write!(
                f,
                "publication {publication} does not publish inserts, so no outbox row reaches the relay: \
                 ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate'). Rows committed \
                 while it did not were never sent; publish them another way",
                sql::ident(publication)
            ),
            PublicationProblem::Unpublished { publication, table } => write!(
                f,
                "publication {publication} does not include {table}, so its rows do not reach the relay: \
                 run `outbox-relay init`, or ALTER PUBLICATION {} ADD TABLE {}",
                sql::ident(publication),
                quoted_table(table)
            ),
            PublicationProblem::RowFilter {
                publication,
                table,
                filter,
            } => write!(
                f,
                "publication {publication} filters the rows of {table} (WHERE {filter}), so the rows it \
                 leaves out never reach the relay: ALTER PUBLICATION {} SET TABLE ... with {} and no \
                 WHERE, or give the relay a publication of its own (source.publication). Rows filtered \
                 out so far were never sent; publish them another way",
                sql::ident(publication),
                quoted_table(table)
            ),
            PublicationProblem::NotTheShard {
                publication,
                table,
                shard,
            } => write!(
                f,
                "publication {publication} is not the one `outbox-relay init` creates for shard {} \
                 of {}: it does not filter the rows of {table} by the shard's key hash, so this \
                 relay would publish rows of other shards, or miss its own. Drop it \
                 (DROP PUBLICATION {}) and run `outbox-relay init` with this configuration",
                shard.index,
                shard.count,
                sql::ident(publication)
            ),
            PublicationProblem::ViaPartitions { publication, table } => write!(
                f,
                "{table} is partitioned and publication {publication} publishes its rows under each \
                 partition's name: ALTER PUBLICATION {} SET (publish_via_partition_root = true) \
                 (`outbox-relay init` does it)",
                sql::ident(publication)
            ),
        }
    }
}

/// A configured `schema.table` quoted for SQL (validated by the configuration; anything
/// else is returned as it is, for messages).
pub fn quoted_table(table: &str) -> String {
    match parse_table_name(table) {
        Ok((schema, name)) => sql::qualified(&schema, &name),
        Err(_) => table.to_owned(),
    }
}

/// Everything about `publication` that keeps rows of `tables` (configured `schema.table`
/// names) from the relay. Tables that do not exist are left out: `check` reports them.
///
/// With `shard` (a key-sharded outbox) every table must be filtered, by this shard's filter:
/// the publication's comment says whose its filters are ([`Shard::comment`]).
pub async fn publication_problems(
    client: &impl GenericClient,
    publication: &str,
    tables: &[String],
    shard: Option<Shard>,
) -> anyhow::Result<Vec<PublicationProblem>> {
    // Read through JSON: pubviaroot exists from PostgreSQL 13 on.
    let row = client
        .query_opt(
            "SELECT p.pubinsert, coalesce((to_jsonb(p) ->> 'pubviaroot')::bool, false), \
             obj_description(p.oid, 'pg_publication') \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(db::explain)?;
    let Some(row) = row else {
        return Ok(vec![PublicationProblem::Missing {
            publication: publication.to_owned(),
        }]);
    };
    let (inserts, via_root): (bool, bool) = (row.get(0), row.get(1));
    let comment: Option<String> = row.get(2);
    let the_shards = shard.filter(|shard| comment.as_deref() == Some(shard.comment().as_str()));
    let mut problems = Vec::new();
    if !inserts {
        problems.push(PublicationProblem::NoInserts {
            publication: publication.to_owned(),
        });
    }
    for table in tables {
        let Ok((schema, name)) = parse_table_name(table) else {
            continue;
        };
        // Published when the table or a member of its partition tree is listed (the leaves
        // unless the publication publishes via the root; the tree of a table that is not
        // partitioned is empty). The row filter is read through JSON:
        // pg_publication_tables has it from PostgreSQL 15 on.
        let row = query_giving_way(
            client,
            "WITH t AS (SELECT to_regclass($2) AS oid) \
                 SELECT t.oid IS NOT NULL, \
                   coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = t.oid), false), \
                   EXISTS (SELECT 1 FROM (SELECT t.oid AS relid UNION \
                       SELECT relid FROM pg_partition_tree(t.oid)) tree \
                     JOIN pg_class c ON c.oid = tree.relid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_publication_tables pt ON pt.pubname = $1 \
                       AND pt.schemaname = n.nspname AND pt.tablename = c.relname), \
                   (SELECT to_jsonb(pt) ->> 'rowfilter' FROM pg_publication_tables pt \
                     JOIN pg_class c ON c.oid = t.oid JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE pt.pubname = $1 AND pt.schemaname = n.nspname AND pt.tablename = c.relname) \
                 FROM t",
            &[&publication, &sql::qualified(&schema, &name)],
        )
        .await?;
        let (exists, partitioned, published, filter): (bool, bool, bool, Option<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if !exists {
            continue;
        }
        let named = || (publication.to_owned(), normalized(&schema, &name));
        if !published {
            let (publication, table) = named();
            problems.push(PublicationProblem::Unpublished { publication, table });
            continue;
        }
        match (shard, filter) {
            (Some(shard), filter) if the_shards.is_none() || filter.is_none() => {
                let (publication, table) = named();
                problems.push(PublicationProblem::NotTheShard {
                    publication,
                    table,
                    shard,
                });
            }
            (None, Some(filter)) => {
                let (publication, table) = named();
                problems.push(PublicationProblem::RowFilter {
                    publication,
                    table,
                    filter,
                });
            }
            _ => {}
        }
        if partitioned && !via_root {
            let (publication, table) = named();
            problems.push(PublicationProblem::ViaPartitions { publication, table });
        }
    }
    Ok(problems)
}

/// How long the publication check waits for a lock before it gives way. Reading
/// `pg_publication_tables` opens the published tables (a partition can be locked before its
/// root), so the check could close a deadlock with DDL on the outbox, `CREATE TABLE …
/// PARTITION OF` for one, and PostgreSQL would abort one of the two: it was seen to abort
/// the application's DDL. Waiting less than `deadlock_timeout` (1 s by default), the check
/// is the one that gives way, and tries again a little later.
const GIVE_WAY_AFTER: &str = "200ms";
const GIVE_WAY_ATTEMPTS: u32 = 25;

/// `client.query_one(sql, params)` under [`GIVE_WAY_AFTER`]'s `lock_timeout`, tried again
/// while it times out on a lock; the session's own `lock_timeout` is restored after.
async fn query_giving_way(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> anyhow::Result<tokio_postgres::Row> {
    let set = "SELECT set_config('lock_timeout', $1, false)";
    let previous: String = client
        .query_one("SELECT current_setting('lock_timeout')", &[])
        .await
        .map_err(db::explain)?
        .get(0);
    client
        .execute(set, &[&GIVE_WAY_AFTER])
        .await
        .map_err(db::explain)?;
    let mut attempts = 1;
    let result = loop {
        match client.query_one(sql, params).await {
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                    && attempts < GIVE_WAY_ATTEMPTS =>
            {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    client
        .execute(set, &[&previous])
        .await
        .map_err(db::explain)?;
    result.map_err(db::explain)
}

fn normalized(schema: &str, name: &str) -> String {
    format!("{schema}.{name}")
}

/// A table's schema and name, as the catalog holds them.
pub type TableName = (String, String);

/// The configured outbox tables that exist, by OID: a relation of the stream with one of these
/// OIDs is that outbox table, whatever name it arrives under.
pub async fn outbox_oids(
    client: &impl GenericClient,
    tables: &[String],
) -> anyhow::Result<HashMap<u32, TableName>> {
    let mut oids = HashMap::new();
    for table in tables {
        let Ok((schema, name)) = parse_table_name(table) else {
            continue;
        };
        let oid: Option<u32> = client
            .query_one(
                "SELECT to_regclass($1)::oid",
                &[&sql::qualified(&schema, &name)],
            )
            .await
            .map_err(db::explain)?
            .get(0);
        if let Some(oid) = oid {
            oids.insert(oid, (schema, name));
        }
    }
    Ok(oids)
}

/// What to do about the first configured outbox table that [`outbox_oids`] did not find. The
/// relay does not start while one is missing, so that the rows of a renamed table are not
/// skipped.
pub fn missing_table_problem(tables: &[String], found: &HashMap<u32, TableName>) -> Option<String> {
    let missing = tables.iter().find(|t| {
        parse_table_name(t).is_ok_and(|names| !found.values().any(|known| *known == names))
    })?;
    Some(format!(
        "outbox table {missing} does not exist: if it was renamed, put its new name in \
         source.tables (and its [outbox.\"…\"] mapping); if it was dropped, remove it from \
         source.tables. The relay does not start while a configured table is missing, so \
         that the rows of a renamed table are not skipped"
    ))
}

/// The OID, schema and name of the partitioned table at the root of relation `oid`'s
/// partition tree, if `oid` is a partition that exists now.
pub async fn partition_root(
    client: &impl GenericClient,
    oid: u32,
) -> anyhow::Result<Option<(u32, TableName)>> {
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = pg_partition_root($1::oid::regclass) AND c.oid <> $1::oid",
            &[&oid],
        )
        .await
        .map_err(db::explain)?;
    Ok(row.map(|row| (row.get(0), (row.get(1), row.get(2)))))
}

/// The row filter of shard `shard` for `table`, sharded by its key column `column`: the
/// column's hash by its type's default hash operator class (the extended hash that hash
/// partitioning uses, the same on every platform and version), NULL taken as 0, modulo
/// the shard count, kept non-negative without `abs` (which overflows on the smallest
/// value). A row filter may call only built-in immutable functions and cannot cast through
/// text, so the hash function is looked up for the column's type; a type without a hash
/// class of its own uses one it converts to implicitly without a function, the preferred
/// type first (`varchar` → `text`, as PostgreSQL picks a default operator class), which the
/// filter may do. PostgreSQL refuses user-defined types in a row filter (type OIDs from
/// `FirstNormalObjectId`, 16384: domains, enums, extension types such as `citext`):
/// refused here, with the fix.
pub async fn shard_filter(
    client: &impl GenericClient,
    table: &str,
    column: &str,
    shard: Shard,
) -> anyhow::Result<String> {
    let (schema, name) = parse_table_name(table)?;
    let row = client
        .query_opt(
            "SELECT n.nspname::text, p.proname::text, format_type(a.atttypid, NULL), \
               a.atttypid >= 16384 \
             FROM pg_attribute a \
             LEFT JOIN LATERAL (SELECT oc.opcfamily, oc.opcintype FROM pg_opclass oc \
               WHERE oc.opcdefault \
                 AND oc.opcmethod = (SELECT oid FROM pg_am WHERE amname = 'hash') \
                 AND (oc.opcintype = a.atttypid OR EXISTS (SELECT 1 FROM pg_cast c \
                   WHERE c.castsource = a.atttypid AND c.casttarget = oc.opcintype \
                     AND c.castmethod = 'b' AND c.castcontext = 'i')) \
               ORDER BY oc.opcintype = a.atttypid DESC, \
                 (SELECT typispreferred FROM pg_type WHERE oid = oc.opcintype) DESC, \
                 oc.opcintype LIMIT 1) oc ON true \
             LEFT JOIN pg_amproc ap ON ap.amprocfamily = oc.opcfamily AND ap.amprocnum = 2 \
               AND ap.amproclefttype = oc.opcintype \
             LEFT JOIN pg_proc p ON p.oid = ap.amproc \
             LEFT JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
            &[&sql::qualified(&schema, &name), &column],
        )
        .await
        .map_err(db::explain)?;
    let Some(row) = row else {
        anyhow::bail!(
            "cannot shard {table} by column {column}: the table has no such column (set the \
             outbox mapping's key or aggregate_id column)"
        );
    };
    let (type_name, user_defined): (String, bool) = (row.get(2), row.get(3));
    if user_defined {
        anyhow::bail!(
            "cannot shard {table} by column {column}: its type {type_name} is user-defined \
             (a domain, enum or extension type), and PostgreSQL allows only built-in types in \
             a publication's row filter. Change the column to its base type (text, varchar, \
             uuid, bigint...) or use source.shards = 1"
        );
    }
    let (Some(schema), Some(function)) = (row.get::<_, Option<&str>>(0), row.get(1)) else {
        anyhow::bail!(
            "cannot shard {table} by column {column}: its type {type_name} has no hash \
             operator class (shard by a text, varchar, uuid or integer key column)"
        );
    };
    let function = sql::qualified(schema, function);
    let count = shard.count;
    Ok(format!(
        "((coalesce({function}({}, 0), 0) % {count}) + {count}) % {count} = {}",
        sql::ident(column),
        shard.index
    ))
}
