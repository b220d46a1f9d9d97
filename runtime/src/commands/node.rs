//! `partita node`: run one node until SIGTERM or Ctrl-C, then drain in order. A second signal
//! exits at once (nothing past the stored applied offsets is committed, so nothing is lost).

use std::sync::atomic::Ordering;

use crate::node::{Node, NodeOptions};

pub async fn run(opts: &NodeOptions) -> anyhow::Result<()> {
    exit_with_stdin();
    let signals = StopSignals::listen()?;
    let node = Node::start(opts).await?;
    tracing::info!(devices = ?node.devices, group = %opts.group, zone = %opts.zone, input = %opts.input_topic, "node started");
    let summary = node.run_until(signals.first_then_exit_on_second()).await?;
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

/// The stop signals (SIGTERM, SIGINT), listened for from creation on: one that comes while the
/// node starts (model loading, warm-up, joining the group) is served once it has started, as an
/// orderly drain, instead of killing the process with the default action.
pub struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use anyhow::Context;
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves on the first signal; a second one exits the process at once.
    pub async fn first_then_exit_on_second(mut self) {
        self.next().await;
        tracing::info!("shutdown signal: draining (a second signal exits at once)");
        tokio::spawn(async move {
            self.next().await;
            eprintln!("second signal: exiting without draining");
            std::process::exit(130);
        });
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
