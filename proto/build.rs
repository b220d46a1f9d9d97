fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=partita");
    prost_build::compile_protos(&["partita/v1/inference.proto", "partita/v1/events.proto"], &["."])
}
