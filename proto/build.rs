//! Generates the gRPC types with the vendored protoc, so a fresh machine needs
//! nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // No `connect()` helpers on the generated clients: calls go over
    // `connection::Connection`, and tonic's own client transport is not built.
    tonic_prost_build::configure()
        .build_transport(false)
        .bytes(".")
        .file_descriptor_set_path(out_dir.join("tally_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/tally/v1/tally.proto",
                "proto/tally/v1/groups.proto",
                "proto/tally/internal/v1/raft.proto",
                "proto/tally/internal/v1/replication.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto/tally/v1/tally.proto");
    println!("cargo:rerun-if-changed=proto/tally/v1/groups.proto");
    println!("cargo:rerun-if-changed=proto/tally/internal/v1/raft.proto");
    println!("cargo:rerun-if-changed=proto/tally/internal/v1/replication.proto");
    Ok(())
}
