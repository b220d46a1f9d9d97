//! Layered configuration of `partita node`: a TOML file (every default is in
//! `config/partita.toml`), then environment variables `PARTITA_<SECTION>__<KEY>`, then command-line
//! flags; the later layer wins. Unknown sections and keys are errors; durations (`"2s"`) and
//! sizes (`"256MiB"`) carry units.
//!
//! Every setting is a flag of `partita node`, so the layers are merged into one argument list and
//! parsed once by clap: one parser, one set of defaults, one place that checks values. Each file
//! or environment entry is also parsed on its own first, so `partita check-config` reports every
//! bad entry at once, each with where it came from.

use std::ffi::OsString;
use std::path::Path;

use clap::Parser;

use crate::node::NodeOptions;

/// One setting: its place in the file / environment and the flag it sets.
#[derive(Debug, Clone, Copy)]
struct Setting {
    section: &'static str,
    key: &'static str,
    flag: &'static str,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `--flag VALUE`, once.
    Value,
    /// A TOML table of librdkafka properties: `--flag K=V` per entry (env: `K=V,K=V`).
    Properties,
    /// `true` adds the bare flag.
    Switch,
}

const fn s(section: &'static str, key: &'static str, flag: &'static str) -> Setting {
    Setting { section, key, flag, kind: Kind::Value }
}

const SETTINGS: &[Setting] = &[
    s("ingestion", "bootstrap", "--ingestion-bootstrap"),
    Setting { section: "ingestion", key: "properties", flag: "--ingestion-property", kind: Kind::Properties },
    s("processing", "bootstrap", "--processing-bootstrap"),
    Setting {
        section: "processing",
        key: "properties",
        flag: "--processing-property",
        kind: Kind::Properties,
    },
    s("topics", "input", "--input-topic"),
    s("topics", "input_partitions", "--input-partitions"),
    s("topics", "scores", "--scores-topic"),
    s("topics", "dead_letters", "--dlq-topic"),
    s("group", "id", "--group"),
    s("group", "zone", "--zone"),
    s("group", "instance_id", "--instance-id"),
    s("group", "session_timeout", "--session-timeout"),
    s("state", "dir", "--state-dir"),
    s("state", "cache_size", "--cache-size"),
    s("state", "sync_wal", "--sync-wal"),
    s("state", "write_window", "--write-window"),
    s("state", "backend", "--state-backend"),
    s("state", "changelog_topic", "--changelog-topic"),
    s("state", "standby_replicas", "--standby-replicas"),
    s("state", "cql_uri", "--cql-uri"),
    s("state", "cql_keyspace", "--cql-keyspace"),
    s("state", "cql_datacenter", "--cql-datacenter"),
    s("state", "cql_replication", "--cql-replication"),
    s("state", "cql_consistency", "--cql-consistency"),
    s("state", "cql_username", "--cql-username"),
    s("state", "cql_password", "--cql-password"),
    s("partition", "max_batch", "--max-batch"),
    s("partition", "max_waves", "--max-waves"),
    s("partition", "max_pending_batches", "--max-pending-batches"),
    s("partition", "queue", "--partition-queue"),
    s("partition", "queue_bytes", "--partition-queue-bytes"),
    s("partition", "infer_deadline", "--infer-deadline"),
    s("partition", "max_sequence_gap", "--max-sequence-gap"),
    s("partition", "restarts", "--partition-restarts"),
    s("partition", "restart_window", "--partition-restart-window"),
    s("partition", "frozen_deadlines", "--frozen-deadlines"),
    s("partition", "max_value_size", "--max-value-size"),
    s("partition", "max_key_size", "--max-key-size"),
    s("inference", "repository", "--repository"),
    s("inference", "device", "--device"),
    s("inference", "cpu_workers", "--cpu-workers"),
    s("inference", "intra_op_threads", "--intra-op-threads"),
    s("inference", "cpu_affinity", "--cpu-affinity"),
    s("inference", "max_inflight", "--max-inflight"),
    s("inference", "slo", "--slo"),
    s("inference", "default_model", "--default-model"),
    s("inference", "worker_hang_after", "--worker-hang-after"),
    s("inference", "worker_endpoints", "--worker-endpoints"),
    s("inference", "breaker_failures", "--breaker-failures"),
    s("inference", "breaker_open_for", "--breaker-open-for"),
    s("inference", "endpoint_max_inflight", "--endpoint-max-inflight"),
    s("inference", "worker_security", "--worker-security"),
    s("inference", "worker_tls_ca", "--worker-tls-ca"),
    s("inference", "worker_tls_cert", "--worker-tls-cert"),
    s("inference", "worker_tls_key", "--worker-tls-key"),
    s("inference", "worker_tls_domain", "--worker-tls-domain"),
    Setting { section: "inference", key: "no_batching", flag: "--no-batching", kind: Kind::Switch },
    s("node", "grace", "--grace"),
    s("node", "http_listen", "--http-listen"),
    s("node", "grpc_listen", "--grpc-listen"),
    s("node", "grpc_max_message_size", "--grpc-max-message-size"),
    s("node", "grpc_max_concurrent_streams", "--grpc-max-concurrent-streams"),
    s("node", "grpc_security", "--grpc-security"),
    s("node", "grpc_tls_cert", "--grpc-tls-cert"),
    s("node", "grpc_tls_key", "--grpc-tls-key"),
    s("node", "grpc_tls_client_ca", "--grpc-tls-client-ca"),
    s("node", "role", "--role"),
    s("traces", "otlp_endpoint", "--otlp-endpoint"),
    s("traces", "sample_ratio", "--trace-sample-ratio"),
];

