//! The Open Inference Protocol (KServe V2, gRPC) as a worker node serves it: called by Triton's
//! own Python client (`tritonclient`, installed by scripts/setup.sh into the torch virtualenv)
//! and by the Rust client generated from the same definition.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use partita_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use partita_proto::inference::model_infer_request::InferInputTensor;
use partita_proto::inference::{InferTensorContents, ModelInferRequest, ServerReadyRequest};
use partita_runtime::inference::DeviceChoice;
use partita_runtime::node::{Node, NodeOptions, Role};
use partita_tests::{Lcg, models_dir, repo_root};

/// A node with role worker on the shipped models, one CPU worker, ports picked by the system;
/// returned once ready.
async fn worker_node() -> Node {
    let mut opts = NodeOptions::local("unused:9092", std::env::temp_dir().join("partita-oip-unused"));
    opts.role = Role::Worker;
    opts.inference.repository = models_dir();
    opts.inference.device = DeviceChoice::Cpu;
    opts.inference.cpu_workers = 1;
    opts.inference.intra_op_threads = 1;
    let node = Node::start(&opts).await.expect("a worker node starts without Kafka or a store");
    let started = Instant::now();
    while !node.health.ready() {
        assert!(started.elapsed() < Duration::from_secs(30), "not ready: {}", node.health.reason());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node
}

/// The torch virtualenv's Python (scripts/setup.sh's environment sets `VIRTUAL_ENV`).
fn python() -> std::path::PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(|v| std::path::PathBuf::from(v).join("bin/python"))
        .unwrap_or_else(|| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_live_ready_metadata_scores_and_errors_as_oip_defines_them() {
    let node = worker_node().await;
    let script = repo_root().join("tests/oip/tritonclient_check.py");
    let run = tokio::process::Command::new(python())
        .arg(&script)
        .arg(node.grpc.to_string())
        .arg(models_dir())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the tritonclient checks finish within 3 minutes")
        .expect("running the virtualenv's python (scripts/setup.sh installs torch and tritonclient)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "tritonclient checks failed: {text}");
    assert!(text.contains("all checks passed"), "{text}");
    let metrics = node.metrics.render().await;
    for needle in [
        r#"partita_oip_requests_total{zone="local",model="fraud_gru",grpc_code="OK"} 3"#,
        r#"partita_oip_requests_total{zone="local",model="nonexistent",grpc_code="NotFound"} 1"#,
        r#"partita_oip_requests_total{zone="local",model="fraud_gru",grpc_code="InvalidArgument"} 5"#,
        r#"partita_inference_requests_total{zone="local",model="fraud_gru",version="1",device="cpu"} 15"#,
    ] {
        assert!(metrics.contains(needle), "{needle} not in:\n{metrics}");
    }
    node.stop().await.unwrap();
}

fn input(name: &str, rows: usize, width: usize, values: Option<Vec<f32>>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, width as i64],
        contents: values.map(|v| InferTensorContents { fp32_contents: v, ..Default::default() }),
        ..Default::default()
    }
}

fn raw(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_answer_as_raw_bytes_do_and_a_draining_node_refuses_new_calls() {
    let node = worker_node().await;
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", node.grpc)).await.unwrap();
    let mut rng = Lcg::new(3);
    let rows = 40; // more than one forward's worth is not needed: the rows are batched together
    let (features, state) = (rng.vec(rows * 16), rng.vec(rows * 64));
    let typed = ModelInferRequest {
        model_name: "fraud_gru".into(),
        inputs: vec![
            input("features", rows, 16, Some(features.clone())),
            input("state", rows, 64, Some(state.clone())),
        ],
        ..Default::default()
    };
    let by_raw = ModelInferRequest {
        inputs: vec![input("features", rows, 16, None), input("state", rows, 64, None)],
        raw_input_contents: vec![raw(&features), raw(&state)],
        ..typed.clone()
    };
    let a = client.model_infer(typed.clone()).await.unwrap().into_inner();
    let b = client.model_infer(by_raw).await.unwrap().into_inner();
    assert_eq!(a.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["score", "new_state"]);
    assert_eq!(a.outputs[0].shape, [rows as i64]);
    assert_eq!(a.outputs[1].shape, [rows as i64, 64]);
    assert_eq!(a.raw_output_contents[0].len(), rows * 4);
    assert_eq!(a.raw_output_contents[1].len(), rows * 64 * 4);
    assert_eq!(a.raw_output_contents, b.raw_output_contents, "the same rows, the same answers");

    node.health.draining.store(true, Ordering::SeqCst);
    let refused = client.model_infer(typed).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("draining"), "{refused:?}");
    assert!(!client.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    node.stop().await.unwrap();
}
