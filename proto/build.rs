//! Generates the Rust types for murmur's .proto files with a vendored protoc,
//! so building needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_set_protoc(&protoc);
    let protos = [
        "murmur/wire/v1/wire.proto",
        "murmur/wire/v1/membership.proto",
        "murmur/v1/node.proto",
        "murmur/coordinator/v1/coordinator.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // The descriptors of every message and service, for gRPC reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Sorted maps: statuses print and compare the same every time.
        .btree_map(".")
        .file_descriptor_set_path(out.join("murmur_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // Edition 2024 marks set_var unsafe because other threads may read the
    // environment; a build script has no other threads at this point.
    unsafe { std::env::set_var("PROTOC", path) };
}