/// The defaults of a group of flags, as clap parses an empty command line (one source of
/// defaults for the CLI, the config file test, the demo, tests and benchmarks).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    T::from_arg_matches(&cmd.get_matches_from(Vec::<String>::new())).expect("flag defaults parse")
}

fn setting(section: &str, key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.section == section && s.key == key)
}

// The flags of `partita node` on their own (also used to check one entry at a time).
#[derive(Debug, Parser)]
#[command(
    name = "partita node",
    no_binary_name = true,
    about = "Run a node. Settings: --config FILE (TOML, every default in config/partita.toml; or $PARTITA_CONFIG), then PARTITA_<SECTION>__<KEY> environment variables, then these flags."
)]
struct NodeFlags {
    #[command(flatten)]
    node: NodeOptions,
}

/// One entry from a layer, as flag arguments, with where it came from.
#[derive(Debug)]
struct Entry {
    flag: &'static str,
    kind: Kind,
    args: Vec<String>,
    origin: String,
}

/// The merged arguments, or every problem found.
#[derive(Debug, Default)]
pub struct Layered {
    pub args: Vec<OsString>,
    pub errors: Vec<String>,
    /// Entries taken from the file and the environment (for `check-config`'s summary).
    pub from_file: usize,
    pub from_env: usize,
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn entry(setting: &'static Setting, value: &toml::Value, origin: String) -> Result<Entry, String> {
    let args = match (setting.kind, value) {
        (Kind::Properties, toml::Value::Table(t)) => t
            .iter()
            .map(|(k, v)| {
                scalar(v).map(|v| format!("{k}={v}")).ok_or_else(|| format!("{origin}: {k} must be a string"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        (Kind::Properties, toml::Value::String(s)) => {
            s.split(',').filter(|p| !p.trim().is_empty()).map(|p| p.trim().to_owned()).collect()
        }
        (Kind::Properties, _) => return Err(format!("{origin}: expected a table of librdkafka properties")),
        (Kind::Switch, v) => match scalar(v).as_deref() {
            Some("true") => vec![],
            Some("false") => {
                return Ok(Entry {
                    flag: setting.flag,
                    kind: setting.kind,
                    args: vec!["false".into()],
                    origin,
                });
            }
            _ => return Err(format!("{origin}: expected true or false")),
        },
        (Kind::Value, v) => {
            vec![scalar(v).ok_or_else(|| format!("{origin}: expected a value, not a table or array"))?]
        }
    };
    Ok(Entry { flag: setting.flag, kind: setting.kind, args, origin })
}

impl Entry {
    /// The entry's flag arguments (a switch set to false contributes nothing).
    fn argv(&self) -> Vec<String> {
        match self.kind {
            Kind::Value => vec![self.flag.to_owned(), self.args[0].clone()],
            Kind::Properties => self.args.iter().flat_map(|a| [self.flag.to_owned(), a.clone()]).collect(),
            Kind::Switch if self.args.is_empty() => vec![self.flag.to_owned()],
            Kind::Switch => vec![],
        }
    }
}

/// Merge `file` (TOML), `env` (`PARTITA_<SECTION>__<KEY>` variables) and `cli` (the user's flags
/// of `partita node`) into one argument list; later layers win for single-valued settings,
/// properties accumulate.
pub fn layer(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    cli: &[OsString],
) -> Layered {
    let mut out = Layered::default();
    let mut entries: Vec<Entry> = Vec::new();
    if let Some(path) = file {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
        {
            Err(e) => out.errors.push(format!("{}: {e}", path.display())),
            Ok(table) => {
                for (section, keys) in &table {
                    let Some(keys) = keys.as_table() else {
                        out.errors.push(format!("{}: [{section}] must be a table", path.display()));
                        continue;
                    };
                    for (key, value) in keys {
                        let origin = format!("{}: [{section}] {key}", path.display());
                        match setting(section, key) {
                            None => out.errors.push(format!("{origin}: unknown setting")),
                            Some(s) => match entry(s, value, origin) {
                                Ok(e) => {
                                    out.from_file += 1;
                                    entries.push(e);
                                }
                                Err(e) => out.errors.push(e),
                            },
                        }
                    }
                }
            }
        }
    }
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort();
    for (name, value) in env {
        let Some((section, key)) = name.strip_prefix("PARTITA_").and_then(|r| r.split_once("__")) else {
            continue;
        };
        let origin = format!("environment {name}");
        match setting(&section.to_lowercase(), &key.to_lowercase()) {
            None => out.errors.push(format!("{origin}: unknown setting")),
            Some(s) => match entry(s, &toml::Value::String(value), origin) {
                Ok(e) => {
                    out.from_env += 1;
                    entries.push(e);
                }
                Err(e) => out.errors.push(e),
            },
        }
    }
    // Check each entry on its own so every bad value is reported, with its origin.
    for e in &entries {
        if let Err(err) = NodeFlags::try_parse_from(e.argv()) {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or_default().trim_start_matches("error: ");
            out.errors.push(format!("{}: {first}", e.origin));
        }
    }
    let cli_flags: Vec<String> = cli
        .iter()
        .filter_map(|a| a.to_str())
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect();
    for (i, e) in entries.iter().enumerate() {
        let overridden = e.kind != Kind::Properties
            && (entries[i + 1..].iter().any(|later| later.flag == e.flag)
                || cli_flags.iter().any(|f| f == e.flag));
        if !overridden {
            out.args.extend(e.argv().into_iter().map(OsString::from));
        }
    }
    out.args.extend(cli.iter().cloned());
    out
}

/// Resolve `partita node`'s options from the layers: `--config FILE` (or `$PARTITA_CONFIG`)
/// is taken out of `cli`; `Err` lists every problem. `--help` prints the flags and exits.
pub fn resolve(cli: &[OsString]) -> Result<(NodeOptions, Layered), Vec<String>> {
    if cli.iter().any(|a| a == "--help" || a == "-h") {
        NodeFlags::parse_from(cli);
    }
    let mut file: Option<std::path::PathBuf> = std::env::var_os("PARTITA_CONFIG").map(Into::into);
    let mut rest = Vec::with_capacity(cli.len());
    let mut args = cli.iter();
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--config") => match args.next() {
                Some(v) => file = Some(v.into()),
                None => return Err(vec!["--config needs a file".into()]),
            },
            Some(s) if s.starts_with("--config=") => file = Some(s["--config=".len()..].into()),
            _ => rest.push(a.clone()),
        }
    }
    let env = std::env::vars().filter(|(k, _)| k.starts_with("PARTITA_") && k.contains("__"));
    let layered = layer(file.as_deref(), env, &rest);
    if !layered.errors.is_empty() {
        return Err(layered.errors);
    }
    match NodeFlags::try_parse_from(&layered.args) {
        Ok(f) => match cross_check(&f.node) {
            problems if problems.is_empty() => Ok((f.node, layered)),
            problems => Err(problems),
        },
        Err(e) => Err(vec![e.to_string().trim().trim_start_matches("error: ").to_owned()]),
    }
}

/// Problems that only settings taken together show.
pub fn cross_check(o: &NodeOptions) -> Vec<String> {
    let mut problems = Vec::new();
    if o.state_backend == crate::state::Backend::Cql && !o.changelog_topic.is_empty() {
        problems.push(
            "[state] changelog_topic is for backend rocksdb: the CQL store is shared by every node already"
                .to_owned(),
        );
    }
    if o.state_backend == crate::state::Backend::Cql && !o.write_window.is_zero() {
        problems.push(
            "[state] write_window groups RocksDB writes: it is for backend rocksdb (each CQL write is its own LWT batch)"
                .to_owned(),
        );
    }
    if o.standby_replicas > 0
        && (o.state_backend != crate::state::Backend::Rocksdb || o.changelog_topic.is_empty())
    {
        problems.push(
            "[state] standby_replicas keeps copies from the changelog: it needs backend rocksdb with a changelog_topic"
                .to_owned(),
        );
    }
    let endpoints = !o.inference.worker_endpoints.is_empty();
    match o.role {
        crate::node::Role::Scorer if !endpoints => problems.push(
            "[node] role scorer runs no inference workers: set [inference] worker_endpoints (ZONE=HOST:PORT of worker nodes)"
                .to_owned(),
        ),
        crate::node::Role::Worker if endpoints => problems.push(
            "[inference] worker_endpoints is for roles scorer and both: a worker node serves its own workers"
                .to_owned(),
        ),
        crate::node::Role::Worker if o.grpc_security.is_none() => problems.push(
            "[node] role worker serves inference to other pods: say how in [node] grpc_security (mtls, tls, or plaintext)"
                .to_owned(),
        ),
        _ => {}
    }
    if endpoints && o.inference.worker_security.is_none() {
        problems.push(
            "[inference] worker_endpoints: say how to reach them in [inference] worker_security (mtls, tls, or plaintext)"
                .to_owned(),
        );
    }
    problems.extend(security_problems(
        "[node] grpc_security",
        o.grpc_security.unwrap_or(crate::node::grpc::Security::Plaintext),
        [
            ("grpc_tls_cert", o.grpc_tls_cert.is_some(), true),
            ("grpc_tls_key", o.grpc_tls_key.is_some(), true),
        ],
        ("grpc_tls_client_ca", o.grpc_tls_client_ca.is_some()),
    ));
    let i = &o.inference;
    problems.extend(security_problems(
        "[inference] worker_security",
        i.worker_security.unwrap_or(crate::node::grpc::Security::Plaintext),
        [
            ("worker_tls_ca", i.worker_tls_ca.is_some(), true),
            ("worker_tls_domain", i.worker_tls_domain.is_some(), false),
        ],
        ("worker_tls_cert and worker_tls_key", i.worker_tls_cert.is_some() && i.worker_tls_key.is_some()),
    ));
    if i.worker_tls_cert.is_some() != i.worker_tls_key.is_some() {
        problems.push("[inference] worker_tls_cert and worker_tls_key go together".to_owned());
    }
    if o.cql_username.is_some() != o.cql_password.is_some() {
        problems
            .push("[state] cql_username and cql_password go together (password authentication)".to_owned());
    }
    if o.state_backend == crate::state::Backend::Cql {
        match o.cql_datacenter.as_deref() {
            Some("") => {
                problems.push("[state] cql_datacenter is empty (unset it for no preference)".to_owned())
            }
            Some(dc)
                if o.cql_consistency == crate::state::scylla::CqlConsistency::LocalQuorum
                    && !o.cql_replication.0.contains_key(dc) =>
            {
                problems.push(format!(
                    "[state] cql_datacenter {dc:?} is not in cql_replication {:?}: local_quorum needs replicas in the node's datacenter",
                    o.cql_replication.0
                ));
            }
            _ => {}
        }
    }
    problems
}

/// What a transport security setting `name` lacks or has too much: `tls` settings (name, set,
/// required by TLS), and the `mtls` one; plaintext with any of them set is a contradiction.
fn security_problems(
    name: &str,
    security: crate::node::grpc::Security,
    tls: [(&str, bool, bool); 2],
    mtls: (&str, bool),
) -> Vec<String> {
    use crate::node::grpc::Security;
    let mut problems = Vec::new();
    let any_set = tls.iter().any(|(_, set, _)| *set) || mtls.1;
    match security {
        Security::Plaintext if any_set => problems
            .push(format!("{name} is plaintext but TLS files are set: say tls or mtls (or unset them)")),
        Security::Plaintext => {}
        Security::Tls | Security::Mtls => {
            for (key, set, required) in tls {
                if required && !set {
                    problems.push(format!("{name} {security:?} needs {key}"));
                }
            }
            if security == Security::Mtls && !mtls.1 {
                problems.push(format!("{name} Mtls needs {}", mtls.0));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn parse(l: &Layered) -> NodeOptions {
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        NodeFlags::try_parse_from(&l.args).unwrap().node
    }

    #[test]
    fn the_checked_in_file_holds_every_setting_and_equals_the_built_in_defaults() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/partita.toml");
        let l = layer(Some(&path), [], &[]);
        let text = std::fs::read_to_string(&path).unwrap();
        for s in SETTINGS {
            // Settings without a default (optional) are there commented out.
            let present = text.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(&format!("{} =", s.key)) || l.starts_with(&format!("[{}.{}]", s.section, s.key))
            });
            assert!(present, "config/partita.toml lacks [{}] {}", s.section, s.key);
        }
        let from_file = parse(&l);
        let built_in: NodeOptions = defaults();
        assert_eq!(format!("{from_file:?}"), format!("{built_in:?}"));
    }

    #[test]
    fn environment_beats_file_and_flags_beat_both() {
        let f = file(
            "[group]\nzone = \"a\"\nid = \"g\"\n[state]\ncache_size = \"64MiB\"\nsync_wal = false\n[ingestion.properties]\n\"client.id\" = \"x\"\n",
        );
        let env = [("PARTITA_GROUP__ZONE".to_owned(), "b".to_owned())];
        let o = parse(&layer(Some(f.path()), env.clone(), &[]));
        assert_eq!((o.zone.as_str(), o.group.as_str(), o.cache_size.as_u64()), ("b", "g", 64 << 20));
        assert!(!o.sync_wal, "a boolean setting false in the file");
        assert_eq!(o.ingestion_properties, vec![("client.id".to_owned(), "x".to_owned())]);
        let cli: Vec<OsString> =
            ["--zone", "c", "--ingestion-property", "acks=all"].map(OsString::from).to_vec();
        let o = parse(&layer(Some(f.path()), env, &cli));
        assert_eq!(o.zone, "c");
        assert_eq!(o.ingestion_properties.len(), 2, "properties accumulate");
    }

    /// A config file `text` yields one error per `[section] key` listed, and no other.
    fn assert_each_rejected(text: &str, section: &str, keys: &[&str]) {
        let f = file(text);
        let l = layer(Some(f.path()), [], &[]);
        let all = l.errors.join("\n");
        assert_eq!(l.errors.len(), keys.len(), "{all}");
        for key in keys {
            assert!(all.contains(&format!("[{section}] {key}:")), "missing {key} in:\n{all}");
        }
    }

    #[test]
    fn the_cql_settings_are_checked() {
        assert_each_rejected(
            "[state]\nbackend = \"mongo\"\ncql_uri = \"db-without-port\"\ncql_keyspace = \"1st\"\ncql_replication = \"dc1=three\"\ncql_consistency = \"sometimes\"\n",
            "state",
            &["backend", "cql_uri", "cql_keyspace", "cql_replication", "cql_consistency"],
        );
        let ok = file(
            "[state]\nbackend = \"cql\"\ncql_uri = \"10.0.0.1:9042,10.0.0.2:9042\"\ncql_keyspace = \"fraud_state\"\ncql_datacenter = \"eu-west\"\ncql_replication = \"eu-west=3,us-east=3\"\ncql_consistency = \"quorum\"\n",
        );
        let o = parse(&layer(Some(ok.path()), [], &[]));
        assert_eq!(o.state_backend, crate::state::Backend::Cql);
        let c = o.cql();
        assert_eq!(c.nodes, vec!["10.0.0.1:9042", "10.0.0.2:9042"]);
        assert_eq!(
            (c.keyspace.as_str(), c.datacenter.as_deref(), c.zone.as_deref()),
            ("fraud_state", Some("eu-west"), Some("local"))
        );
        assert_eq!(c.replication.get("us-east"), Some(&3));
        assert_eq!(c.consistency, crate::state::scylla::CqlConsistency::Quorum);
        assert!(cross_check(&o).is_empty(), "quorum needs no local datacenter in the replication");
        let mut local = o.clone();
        local.cql_consistency = crate::state::scylla::CqlConsistency::LocalQuorum;
        assert!(cross_check(&local).is_empty(), "eu-west is in the replication");
        local.cql_datacenter = Some("ap-south".into());
        let problems = cross_check(&local);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("\"ap-south\" is not in cql_replication"), "{problems:?}");
        local.cql_datacenter = Some(String::new());
        assert!(cross_check(&local)[0].contains("cql_datacenter is empty"));
    }

    #[test]
    fn cql_credentials_come_in_pairs_reach_the_driver_and_are_never_printed() {
        let f = file("[state]\nbackend = \"cql\"\ncql_username = \"partita\"\n");
        let secret = [("PARTITA_STATE__CQL_PASSWORD".to_owned(), "hunter2".to_owned())];
        let o = parse(&layer(Some(f.path()), secret, &[]));
        assert!(cross_check(&o).is_empty(), "{:?}", cross_check(&o));
        let c = o.cql();
        assert_eq!((c.username.as_deref(), c.password.as_deref()), (Some("partita"), Some("hunter2")));
        assert!(!format!("{o:?}").contains("hunter2"), "check-config prints the options");
        let alone = parse(&layer(Some(f.path()), [], &[]));
        assert!(cross_check(&alone)[0].contains("cql_username and cql_password go together"));
    }

    #[test]
    fn settings_of_backend_rocksdb_are_refused_with_backend_cql() {
        let f = file("[state]\nbackend = \"cql\"\nchangelog_topic = \"c\"\nwrite_window = \"2ms\"\n");
        let problems = cross_check(&parse(&layer(Some(f.path()), [], &[])));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("changelog_topic is for backend rocksdb"), "{problems:?}");
        assert!(problems[1].contains("write_window groups RocksDB writes"), "{problems:?}");
        let f = file("[state]\nwrite_window = \"2ms\"\n");
        assert!(cross_check(&parse(&layer(Some(f.path()), [], &[]))).is_empty());
    }

