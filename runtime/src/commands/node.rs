//! `partita node`: run one node until SIGTERM or Ctrl-C, then drain in order. A second signal
//! exits at once (nothing past the stored applied offsets is committed, so nothing is lost).

use std::sync::atomic::Ordering;

use crate::node::{Node, NodeOptions};

pub async fn run(opts: &NodeOptions) -> anyhow::Result<()> {
    exit_with_stdin();
    let node = Node::start(opts).await?;
    tracing::info!(devices = ?node.devices, group = %opts.group, zone = %opts.zone, input = %opts.input_topic, "node started");
    let summary = node.run_until(shutdown_signal()).await?;
    let c = &summary.counters;
    tracing::info!(
        scored = c.scored.load(Ordering::Relaxed),
        dead_letters = c.dead_lettered_total(),
        redelivered = c.redelivered.load(Ordering::Relaxed),
        "node stopped"
    );
    Ok(())
}

/// With `PARTITA_EXIT_WITH_STDIN` set (by `partita local`, which holds the pipe), exit at once,
/// as a crash would, when standard input closes: no node outlives the process that started it,
/// even one killed with SIGKILL. Nothing is lost: state and offsets are stored together.
fn exit_with_stdin() {
    if std::env::var_os("PARTITA_EXIT_WITH_STDIN").is_none() {
        return;
    }
    let _ = std::thread::Builder::new().name("partita-stdin-watch".into()).spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        eprintln!("standard input closed (the launching process is gone): exiting");
        std::process::exit(70);
    });
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once.
pub async fn shutdown_signal() {
    first_signal().await;
    tracing::info!("shutdown signal: draining (a second signal exits at once)");
    tokio::spawn(async {
        first_signal().await;
        eprintln!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

async fn first_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
