//! Builds the XDP program (relay-ebpf) with the nightly toolchain and bpf-linker, and leaves the
//! object in OUT_DIR for `include_bytes_aligned!`. Cargo reruns this only when relay-ebpf or
//! relay-common changed, so the object is not rebuilt needlessly.

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../relay-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../relay-common")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "relay-ebpf",
            root_dir: ebpf_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::Nightly,
    )
}
