//! A local Kafka-protocol broker (nisshi) as a child process on loopback, for `partita demo`,
//! tests and benchmarks, and topic creation through the Kafka admin API (works on any broker).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer};

/// The nisshi binary: `$PARTITA_NISSHI_BIN`, else `nisshi` on `PATH`.
pub fn nisshi_binary() -> PathBuf {
    std::env::var_os("PARTITA_NISSHI_BIN").map_or_else(|| PathBuf::from("nisshi"), PathBuf::from)
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A nisshi broker started by us; stopped (SIGKILL) when dropped.
#[derive(Debug)]
pub struct LocalBroker {
    child: tokio::process::Child,
    pub bootstrap: String,
}

impl LocalBroker {
    /// Start nisshi on a free loopback port with `storage` (`memory://nisshi/` or
    /// `sqlite://FILE`) and wait until it answers metadata requests.
    pub async fn start(storage: &str) -> anyhow::Result<Self> {
        let port = free_port().context("finding a free port")?;
        let bootstrap = format!("127.0.0.1:{port}");
        let bin = nisshi_binary();
        let child = tokio::process::Command::new(&bin)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--storage-engine", storage])
            .args(["--group-initial-rebalance-delay", "0s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting the broker {} (run scripts/setup.sh, or set PARTITA_NISSHI_BIN)",
                    bin.display()
                )
            })?;
        let mut broker = Self { child, bootstrap };
        broker.wait_ready(Duration::from_secs(20)).await?;
        Ok(broker)
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the broker exited at start ({status})");
            }
            let bootstrap = self.bootstrap.clone();
            let up = tokio::task::spawn_blocking(move || {
                let p: BaseProducer = crate::kafka::client_config(&bootstrap).create().ok()?;
                p.client().fetch_metadata(None, Duration::from_millis(500)).ok()
            })
            .await?;
            if up.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the broker on {} did not answer within {within:?}", self.bootstrap);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stop the broker and wait for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Create `topics` (name, partitions) with replication 1; existing topics are left as they are.
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        crate::kafka::client_config(bootstrap).create().context("creating an admin client")?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await.context("creating topics")? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, e)) => bail!("creating topic {name}: {e}"),
        }
    }
    Ok(())
}
