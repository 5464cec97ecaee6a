//! Compiles the test-only transcoding contract (`testdata/`) for the edge's
//! own tests: its messages, a tonic server, and its descriptor set with
//! custom options kept.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let testdata = manifest.join("testdata");
    let contracts = manifest.join("../../proto");
    println!("cargo:rerun-if-changed={}", testdata.display());
    let mut compiler = protox::Compiler::new([&testdata, &contracts])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files([
        "keel/testing/v1/transcode.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    ])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("testing_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_well_known_types(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
