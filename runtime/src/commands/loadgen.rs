//! `partita loadgen`: open-loop load against a running node; prints the results table and a
//! `RESULT {json}` line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::loadgen::{LoadgenOptions, run as run_load};

pub async fn run(opts: &LoadgenOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (opts, stop) = (opts.clone(), stop.clone());
        tokio::task::spawn_blocking(move || run_load(&opts, &stop))
    };
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::SeqCst);
            }
        })
    };
    let report = load.await??;
    watcher.abort();
    print!("{}", report.table());
    println!("RESULT {}", serde_json::to_string(&report)?);
    Ok(())
}
