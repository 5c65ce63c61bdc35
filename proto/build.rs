fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=sdn/v1/sdn.proto");
    tonic_prost_build::configure().compile_protos(&["sdn/v1/sdn.proto"], &["."])?;
    Ok(())
}
