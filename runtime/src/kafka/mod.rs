//! The rdkafka adapter: client settings per Kafka tier (here), the producer behind
//! [`PartitionSink`] ([`sink`]), and the consumer thread that owns the group membership and feeds
//! partition actors ([`consumer`]).

pub mod consumer;
pub mod sink;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

pub use consumer::{ConsumerHandle, ConsumerSettings, NodeContext, SlotState, Wiring, start_consumer};
pub use sink::KafkaSink;

/// One Kafka cluster: where it is and any extra librdkafka settings (`security.protocol`, ...).
#[derive(Debug, Clone, Default)]
pub struct KafkaTier {
    pub bootstrap: String,
    /// librdkafka properties applied last (they win over partita's defaults).
    pub properties: Vec<(String, String)>,
}

impl KafkaTier {
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self { bootstrap: bootstrap.into(), properties: Vec::new() }
    }

    /// A client config with `defaults`, then this tier's own properties.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = client_config(&self.bootstrap);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// The idempotent, `acks=all` producer partita writes outputs with.
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        self.client_config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "1"),
            ("message.timeout.ms", "30000"),
        ])
        .create()
        .with_context(|| format!("creating a producer for {}", self.bootstrap))
    }
}

/// Warn when an output topic's `min.insync.replicas` is below 2: with `acks=all` an acknowledged
/// output then lives on one replica, and that broker's loss loses it. A topic that cannot be
/// described is logged too (the node still starts: the produce path reports real failures).
pub async fn warn_on_weak_durability(tier: &KafkaTier, topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let Ok(admin) = tier.client_config(&[]).create::<AdminClient<DefaultClientContext>>() else { return };
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    for topic in topics {
        let described = admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts).await;
        let min_isr = match &described {
            Ok(results) => results
                .iter()
                .flatten()
                .find_map(|r| r.get("min.insync.replicas"))
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse::<u32>().ok()),
            Err(_) => None,
        };
        match min_isr {
            Some(n) if n >= 2 => {}
            Some(n) => tracing::warn!(
                topic,
                min_insync_replicas = n,
                "output topic has min.insync.replicas < 2: an acknowledged output (acks=all) may live on one broker only"
            ),
            None => tracing::warn!(topic, ?described, "cannot read the output topic's min.insync.replicas"),
        }
    }
}

/// The base settings of every partita Kafka client: the bootstrap servers and
/// `socket.nagle.disable` (small requests must not wait for Nagle's algorithm on a 50 ms budget).
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap).set("socket.nagle.disable", "true");
    c
}

/// The low and high watermarks of `topic`/`partition`, asking again for up to `within` while the
/// partition has no leader yet or its leader does not know it leads (a topic a moment after its
/// creation answers `NotLeaderForPartition` or `LeaderNotAvailable` for a while).
pub fn watermarks<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    within: Duration,
) -> anyhow::Result<(i64, i64)> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.fetch_watermarks(topic, partition, left.max(Duration::from_millis(100))) {
            Ok(w) => return Ok(w),
            Err(e) if Instant::now() < deadline && leader_not_ready(&e) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => return Err(e).with_context(|| format!("watermarks of {topic}/{partition}")),
        }
    }
}

fn leader_not_ready(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
                // The client's own metadata does not list the new partition yet.
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

/// Record headers as rdkafka takes them.
pub fn owned_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(OwnedHeaders::new_with_capacity(headers.len()), |h, (k, v)| {
        h.insert(Header { key: k, value: Some(v) })
    })
}

/// Parse `KEY=VALUE` (librdkafka property flags).
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}
