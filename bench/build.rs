// The benchmarks link LibTorch as the `partita` binary does (its `cuda` feature).
include!("../runtime/build.rs");
