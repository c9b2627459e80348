//! Generates the `warmroll.v1` protocol code (messages, client and server).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/warmroll/v1/fleet.proto");
    tonic_prost_build::configure()
        // Small per-stream buffers: the coordinator holds one stream per node.
        .codec_path("crate::codec::FleetCodec")
        // Messages that carry registry secrets get a hand-written, redacting `Debug`.
        .skip_debug([
            ".warmroll.v1.BasicAuth",
            ".warmroll.v1.Credentials",
            ".warmroll.v1.Credentials.kind",
        ])
        .compile_protos(&["proto/warmroll/v1/fleet.proto"], &["proto"])?;
    Ok(())
}
