//! Gives murmur's binaries and test executables an rpath to libtorch, so they
//! run without LD_LIBRARY_PATH. torch-sys reports where it found libtorch
//! through its `links = "tch"` metadata.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
