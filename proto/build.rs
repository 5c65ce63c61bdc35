fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=sdn/v1/sdn.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // For server reflection (grpcurl and others list and call the API).
        .file_descriptor_set_path(out.join("sdn_descriptor.bin"))
        .compile_protos(&["sdn/v1/sdn.proto"], &["."])?;
    Ok(())
}
