//! Apache Cassandra on loopback, the CQL server the ScyllaDB backend is tested against (ScyllaDB
//! itself cannot run here; the same driver and contract suite serve both). 1 node for CI, or N
//! nodes on 127.0.0.1, .2, .3, ... (every one reaches `lo`) with the same ports, datacenter
//! [`DATACENTER`] and one rack per zone. Started one after another (Cassandra refuses concurrent
//! joins), each ready when it answers a CQL query; several nodes, once they see each other.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use scylla::client::session_builder::SessionBuilder;

use super::{DataDir, JvmCommand, JvmProcess, free_port, write_file};

/// The datacenter every local node is in (`cassandra-rackdc.properties`).
pub const DATACENTER: &str = "datacenter1";

#[derive(Debug, Clone)]
pub struct CassandraOptions {
    pub nodes: usize,
    /// Rack (zone) of node i is `racks[i % len]`; `rack1` when empty.
    pub racks: Vec<String>,
    pub dir: Option<PathBuf>,
    /// JVM heap per node (`-Xms` = `-Xmx`).
    pub heap: String,
}

impl Default for CassandraOptions {
    fn default() -> Self {
        Self { nodes: 1, racks: Vec::new(), dir: None, heap: "768m".into() }
    }
}

#[derive(Debug)]
struct CassandraNode {
    address: String,
    rack: String,
    command: JvmCommand,
    process: Option<JvmProcess>,
}

/// A Cassandra cluster started by us. Dropping it kills every node.
#[derive(Debug)]
pub struct LocalCassandra {
    nodes: Vec<CassandraNode>,
    /// The CQL port, the same on every node's address.
    pub port: u16,
    dir: DataDir,
}

const LOGBACK: &str = r#"<configuration>
  <appender name="OUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d %-5level [%thread] %logger{0}: %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="OUT"/></root>
  <logger name="org.apache.cassandra.transport" level="INFO"/>
  <logger name="org.apache.cassandra.service.StorageService" level="INFO"/>
</configuration>
"#;

/// Java 17 module flags from Cassandra 5.0's `conf/jvm17-server.options`.
const JVM17: &[&str] = &[
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
];

impl LocalCassandra {
    /// Start the nodes one after another, each ready when it answers a CQL query.
    pub async fn start(opts: CassandraOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(opts.nodes >= 1, "a Cassandra cluster needs at least one node");
        let dir = DataDir::new(opts.dir.clone(), "partita-cassandra-")?;
        let addresses: Vec<String> = (1..=opts.nodes).map(|i| format!("127.0.0.{i}")).collect();
        let (port, storage_port) = free_ports_on(&addresses)?;
        let logback = dir.path().join("logback.xml");
        write_file(&logback, LOGBACK)?;
        let mut nodes = Vec::with_capacity(opts.nodes);
        for (i, address) in addresses.iter().enumerate() {
            let home = dir.path().join(format!("cassandra-{}", i + 1));
            let data = home.join("data");
            let rack = if opts.racks.is_empty() {
                "rack1".to_owned()
            } else {
                opts.racks[i % opts.racks.len()].clone()
            };
            let yaml = home.join("cassandra.yaml");
            write_file(&yaml, &cassandra_yaml(address, port, storage_port, &data))?;
            let rackdc = home.join("cassandra-rackdc.properties");
            write_file(&rackdc, &format!("dc={DATACENTER}\nrack={rack}\n"))?;
            let mut jvm_flags: Vec<String> = vec![
                format!("-Xms{}", opts.heap),
                format!("-Xmx{}", opts.heap),
                "-XX:+UseG1GC".into(),
                "-XX:+ExitOnOutOfMemoryError".into(),
                format!("-Dcassandra.config=file://{}", yaml.display()),
                format!("-Dcassandra.storagedir={}", data.display()),
                format!("-Dcassandra-rackdc.properties=file://{}", rackdc.display()),
                "-Dcassandra-foreground=yes".into(),
                format!("-Dcassandra.logdir={}", home.display()),
                format!("-Dlogback.configurationFile={}", logback.display()),
                "-Dcassandra.skip_wait_for_gossip_to_settle=0".into(),
                // A seed waits ring_delay (30 s) before it takes its tokens: nothing to wait for here.
                "-Dcassandra.ring_delay_ms=1000".into(),
            ];
            jvm_flags.extend(JVM17.iter().map(|s| (*s).to_owned()));
            let command = JvmCommand {
                jars: "cassandra",
                main_class: "org.apache.cassandra.service.CassandraDaemon",
                jvm_flags,
                args: Vec::new(),
                log: dir.path().join(format!("cassandra-{}.log", i + 1)),
            };
            nodes.push(CassandraNode { address: address.clone(), rack, command, process: None });
        }
        let mut cluster = Self { nodes, port, dir };
        for i in 0..cluster.nodes.len() {
            cluster.start_node(i).await?;
        }
        if cluster.nodes.len() > 1 {
            cluster.wait_settled(Duration::from_secs(120)).await?;
        }
        Ok(cluster)
    }

