//! The ScyllaDB state backend (cluster mode). Schema and query design: `docs/state.md`.
//!
//! One CQL partition per Kafka partition: the keys' states are its clustering rows and the
//! partition's applied offset and epoch are **static columns** of it. That puts state and offset
//! in one CQL partition, so a conditional (LWT) batch writes both atomically and checks the epoch
//! fence in the same Paxos round. Reads and writes use `LOCAL_QUORUM` (`LOCAL_SERIAL` for the
//! fence); the driver routes token-aware to replicas, preferring the node's own zone (rack).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use partita_actors::state::{
    Epoch, Offset, PartitionId, PartitionMeta, StateStore, StateValue, StateWrite, StoreError,
};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::frame::types::{Consistency, SerialConsistency};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::{DefaultRetryPolicy, FallthroughRetryPolicy, RetryPolicy};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

/// Clustering-key restrictions per `IN` query (Scylla's default limit is 100).
const READ_CHUNK: usize = 100;

/// `[state] cql_consistency`: reads and writes at this level; the epoch fence's Paxos round at
/// `LOCAL_SERIAL` for `local_quorum`, `SERIAL` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum CqlConsistency {
    /// A quorum of the replicas in the node's datacenter (survives a zone with RF 3 over 3 zones).
    LocalQuorum,
    /// A quorum of all replicas, in every datacenter together.
    Quorum,
    /// A quorum in each datacenter.
    EachQuorum,
    /// Every replica.
    All,
}

impl CqlConsistency {
    /// (writes, reads, the serial level of the Paxos phase and fence reads). EACH_QUORUM is a
    /// write-only level on Cassandra and ScyllaDB: reads take QUORUM then.
    fn levels(self) -> (Consistency, Consistency, SerialConsistency) {
        match self {
            Self::LocalQuorum => {
                (Consistency::LocalQuorum, Consistency::LocalQuorum, SerialConsistency::LocalSerial)
            }
            Self::Quorum => (Consistency::Quorum, Consistency::Quorum, SerialConsistency::Serial),
            Self::EachQuorum => (Consistency::EachQuorum, Consistency::Quorum, SerialConsistency::Serial),
            Self::All => (Consistency::All, Consistency::All, SerialConsistency::Serial),
        }
    }
}

/// `DC=RF[,DC=RF...]`: a keyspace's replication per datacenter (NetworkTopologyStrategy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication(pub BTreeMap<String, u32>);

impl Replication {
    /// Parse `DC=RF[,DC=RF...]` (a clap value parser).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (dc, rf) = part.split_once('=').ok_or_else(|| format!("expected DC=RF, got {part:?}"))?;
            let rf: u32 =
                rf.trim().parse().map_err(|_| format!("replication factor of {dc:?} is not a number"))?;
            if dc.trim().is_empty() || rf == 0 {
                return Err(format!("expected DC=RF with a name and RF >= 1, got {part:?}"));
            }
            map.insert(dc.trim().to_owned(), rf);
        }
        if map.is_empty() {
            return Err("expected at least one DC=RF".into());
        }
        Ok(Self(map))
    }
}

/// Which CQL server the session talks to: the schema's compaction strategy differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Scylla,
    Cassandra,
}

