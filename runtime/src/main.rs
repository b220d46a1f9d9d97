//! The `partita` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use partita_runtime::commands;
use partita_runtime::inference::InferenceOptions;
use partita_runtime::node::NodeOptions;
use partita_runtime::telemetry::traces::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(name = "partita", version, about = "real-time, stateful ML scoring of event streams")]
struct Cli {
    /// Log lines as text or as JSON objects (one per line, with span fields), on stderr.
    #[arg(long, env = "PARTITA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the model repository on the configured devices, warm every model up, print a READY table.
    Models(InferenceOptions),
    /// Run a node: consume the ingestion topic, score events with their keys' state, produce
    /// scores and dead letters, until SIGTERM (then drain).
    /// Settings: `--config FILE` (TOML, see config/partita.toml), then PARTITA_<SECTION>__<KEY>
    /// environment variables, then flags (`partita node --help` lists them).
    #[command(disable_help_flag = true)]
    Node {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Check a node's configuration (file, environment, flags) and print every problem at once.
    #[command(disable_help_flag = true)]
    CheckConfig {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Produce events at a fixed rate and measure the scores coming back.
    Loadgen(partita_runtime::loadgen::LoadgenOptions),
    /// Start a local broker, a node and the load generator; print where things ran and the results.
    Demo(commands::demo::DemoArgs),
    /// Start a whole cluster on loopback: Kafka brokers and Cassandra nodes over zones, N nodes,
    /// the load generator; print what runs where and a status line per node until Ctrl-C.
    Local(commands::local::LocalArgs),
    /// Print the ScyllaDB schema (keyspace and tables); with --apply, create it on a cluster.
    Schema(commands::schema::SchemaArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A node's configuration first: it says whether spans are exported.
    let node = match &cli.command {
        Command::Node { args } => match partita_runtime::node::config::resolve(args) {
            Ok((opts, _)) => Some(opts),
            Err(errors) => {
                eprintln!("error: invalid configuration:\n  {}", errors.join("\n  "));
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let telemetry = {
        let _context = runtime.enter();
        match traces::init(cli.log_format, node.as_ref().and_then(NodeOptions::otlp).as_ref()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    };
    // Crash tests' fail points (FAILPOINTS=name=actions;...), only in builds with the feature.
    #[cfg(feature = "failpoints")]
    let _failpoints = {
        if let Ok(f) = std::env::var("FAILPOINTS") {
            tracing::warn!(failpoints = %f, "fail points configured");
        }
        fail::FailScenario::setup()
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Models(opts) => commands::models::run(&opts).await,
            Command::Schema(args) => commands::schema::run(&args).await,
            Command::Node { .. } => commands::node::run(&node.expect("resolved above")).await,
            Command::CheckConfig { args } => commands::check_config::run(&args),
            Command::Loadgen(opts) => commands::loadgen::run(&opts).await,
            Command::Demo(args) => commands::demo::run(&args).await,
            Command::Local(args) => commands::local::run(&args).await,
        }
    });
    // Spans not yet exported go out while the runtime still runs (the exporter uses it).
    telemetry.shutdown();
    // Blocking threads (the load generator) must not keep the process alive after an interrupt.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
