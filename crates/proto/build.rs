//! Compiles `proto/` with protox (no system protoc) and generates prost
//! messages plus tonic clients and servers.
//!
//! The descriptor set written for reflection and the edge is encoded by the
//! protox compiler itself: re-encoding `prost_types::FileDescriptorSet` would
//! drop extension fields such as `google.api.http`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = proto_files(&root)?;
    println!("cargo:rerun-if-changed={}", root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&files)?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("keel_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    // Type names (`prost::Name`) let `validate` find a message's rules in the
    // descriptor set by its full name.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(cfg!(feature = "client"))
        .build_server(cfg!(feature = "server"))
        .compile_well_known_types(false)
        .compile_fds_with_config(compiler.file_descriptor_set(), config)?;
    Ok(())
}

/// Every `.proto` under `proto/keel` plus the error details and the health
/// protocol, relative to `proto/`, sorted.
fn proto_files(root: &std::path::Path) -> std::io::Result<Vec<String>> {
    // google.rpc's error details are served by reflection so clients can
    // read the details of an error; their Rust types come from tonic-types.
    let mut files = vec![
        "google/rpc/error_details.proto".to_owned(),
        "google/rpc/status.proto".to_owned(),
        // Served by keel itself (tonic-health has no `List`).
        "grpc/health/v1/health.proto".to_owned(),
    ];
    let mut stack = vec![root.join("keel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "proto") {
                let relative = path.strip_prefix(root).map_err(std::io::Error::other)?;
                files.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    files.sort();
    Ok(files)
}