    #[test]
    fn roles_and_transport_security_are_checked_together() {
        let problems = |text: &str| {
            let f = file(text);
            cross_check(&parse(&layer(Some(f.path()), [], &[])))
        };
        assert!(problems("[node]\nrole = \"scorer\"\n")[0].contains("set [inference] worker_endpoints"));
        let scorer = "[node]\nrole = \"scorer\"\n[inference]\nworker_endpoints = \"a=w:50051\"\n";
        assert!(
            problems(scorer)[0].contains("say how to reach them"),
            "secure by default: said, not assumed"
        );
        assert!(problems(&format!("{scorer}worker_security = \"plaintext\"\n")).is_empty());
        assert!(problems("[node]\nrole = \"worker\"\n")[0].contains("say how in [node] grpc_security"));
        assert!(problems("[node]\nrole = \"worker\"\ngrpc_security = \"plaintext\"\n").is_empty());
        assert!(
            problems("[node]\nrole = \"worker\"\n[inference]\nworker_endpoints = \"a=w:50051\"\n")[0]
                .contains("a worker node serves its own workers")
        );
        let mtls = problems("[node]\ngrpc_security = \"mtls\"\ngrpc_tls_cert = \"c.pem\"\n");
        assert_eq!(mtls.len(), 2, "{mtls:?}");
        assert!(
            mtls[0].contains("needs grpc_tls_key") && mtls[1].contains("needs grpc_tls_client_ca"),
            "{mtls:?}"
        );
        assert!(
            problems("[node]\ngrpc_tls_cert = \"c.pem\"\n")[0].contains("is plaintext but TLS files are set")
        );
        assert!(
            problems("[node]\ngrpc_security = \"tls\"\ngrpc_tls_cert = \"c\"\ngrpc_tls_key = \"k\"\n")
                .is_empty()
        );
        let client = problems(
            "[inference]\nworker_security = \"mtls\"\nworker_tls_ca = \"ca\"\nworker_tls_cert = \"c\"\n",
        );
        assert!(client.iter().any(|p| p.contains("needs worker_tls_cert and worker_tls_key")), "{client:?}");
        assert!(
            client.iter().any(|p| p.contains("worker_tls_cert and worker_tls_key go together")),
            "{client:?}"
        );
        assert_each_rejected(
            "[node]\nrole = \"leader\"\ngrpc_security = \"maybe\"\n",
            "node",
            &["role", "grpc_security"],
        );
        assert_each_rejected(
            "[inference]\nworker_endpoints = \"w:50051\"\n",
            "inference",
            &["worker_endpoints"],
        );
    }

