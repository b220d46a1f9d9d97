//! `partita schema`: print the ScyllaDB schema, or create it on a cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;

use crate::state::scylla::{ScyllaConfig, ScyllaStore};

#[derive(Debug, Clone, Args)]
pub struct SchemaArgs {
    /// ScyllaDB contact points (`host:port`, comma-separated). Without it the CQL is only printed.
    #[arg(long, env = "PARTITA_SCYLLA_URI")]
    pub uri: Option<String>,
    #[arg(long, default_value = "partita")]
    pub keyspace: String,
    /// Replication per datacenter, `DC=RF` (repeatable). Zones are racks inside a datacenter.
    #[arg(long = "replication", value_parser = parse_replication, default_value = "datacenter1=3")]
    pub replication: Vec<(String, u32)>,
    /// Connect and create the keyspace and tables (idempotent).
    #[arg(long, requires = "uri")]
    pub apply: bool,
}

fn parse_replication(s: &str) -> Result<(String, u32), String> {
    let (dc, rf) = s.split_once('=').ok_or_else(|| format!("expected DC=RF, got {s:?}"))?;
    let rf: u32 = rf.parse().map_err(|_| format!("replication factor {rf:?} is not a number"))?;
    if dc.is_empty() || rf == 0 {
        return Err(format!("invalid replication {s:?}"));
    }
    Ok((dc.to_owned(), rf))
}

impl SchemaArgs {
    pub fn config(&self) -> ScyllaConfig {
        let mut c = ScyllaConfig::new(self.uri.as_deref().unwrap_or("127.0.0.1:9042"));
        c.keyspace = self.keyspace.clone();
        c.replication = self.replication.iter().cloned().collect::<BTreeMap<_, _>>();
        c.request_timeout = Duration::from_secs(10);
        c
    }
}

pub async fn run(args: &SchemaArgs) -> anyhow::Result<()> {
    let config = args.config();
    for stmt in config.schema() {
        println!("{stmt};");
    }
    if args.apply {
        ScyllaStore::connect(&config).await?;
        eprintln!("schema applied on {}", config.nodes.join(","));
    }
    Ok(())
}
