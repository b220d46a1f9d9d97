// With the `cuda` feature, the binaries link LibTorch's CUDA half. Nothing references a symbol of
// `libtorch_cuda.so` (it registers CUDA when it loads), so the linker drops it and LibTorch then
// sees no CUDA device even on a GPU machine (tch-rs issue #980). `libtorch.so` names both halves,
// and `--no-as-needed` keeps it. Off by default: loading the CUDA libraries costs every process
// start, and a CPU-only machine has no use for them. The image and GPU runs build with it.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