#[derive(Debug, Clone)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replication per datacenter (NetworkTopologyStrategy). Zones are racks inside a datacenter:
    /// with RF 3 over 3 zones Scylla puts one replica in each, and LOCAL_QUORUM survives a zone.
    pub replication: BTreeMap<String, u32>,
    /// The node's datacenter and zone (rack): preferred for routing.
    pub datacenter: Option<String>,
    pub zone: Option<String>,
    pub consistency: CqlConsistency,
    pub request_timeout: Duration,
    /// Retry idempotent requests on timeouts and unavailable replicas (the driver's default
    /// policy); off = fail at once and let the partition actor back off.
    pub retries: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl ScyllaConfig {
    /// Defaults for one node URI, e.g. `127.0.0.1:9042`.
    pub fn new(uri: &str) -> Self {
        Self {
            nodes: uri.split(',').map(|s| s.trim().trim_start_matches("scylla://").to_owned()).collect(),
            keyspace: "partita".into(),
            replication: BTreeMap::from([("datacenter1".to_owned(), 3)]),
            datacenter: None,
            zone: None,
            consistency: CqlConsistency::LocalQuorum,
            request_timeout: Duration::from_secs(2),
            retries: true,
            username: None,
            password: None,
        }
    }

    /// The schema for ScyllaDB, as CQL statements, in the order to run them.
    pub fn schema(&self) -> Vec<String> {
        self.schema_for(Flavor::Scylla)
    }

    /// The schema for `flavor`: ScyllaDB's incremental compaction, or Cassandra 5's unified one
    /// (Cassandra has no `IncrementalCompactionStrategy`).
    pub fn schema_for(&self, flavor: Flavor) -> Vec<String> {
        let compaction = match flavor {
            Flavor::Scylla => "IncrementalCompactionStrategy",
            Flavor::Cassandra => "UnifiedCompactionStrategy",
        };
        let replication: Vec<String> =
            self.replication.iter().map(|(dc, rf)| format!("'{dc}': {rf}")).collect();
        let ks = &self.keyspace;
        vec![
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                 {{'class': 'NetworkTopologyStrategy', {}}}",
                replication.join(", ")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.state (\
                 partition int, \
                 key blob, \
                 value blob, \
                 applied_offset bigint STATIC, \
                 epoch bigint STATIC, \
                 PRIMARY KEY ((partition), key)\
                 ) WITH compaction = {{'class': '{compaction}'}}"
            ),
        ]
    }
}

struct Statements {
    read: PreparedStatement,
    meta: PreparedStatement,
    meta_serial: PreparedStatement,
    /// `UPDATE ... SET applied_offset ... IF epoch = ? AND applied_offset <= ?`: the fence (the
    /// exact owner, never backwards), first in every write batch.
    fence_write: PreparedStatement,
    put: PreparedStatement,
    claim: PreparedStatement,
    /// Creates the static row of a partition never seen (a conditional UPDATE on a missing
    /// static row does not apply).
    init: PreparedStatement,
    /// Gives an older version's null `applied_offset` the "nothing applied" value.
    unset: PreparedStatement,
}

/// The stored `applied_offset` of a partition that applied nothing yet.
const NOTHING_APPLIED: i64 = -1;

#[derive(Clone)]
pub struct ScyllaStore {
    session: Arc<Session>,
    st: Arc<Statements>,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { detail: e.to_string() }
}

fn epoch_i64(e: Epoch) -> i64 {
    i64::try_from(e.0).unwrap_or(i64::MAX)
}

