fn main() -> std::io::Result<()> {
    let partita = ["partita/v1/inference.proto", "partita/v1/events.proto"];
    let oip = ["inference/grpc_predict_v2.proto"];
    for file in partita.iter().chain(&oip) {
        println!("cargo:rerun-if-changed={file}");
    }
    prost_build::compile_protos(&partita, &["."])?;
    // The Open Inference Protocol: messages, the server trait and a client.
    tonic_prost_build::configure().compile_protos(&oip, &["."])
}
