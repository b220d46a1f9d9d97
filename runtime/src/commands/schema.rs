//! `partita schema`: print the ScyllaDB schema, or create it on a cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;

use crate::state::scylla::{Replication, ScyllaConfig, ScyllaStore};

#[derive(Debug, Clone, Args)]
pub struct SchemaArgs {
    /// ScyllaDB contact points (`host:port`, comma-separated). Without it the CQL is only printed.
    #[arg(long, env = "PARTITA_SCYLLA_URI")]
    pub uri: Option<String>,
    #[arg(long, default_value = "partita")]
    pub keyspace: String,
    /// Replication per datacenter, `DC=RF[,DC=RF...]` (repeatable). Zones are racks inside a
    /// datacenter.
    #[arg(long = "replication", value_parser = Replication::parse, default_value = "datacenter1=3")]
    pub replication: Vec<Replication>,
    /// CQL user (with `--password`), as the nodes' `[state] cql_username`.
    #[arg(long, env = "PARTITA_STATE__CQL_USERNAME", requires = "password")]
    pub username: Option<String>,
    #[arg(long, env = "PARTITA_STATE__CQL_PASSWORD", hide_env_values = true, requires = "username")]
    pub password: Option<String>,
    /// Connect and create the keyspace and tables (idempotent).
    #[arg(long, requires = "uri")]
    pub apply: bool,
}

impl SchemaArgs {
    pub fn config(&self) -> ScyllaConfig {
        let mut c = ScyllaConfig::new(self.uri.as_deref().unwrap_or("127.0.0.1:9042"));
        c.keyspace = self.keyspace.clone();
        c.replication = self.replication.iter().flat_map(|r| r.0.clone()).collect::<BTreeMap<_, _>>();
        c.request_timeout = Duration::from_secs(10);
        c.username = self.username.clone();
        c.password = self.password.clone();
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