impl ScyllaStore {
    /// Connect, create the schema if missing, prepare the statements.
    pub async fn connect(config: &ScyllaConfig) -> Result<Self, StoreError> {
        let mut policy = DefaultPolicy::builder().token_aware(true);
        policy = match (&config.datacenter, &config.zone) {
            (Some(dc), Some(zone)) => policy.prefer_datacenter_and_rack(dc.clone(), zone.clone()),
            (Some(dc), None) => policy.prefer_datacenter(dc.clone()),
            _ => policy,
        };
        let retry: Arc<dyn RetryPolicy> = if config.retries {
            Arc::new(DefaultRetryPolicy::new())
        } else {
            Arc::new(FallthroughRetryPolicy::new())
        };
        let (consistency, read_consistency, serial) = config.consistency.levels();
        let profile = ExecutionProfile::builder()
            .load_balancing_policy(policy.build())
            .consistency(consistency)
            .serial_consistency(Some(serial))
            .request_timeout(Some(config.request_timeout))
            .retry_policy(retry)
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .default_execution_profile_handle(profile.into_handle());
        if let (Some(u), Some(p)) = (&config.username, &config.password) {
            builder = builder.user(u, p);
        }
        let session = builder
            .build()
            .await
            .map_err(|e| unavailable(format!("connecting to {:?}: {e}", config.nodes)))?;
        let flavor = flavor(&session).await?;
        for stmt in config.schema_for(flavor) {
            session
                .query_unpaged(stmt, &[])
                .await
                .map_err(|e| unavailable(format!("creating schema: {e}")))?;
        }
        session.await_schema_agreement().await.map_err(unavailable)?;
        let ks = &config.keyspace;
        let prepare = |cql: String| {
            let session = &session;
            async move { session.prepare(cql).await.map_err(|e| unavailable(format!("preparing statement: {e}"))) }
        };
        let mut read =
            prepare(format!("SELECT key, value FROM {ks}.state WHERE partition = ? AND key IN ?")).await?;
        read.set_is_idempotent(true);
        read.set_consistency(read_consistency);
        let mut meta =
            prepare(format!("SELECT applied_offset, epoch FROM {ks}.state WHERE partition = ? LIMIT 1"))
                .await?;
        meta.set_is_idempotent(true);
        meta.set_consistency(read_consistency);
        let mut meta_serial = meta.clone();
        meta_serial.set_consistency(match serial {
            SerialConsistency::LocalSerial => Consistency::LocalSerial,
            SerialConsistency::Serial => Consistency::Serial,
        });
        let fence_write = prepare(format!(
            "UPDATE {ks}.state SET applied_offset = ? WHERE partition = ? IF epoch = ? AND applied_offset <= ?"
        ))
        .await?;
        let put = prepare(format!("INSERT INTO {ks}.state (partition, key, value) VALUES (?, ?, ?)")).await?;
        let claim =
            prepare(format!("UPDATE {ks}.state SET epoch = ? WHERE partition = ? IF epoch < ?")).await?;
        // A partition's static row starts with applied_offset -1 ("nothing applied"), so the
        // write's `applied_offset <= ?` condition holds; rows of older versions hold null there and
        // get -1 on their first write (`unset`).
        let init = prepare(format!(
            "INSERT INTO {ks}.state (partition, epoch, applied_offset) VALUES (?, 0, {NOTHING_APPLIED}) IF NOT EXISTS"
        ))
        .await?;
        let unset = prepare(format!(
            "UPDATE {ks}.state SET applied_offset = {NOTHING_APPLIED} WHERE partition = ? IF applied_offset = null"
        ))
        .await?;
        let st = Statements { read, meta, meta_serial, fence_write, put, claim, init, unset };
        Ok(Self { session: Arc::new(session), st: Arc::new(st) })
    }

    async fn meta_with(
        &self,
        stmt: &PreparedStatement,
        p: PartitionId,
    ) -> Result<Option<PartitionMeta>, StoreError> {
        let result = self.session.execute_unpaged(stmt, (p.0 as i32,)).await.map_err(unavailable)?;
        let rows = result.into_rows_result().map_err(unavailable)?;
        let row = rows.maybe_first_row::<(Option<i64>, Option<i64>)>().map_err(unavailable)?;
        Ok(row.and_then(|(offset, epoch)| {
            epoch.map(|e| PartitionMeta {
                applied_offset: offset.filter(|o| *o != NOTHING_APPLIED).map(Offset),
                epoch: Epoch(e.max(0) as u64),
            })
        }))
    }

    /// Was a conditional statement or batch applied? `[applied]` is the first column of the first
    /// row on both servers: ScyllaDB answers a conditional batch with one row per statement (all
    /// with the same `[applied]`: a batch applies as a whole), Cassandra with a single row.
    fn applied(result: scylla::response::query_result::QueryResult) -> Result<bool, StoreError> {
        let rows = result.into_rows_result().map_err(unavailable)?;
        let row = rows.first_row::<Row>().map_err(unavailable)?;
        match row.columns.first() {
            Some(Some(CqlValue::Boolean(b))) => Ok(*b),
            other => Err(unavailable(format!("LWT result without [applied]: {other:?}"))),
        }
    }

