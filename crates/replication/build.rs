//! Generates the gRPC code of `proto/` with protox (pure Rust; no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/regatta/replication/v1/replication.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