    #[test]
    fn values_that_would_wedge_the_node_are_rejected() {
        assert_each_rejected(
            "[partition]\nmax_batch = 0\nmax_waves = 0\nmax_pending_batches = 0\nqueue = 0\ninfer_deadline = \"0s\"\n",
            "partition",
            &["max_batch", "max_waves", "max_pending_batches", "queue", "infer_deadline"],
        );
        assert_each_rejected("[inference]\nslo = \"0s\"\n", "inference", &["slo"]);
        assert_each_rejected("[inference]\nslo = \"1000years\"\n", "inference", &["slo"]);
        assert_each_rejected("[state]\nwrite_window = \"1s\"\n", "state", &["write_window"]);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_origin() {
        let f = file(
            "[group]\nzone = \"a\"\ncolour = \"red\"\n[partition]\ninfer_deadline = \"soon\"\nmax_batch = -3\n[nonsense]\nx = 1\n",
        );
        let env = [
            ("PARTITA_STATE__CACHE_SIZE".to_owned(), "lots".to_owned()),
            ("PARTITA_STATE__COLOUR".to_owned(), "blue".to_owned()),
        ];
        let l = layer(Some(f.path()), env, &[]);
        let all = l.errors.join("\n");
        assert_eq!(l.errors.len(), 6, "{all}");
        for needle in [
            "[group] colour: unknown setting",
            "[partition] infer_deadline",
            "[partition] max_batch",
            "[nonsense] x",
            "PARTITA_STATE__CACHE_SIZE",
            "PARTITA_STATE__COLOUR",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }
}
