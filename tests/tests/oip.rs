//! The Open Inference Protocol (KServe V2, gRPC) as a worker node serves it: called by Triton's
//! own Python client (`tritonclient`, installed by scripts/setup.sh into the torch virtualenv)
//! and by the Rust client generated from the same definition.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use partita_actors::inference::InferRows;
use partita_actors::model::ModelSpec;
use partita_actors::pool::remote::{RemoteAnswer, RemoteWorkers};
use partita_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use partita_proto::inference::model_infer_request::InferInputTensor;
use partita_proto::inference::{InferTensorContents, ModelInferRequest, ServerReadyRequest};
use partita_runtime::inference::DeviceChoice;
use partita_runtime::inference::remote::{ClientTls, RemotePool, RemoteSettings};
use partita_runtime::node::{Node, NodeOptions, Role};
use partita_tests::{Lcg, models_dir, repo_root};

/// A node with role worker on the shipped models, one CPU worker, ports picked by the system;
/// returned once ready.
async fn worker_node() -> Node {
    let mut opts = NodeOptions::local("unused:9092", std::env::temp_dir().join("partita-oip-unused"));
    opts.role = Role::Worker;
    opts.grpc_security = Some(partita_runtime::node::grpc::Security::Plaintext);
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

/// The spec of `model` as the node loaded it.
fn node_spec(node: &Node, model: &str) -> ModelSpec {
    node.router().model(model).expect("a shipped model").clone()
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

/// A CA and the certificates it signs, as PEM files in a folder.
struct Ca {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { key, params, pem }
    }

    /// A certificate for `names` signed by this CA: (certificate PEM, key PEM).
    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    }
}

/// A client of `addr` over TLS trusting `ca`, presenting `identity` if given; `Err` when the
/// connection fails.
async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<GrpcInferenceServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

/// `ServerLive` through `client`: the status code (`Ok` when it answered live).
async fn live(
    client: Result<GrpcInferenceServiceClient<tonic::transport::Channel>, tonic::transport::Error>,
) -> Result<tonic::Code, String> {
    let mut client = client.map_err(|e| format!("connect: {e:?}"))?;
    match client.server_live(partita_proto::inference::ServerLiveRequest {}).await {
        Ok(r) => Ok(if r.into_inner().live { tonic::Code::Ok } else { tonic::Code::Unknown }),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_valid_certificate_and_picks_up_a_rotated_one() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, rogue) = (Ca::new(), Ca::new());
    let server = ca.sign(&["localhost"]);
    let client = ca.sign(&["scorer"]);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut opts = NodeOptions::local("unused:9092", dir.path().join("state"));
    opts.role = Role::Worker;
    opts.inference.repository = models_dir();
    opts.inference.device = DeviceChoice::Cpu;
    opts.inference.intra_op_threads = 1;
    opts.grpc_security = Some(partita_runtime::node::grpc::Security::Mtls);
    opts.grpc_tls_cert = Some(write("tls.crt", &server.0));
    opts.grpc_tls_key = Some(write("tls.key", &server.1));
    opts.grpc_tls_client_ca = Some(write("ca.crt", &ca.pem));
    assert!(partita_runtime::node::config::cross_check(&opts).is_empty());
    let node = Node::start(&opts).await.expect("a worker node with mutual TLS");
    let addr = node.grpc;

    assert_eq!(live(tls_client(addr, &ca.pem, Some(&client)).await).await, Ok(tonic::Code::Ok));
    let none = live(tls_client(addr, &ca.pem, None).await).await.unwrap_err();
    assert!(none.starts_with("Unauthenticated") && none.contains("mutual TLS"), "{none}");
    let forged = rogue.sign(&["scorer"]);
    let refused = live(tls_client(addr, &ca.pem, Some(&forged)).await).await.unwrap_err();
    assert!(!refused.starts_with("Unauthenticated"), "refused in the handshake, not by a call: {refused}");
    let plain = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await;
    assert!(live(plain).await.is_err(), "a plaintext client gets nothing");

    // A scorer's remote workers over mutual TLS: with its certificate it is served; without, the
    // worker refuses its health checks and calls, and no call goes through.
    for (identity, served) in [(true, true), (false, false)] {
        let tls = ClientTls {
            ca: write("ca.crt", &ca.pem),
            identity: identity.then(|| (write("client.crt", &client.0), write("client.key", &client.1))),
            domain: Some("localhost".into()),
        };
        let settings = RemoteSettings {
            endpoints: vec![format!("local=127.0.0.1:{}", addr.port()).parse().unwrap()],
            zone: "local".into(),
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(5),
            max_inflight: 64,
            connect_timeout: Duration::from_secs(1),
            max_message_size: 4 << 20,
            tls: Some(tls),
        };
        let remote = RemotePool::start(settings, node.metrics.clone()).await;
        // Health is checked each second; the node's status turns SERVING within 100 ms of ready.
        let started = Instant::now();
        while !remote.available() && started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(remote.available(), served, "its health check passes over mutual TLS, with a certificate");
        let spec = node_spec(&node, "fraud_gru");
        let mut rows = InferRows::with_capacity(&spec, 2);
        for _ in 0..2 {
            rows.push(&spec, &[0.5; 16], None).unwrap();
        }
        let answer = remote.infer(&spec, std::sync::Arc::new(rows), Some(Duration::from_secs(5))).await;
        if served {
            assert!(
                matches!(&answer, RemoteAnswer::Scored { scores, .. } if scores.len() == 2),
                "{answer:?}"
            );
        } else {
            assert_eq!(answer, RemoteAnswer::Unavailable, "refused: no call went through");
        }
    }

    // Rotation: a certificate from another CA replaces the files; new connections use it.
    let rotated_ca = Ca::new();
    let rotated = rotated_ca.sign(&["localhost"]);
    write("tls.key", &rotated.1);
    write("tls.crt", &rotated.0);
    let started = Instant::now();
    while live(tls_client(addr, &rotated_ca.pem, Some(&client)).await).await != Ok(tonic::Code::Ok) {
        assert!(started.elapsed() < Duration::from_secs(15), "the rotated certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        live(tls_client(addr, &ca.pem, Some(&client)).await).await.is_err(),
        "the old certificate is gone"
    );
    node.stop().await.unwrap();
}
