//! `partita models`: load the repository on the configured devices and print a READY table.

use std::fmt::Write as _;

use partita_actors::model::ModelSpec;
use partita_actors::pool::WorkerStatus;

use crate::inference::InferenceOptions;

pub async fn run(opts: &InferenceOptions) -> anyhow::Result<()> {
    let (pool, repo) = opts.start().await?;
    let status = pool.status().await;
    print!("{}", render(&repo.root.display().to_string(), &repo.specs(), &status));
    pool.shutdown().await;
    Ok(())
}

/// The table: one row per model per worker.
pub fn render(root: &str, specs: &[ModelSpec], workers: &[WorkerStatus]) -> String {
    let mut rows = vec![
        [
            "MODEL",
            "VERSION",
            "STATUS",
            "WORKER",
            "DEVICE",
            "INPUTS",
            "OUTPUTS",
            "MAX BATCH",
            "BATCHING",
            "WARM-UP",
        ]
        .map(String::from),
    ];
    for w in workers {
        for spec in specs {
            let ready = w.models.iter().find(|m| m.name == spec.name);
            let (inputs, outputs) = if spec.is_stateful() {
                (
                    format!("features[{}] state[{}]", spec.feature_count, spec.state_size),
                    format!("score[] new_state[{}]", spec.state_size),
                )
            } else {
                (format!("features[{}]", spec.feature_count), "score[]".to_owned())
            };
            let b = &spec.batch;
            let batching = if b.max_batch_size == 1 {
                "off".to_owned()
            } else {
                format!("preferred {:?}, delay {:?}", b.preferred_batch_sizes, b.max_queue_delay)
            };
            rows.push([
                spec.name.clone(),
                spec.version.to_string(),
                if w.healthy && ready.is_some() { "READY" } else { "UNAVAILABLE" }.to_owned(),
                w.index.to_string(),
                w.device.to_string(),
                inputs,
                outputs,
                b.max_batch_size.to_string(),
                batching,
                ready.map_or("-".into(), |r| format!("{:.1} ms", r.warmup.as_secs_f64() * 1e3)),
            ]);
        }
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = format!("model repository: {root}\n");
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}
