//! Builds the XDP program (relay-ebpf) with the nightly toolchain and bpf-linker, and leaves the
//! object in OUT_DIR for `include_bytes_aligned!`. Cargo reruns this only when relay-ebpf or
//! relay-common changed, so the object is not rebuilt needlessly.

fn main() -> anyhow::Result<()> {
    // Read when the script runs, not when it was compiled: two checkouts sharing one target
    // directory share this script's binary, and each must build its own relay-ebpf.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../relay-ebpf");
    println!("cargo:rerun-if-changed={manifest_dir}/../relay-common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "relay-ebpf",
            root_dir: &ebpf_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::Nightly,
    )
}