    /// After a conditional claim (`IF epoch < e`, `write` unset) or write (`IF epoch = e AND
    /// applied_offset <= o`) did not apply: fenced (for a claim a stored epoch at or above it, for
    /// a write any other epoch), an offset that would move backwards (corrupt: a bug), or a
    /// partition row to prepare first (none yet, or an older version's null offset); then the
    /// caller retries.
    async fn not_applied(
        &self,
        p: PartitionId,
        epoch: Epoch,
        write: Option<Offset>,
    ) -> Result<(), StoreError> {
        let Some(m) = self.meta_with(&self.st.meta_serial, p).await? else {
            self.session.execute_unpaged(&self.st.init, (p.0 as i32,)).await.map_err(unavailable)?;
            return Ok(());
        };
        let fenced = StoreError::Fenced { partition: p, epoch, current: m.epoch };
        let Some(offset) = write else {
            return if m.epoch >= epoch { Err(fenced) } else { Ok(()) }; // raced: retry
        };
        if m.epoch != epoch {
            return Err(fenced);
        }
        match m.applied_offset {
            Some(applied) if applied > offset => Err(StoreError::Corrupt {
                detail: format!(
                    "partition {p}: a write would move the applied offset back from {} to {}",
                    applied.0, offset.0
                ),
            }),
            // Null (an older version's row) or nothing applied yet: make it -1 and retry.
            None => {
                self.session.execute_unpaged(&self.st.unset, (p.0 as i32,)).await.map_err(unavailable)?;
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }
}

/// ScyllaDB has the table `system.scylla_local`; Cassandra rejects the query as invalid (the
/// table does not exist). Any other error is an error.
async fn flavor(session: &Session) -> Result<Flavor, StoreError> {
    use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
    match session.query_unpaged("SELECT key FROM system.scylla_local LIMIT 1", &[]).await {
        Ok(_) => Ok(Flavor::Scylla),
        Err(ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::Invalid, _))) => {
            Ok(Flavor::Cassandra)
        }
        Err(e) => Err(unavailable(format!("asking the server's flavor: {e}"))),
    }
}

impl StateStore for ScyllaStore {
    async fn read(
        &self,
        partition: PartitionId,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<StateValue>>, StoreError> {
        let mut found: std::collections::HashMap<Vec<u8>, StateValue> = std::collections::HashMap::new();
        for chunk in keys.chunks(READ_CHUNK) {
            let result = self
                .session
                .execute_unpaged(&self.st.read, (partition.0 as i32, chunk.to_vec()))
                .await
                .map_err(unavailable)?;
            let rows = result.into_rows_result().map_err(unavailable)?;
            for row in rows.rows::<(Vec<u8>, Option<Vec<u8>>)>().map_err(unavailable)? {
                let (key, value) = row.map_err(unavailable)?;
                if let Some(v) = value {
                    found.insert(key, StateValue::decode(&v)?);
                }
            }
        }
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn write(&self, write: StateWrite) -> Result<(), StoreError> {
        let p = write.partition.0 as i32;
        let epoch = epoch_i64(write.epoch);
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.st.fence_write.clone());
        let mut values: Vec<Vec<CqlValue>> = Vec::with_capacity(1 + write.entries.len());
        values.push(vec![
            CqlValue::BigInt(write.applied_offset.0),
            CqlValue::Int(p),
            CqlValue::BigInt(epoch),
            CqlValue::BigInt(write.applied_offset.0),
        ]);
        for (k, v) in &write.entries {
            batch.append_statement(self.st.put.clone());
            values.push(vec![CqlValue::Int(p), CqlValue::Blob(k.clone()), CqlValue::Blob(v.encode())]);
        }
        // Two tries: the second one only after creating a never-seen partition's static row.
        for _ in 0..2 {
            let result = self.session.batch(&batch, &values).await.map_err(unavailable)?;
            if Self::applied(result)? {
                return Ok(());
            }
            self.not_applied(write.partition, write.epoch, Some(write.applied_offset)).await?;
        }
        Err(unavailable(format!("partition {}: conditional write kept losing races", write.partition)))
    }

    async fn meta(&self, partition: PartitionId) -> Result<PartitionMeta, StoreError> {
        Ok(self.meta_with(&self.st.meta, partition).await?.unwrap_or_default())
    }

    async fn claim(&self, partition: PartitionId, epoch: Epoch) -> Result<PartitionMeta, StoreError> {
        let e = epoch_i64(epoch);
        for _ in 0..2 {
            let result = self
                .session
                .execute_unpaged(&self.st.claim, (e, partition.0 as i32, e))
                .await
                .map_err(unavailable)?;
            if Self::applied(result)? {
                let meta = self.meta_with(&self.st.meta_serial, partition).await?.unwrap_or_default();
                return Ok(PartitionMeta { epoch, ..meta });
            }
            self.not_applied(partition, epoch, None).await?;
        }
        Err(unavailable(format!("partition {partition}: claim kept losing races")))
    }
}
