//! Compiles `proto/strata/v1/cache.proto` with protox (no `protoc` needed) into tonic
//! client and server code, and writes the file descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/strata/v1/cache.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("strata_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".strata.v1")
        // Counts a request's repeated elements before prost allocates for them.
        .codec_path("crate::codec::CheckedCodec")
        .compile_fds(fds)?;
    Ok(())
}
