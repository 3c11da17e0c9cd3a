//! The operator commands beside `run`, one file each: `init` creates what the relay needs,
//! `check` finds every problem with the configuration and the database (one line each, with
//! the fix) and warnings that do not fail it, `status` judges the slot (lag, activity,
//! invalidation) and shows the leader and checkpoints, `dlq` lists, shows and purges dead
//! letters, and `replay` publishes them again.

mod check;
mod dlq;
mod init;
mod replay;
mod status;

pub use check::{check, CheckReport};
pub use dlq::{dlq_list, dlq_purge, dlq_show, Selection};
pub use init::init;
pub use replay::{dlq_replay, ReplayReport};
pub use status::{status, Status, StatusOptions};

use crate::config::{Config, ConnectParams};
use crate::source::replication::{ReplicationConnection, SystemInfo};
use crate::sql;

/// One of the relay's own tables, quoted for SQL.
pub(crate) fn relay_table(config: &Config, name: &str) -> String {
    sql::qualified(&config.relay.schema, name)
}

/// What the server says of itself over a replication connection: its system identifier and
/// timeline, as `run` sees them.
pub(crate) async fn identify(params: &ConnectParams) -> anyhow::Result<SystemInfo> {
    let mut connection = ReplicationConnection::connect(params).await?;
    Ok(connection.identify_system().await?)
}