    /// Several nodes answering CQL may not see each other yet (gossip): a coordinator that does
    /// not know a peer's datacenter leaves it out of the replicas, and LOCAL_QUORUM fails. Wait
    /// until every node, asked directly, lists every other node in `system.peers` with its
    /// datacenter, and coordinates a write at consistency ALL to a keyspace replicated on all.
    async fn wait_settled(&self, within: Duration) -> anyhow::Result<()> {
        use scylla::policies::host_filter::AllowListHostFilter;
        use scylla::statement::unprepared::Statement;
        let n = self.nodes.len();
        let deadline = Instant::now() + within;
        let setup = SessionBuilder::new().known_nodes(self.contact_points()).build().await?;
        setup
            .query_unpaged(
                format!(
                    "CREATE KEYSPACE IF NOT EXISTS partita_local_settle WITH replication = \
                     {{'class': 'NetworkTopologyStrategy', '{DATACENTER}': {n}}}"
                ),
                &[],
            )
            .await?;
        setup
            .query_unpaged("CREATE TABLE IF NOT EXISTS partita_local_settle.probe (k int PRIMARY KEY)", &[])
            .await?;
        setup.await_schema_agreement().await?;
        let mut insert = Statement::new("INSERT INTO partita_local_settle.probe (k) VALUES (?)");
        insert.set_consistency(scylla::statement::Consistency::All);
        for contact in self.contact_points() {
            let only = AllowListHostFilter::new([contact.as_str()])?;
            let session = SessionBuilder::new()
                .known_node(&contact)
                .host_filter(std::sync::Arc::new(only))
                .build()
                .await?;
            loop {
                let peers = session
                    .query_unpaged("SELECT peer, data_center FROM system.peers", &[])
                    .await?
                    .into_rows_result()?
                    .rows::<(std::net::IpAddr, Option<String>)>()?
                    .filter(|r| r.as_ref().is_ok_and(|(_, dc)| dc.as_deref() == Some(DATACENTER)))
                    .count();
                let wrote = peers == n - 1 && session.query_unpaged(insert.clone(), (1,)).await.is_ok();
                if wrote {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("Cassandra on {contact} sees {peers} of {} peers within {within:?}", n - 1);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }

    async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        node.process = Some(node.command.spawn()?);
        let contact = format!("{}:{}", node.address, self.port);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(p) = &mut self.nodes[i].process {
                p.check_running(&format!("Cassandra node {contact}"))?;
            }
            if answers(&contact).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Cassandra on {contact} did not answer CQL within 180 s; logs in {}",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `host:port` of every node, for the driver's contact points.
    pub fn contact_points(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("{}:{}", n.address, self.port)).collect()
    }

    /// The contact points as one URI (`host:port,host:port`), as `[state] cql_uri` takes them.
    pub fn uri(&self) -> String {
        self.contact_points().join(",")
    }

    /// (address, rack, pid) of each node; pid `None` while stopped.
    pub fn describe(&self) -> Vec<(String, String, Option<u32>)> {
        self.nodes
            .iter()
            .map(|n| (n.address.clone(), n.rack.clone(), n.process.as_ref().map(JvmProcess::pid)))
            .collect()
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill();
        }
    }

    /// Start node `i` again on its data and wait until it answers CQL.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.start_node(i).await
    }

    /// SIGTERM every node at once, SIGKILL after 20 s.
    pub async fn stop(mut self) {
        let _ = tokio::task::spawn_blocking(move || {
            JvmProcess::stop_all(
                self.nodes.iter_mut().filter_map(|n| n.process.as_mut()),
                Duration::from_secs(20),
            );
        })
        .await;
    }
}

/// Does a CQL query answer on `contact`? (A plain connect first: the driver logs every refused
/// attempt as an error while the server boots.)
async fn answers(contact: &str) -> bool {
    if tokio::net::TcpStream::connect(contact).await.is_err() {
        return false;
    }
    let Ok(Ok(session)) =
        tokio::time::timeout(Duration::from_secs(5), SessionBuilder::new().known_node(contact).build()).await
    else {
        return false;
    };
    session.query_unpaged("SELECT release_version FROM system.local", &[]).await.is_ok()
}

/// A CQL port and a storage port free on every address.
fn free_ports_on(addresses: &[String]) -> anyhow::Result<(u16, u16)> {
    let free_everywhere =
        |port: u16| addresses.iter().all(|a| std::net::TcpListener::bind((a.as_str(), port)).is_ok());
    for _ in 0..20 {
        let (a, b) = (free_port()?, free_port()?);
        if a != b && free_everywhere(a) && free_everywhere(b) {
            return Ok((a, b));
        }
    }
    bail!("no free ports on {addresses:?}")
}

fn cassandra_yaml(address: &str, port: u16, storage_port: u16, data: &std::path::Path) -> String {
    let d = data.display();
    format!(
        "cluster_name: partita-local
num_tokens: 8
allocate_tokens_for_local_replication_factor: 3
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
commitlog_sync: periodic
commitlog_sync_period: 10000ms
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: \"127.0.0.1:{storage_port}\"
listen_address: {address}
rpc_address: {address}
storage_port: {storage_port}
native_transport_port: {port}
endpoint_snitch: GossipingPropertyFileSnitch
auto_bootstrap: false
auto_snapshot: false
data_file_directories: [{d}/data]
commitlog_directory: {d}/commitlog
saved_caches_directory: {d}/saved_caches
hints_directory: {d}/hints
cdc_raw_directory: {d}/cdc_raw
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 2
concurrent_materialized_view_writes: 2
memtable_flush_writers: 1
compaction_throughput: 0MiB/s
"
    )
}
