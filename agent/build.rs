//! Builds the eBPF programs (dataplane-ebpf) for the bpf target with the
//! nightly toolchain and bpf-linker; the agent embeds the object.

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new().no_deps().exec()?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "dataplane-ebpf")
        .ok_or_else(|| anyhow::anyhow!("dataplane-ebpf package not found in the workspace"))?;
    let root = pkg.manifest_path.parent().expect("manifest has a parent").to_string();
    // The common crate is a path dependency; rebuild when it changes too.
    println!("cargo:rerun-if-changed={root}/../common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "dataplane-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
