fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=partita");
    println!("cargo:rerun-if-changed=inference");
    prost_build::compile_protos(&["partita/v1/inference.proto", "partita/v1/events.proto"], &["."])?;
    // The Open Inference Protocol: messages, the server trait and a client.
    tonic_prost_build::configure().compile_protos(&["inference/grpc_predict_v2.proto"], &["."])
}
