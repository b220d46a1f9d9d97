//! The `partita` binary as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn partita(args: &[&str]) -> std::process::Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    Command::new(env!("CARGO_BIN_EXE_partita")).args(args).current_dir(root).output().unwrap()
}

#[test]
fn models_prints_a_ready_table() {
    let out = partita(&["models", "--device", "cpu", "--cpu-workers", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let ready: Vec<&str> = stdout.lines().filter(|l| l.contains("READY")).collect();
    assert_eq!(ready.len(), 4, "2 models x 2 workers:\n{stdout}");
    assert!(stdout.contains("fraud_gru") && stdout.contains("features[16] state[64]"), "{stdout}");
    assert!(stdout.contains("score[] new_state[64]") && stdout.contains("cpu"), "{stdout}");
}

#[test]
fn an_invalid_repository_is_a_clear_error_and_a_failing_exit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("m/1")).unwrap();
    std::fs::write(dir.path().join("m/config.toml"), "name = \"m\"\nplatform = \"onnx\"\n").unwrap();
    let out = partita(&["models", "--repository", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid model repository") && stderr.contains("m/config.toml"), "{stderr}");

    let out = partita(&["models", "--repository", "/nonexistent/repo"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read directory"));
}

#[test]
fn check_config_accepts_the_shipped_file_and_lists_every_problem_of_a_bad_one() {
    let out = partita(&["check-config", "--config", "config/partita.toml", "--zone", "eu-1a"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("configuration OK") && stdout.contains("\"eu-1a\""), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[group]\nzone = 3\nsize = 1\n[state]\ncache_size = \"big\"\n[partition]\ninfer_deadline = \"later\"\n")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_partita"))
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .env("PARTITA_NODE__GRACE", "forever")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "[group] size: unknown setting",
        "[state] cache_size",
        "[partition] infer_deadline",
        "PARTITA_NODE__GRACE",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not reported:\n{stderr}");
    }
    assert!(stderr.contains("4 problem(s)"), "{stderr}");
}

/// `partita local` smoke test: two nodes in two zones on one broker and one Cassandra node, a
/// short load; every node reported ready, a status line per node, every event answered.
#[test]
fn local_starts_a_cluster_reports_every_node_ready_and_answers_its_load() {
    let out = partita(&[
        "local",
        "--nodes",
        "2",
        "--zones",
        "a,b",
        "--brokers",
        "1",
        "--cassandra-nodes",
        "1",
        "--rate",
        "100",
        "--duration",
        "8s",
        "--every",
        "2s",
    ]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "partita local failed:\n{stdout}\n{stderr}");
    for (node, zone) in [("node-0", "a"), ("node-1", "b")] {
        let placed =
            stdout.lines().any(|l| l.trim_start().starts_with(node) && l.contains(&format!("zone {zone} ")));
        assert!(placed, "{node} not shown in zone {zone}:\n{stdout}");
        let status = stdout
            .lines()
            .filter(|l| {
                l.trim_start().starts_with(node) && l.contains(" ready ") && l.contains("partitions [")
            })
            // the zone the node reports in its metrics
            .filter(|l| l.contains(&format!("zone {zone} ")))
            .count();
        assert!(status > 0, "no status line of a ready {node} in zone {zone}:\n{stdout}");
    }
    let missing = stdout.lines().find(|l| l.contains("missing (no output)")).expect("the load results table");
    assert!(missing.trim_end().ends_with(" 0"), "events unanswered: {missing}\n{stdout}\n{stderr}");
}
