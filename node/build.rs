//! Gives murmur's binaries and test executables an rpath to libtorch, so they
//! run without LD_LIBRARY_PATH. torch-sys reports where it found libtorch
//! through its `links = "tch"` metadata. A second, relative entry finds
//! libtorch beside an installed binary (the container image's layout).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Installed beside their libraries, as in the container image
        // (deploy/collect-runtime.sh): BIN/../lib/torch/lib.
        println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib/torch/lib");
    }
}
