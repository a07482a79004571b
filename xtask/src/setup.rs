//! `cargo xtask setup`: the eBPF toolchain as ../shared/TOOLCHAIN.md describes it, idempotent,
//! saying what it does. Also the Debian tools the tests and benchmarks use.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::util::{self, output, step};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages -> a binary each provides, needed by tests and benchmarks.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("netsniff-ng", "trafgen"),
    // An independent TURN client, echo peer and server for the TURN interop tests.
    ("coturn", "turnutils_uclient"),
    // The NAT in front of the app in the edge lab (demo, calls).
    ("nftables", "nft"),
    // sipp: the SIP user agent behind the PBX in the calls tests (answers, echoes RTP).
    ("sip-tester", "sipp"),
    // rtpengine, the comparison in the anchor benchmark (in userspace mode, driven over ng).
    ("rtpengine-daemon", "rtpengine"),
    // rtpengine's Perl ng client: a second ng client, the relay's replies beside rtpengine's.
    ("rtpengine-utils", "rtpengine-ng-client"),
    // Kamailio and its rtpengine module: the SIP proxy driving the relay over ng.
    ("kamailio", "kamailio"),
    // A real browser as the WebRTC app (DTLS-SRTP, BUNDLE) in the calls tests.
    ("chromium", "chromium"),
    // A clean Debian root to install the package into, and the unit's verifier.
    ("debootstrap", "debootstrap"),
    ("systemd", "systemd-analyze"),
    // The Redis server the cluster tests' relays share.
    ("redis-server", "redis-server"),
];

pub fn run() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    ensure_bpf_linker(&sysroot)?;
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let Some(sysroot) = output("rustc", &["+nightly", "--print", "sysroot"]) else {
        bail!(
            "the nightly toolchain is missing (rustc +nightly does not run); it builds the XDP program"
        );
    };
    Ok(PathBuf::from(sysroot.trim()))
}

fn ensure_rust_src(sysroot: &Path) -> anyhow::Result<()> {
    let marker = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if marker.exists() {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("rust-src for nightly: installing with rustup");
    if util::run(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
    .is_ok()
    {
        return Ok(());
    }
    step("rustup could not install rust-src; trying the offline copy in ../shared/toolchain");
    let dir = util::workspace_root().join("../shared/toolchain");
    let expected_version = std::fs::read_to_string(dir.join("rustc-nightly-version.txt"))
        .context("reading ../shared/toolchain/rustc-nightly-version.txt")?;
    let actual_version = output("rustc", &["+nightly", "-vV"]).unwrap_or_default();
    if expected_version.trim() != actual_version.trim() {
        bail!("the offline rust-src is for\n{expected_version}\nbut nightly is\n{actual_version}");
    }
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).context("reading SHA256SUMS")?;
    let (sum, name) = sums
        .split_whitespace()
        .collect::<Vec<_>>()
        .chunks(2)
        .find_map(|pair| match pair {
            [sum, name] if name.starts_with("rust-src-") => {
                Some((sum.to_string(), name.to_string()))
            }
            _ => None,
        })
        .context("no rust-src archive in SHA256SUMS")?;
    let archive = dir.join(&name);
    let actual_sum = output("sha256sum", &[archive.to_str().unwrap()])
        .and_then(|line| line.split_whitespace().next().map(str::to_owned))
        .context("computing the archive's SHA-256")?;
    if actual_sum != sum {
        bail!(
            "{}: SHA-256 {actual_sum}, expected {sum}",
            archive.display()
        );
    }
    let rustlib = sysroot.join("lib/rustlib");
    util::run(
        "tar",
        &[
            "-xJf",
            archive.to_str().unwrap(),
            "-C",
            rustlib.to_str().unwrap(),
        ],
    )?;
    step(&format!(
        "rust-src unpacked from {name} (checksum verified)"
    ));
    Ok(())
}

/// bpf-linker must be built against the nightly toolchain's own LLVM (TOOLCHAIN.md): link
/// its libLLVM into a prefix that stays, and build with LLVM_PREFIX pointing there.
fn ensure_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    if let Some(version) = output("bpf-linker", &["--version"]) {
        step(&format!("bpf-linker: present ({})", version.trim()));
        return Ok(());
    }
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let prefix = cargo_home.join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let nightly_lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&nightly_lib)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", nightly_lib.display()))?;
    for link in [lib.join(llvm.file_name().unwrap()), lib.join("libLLVM.so")] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against nightly's LLVM ({}) - about 2 minutes",
        llvm.display()
    ));
    let status = std::process::Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed: {status}");
    }
    Ok(())
}

/// Installs the Debian packages the tests and benchmarks run, when missing.
pub fn test_tools() -> anyhow::Result<()> {
    install_missing(TEST_PACKAGES)?;
    packaging_tools()
}

/// What `cargo xtask deb` runs besides cargo: dpkg-deb and gzip (in every Debian), objdump
/// for the shared-library dependencies.
const PACKAGING_PACKAGES: &[(&str, &str)] = &[("binutils", "objdump")];

pub fn packaging_tools() -> anyhow::Result<()> {
    install_missing(PACKAGING_PACKAGES)
}

/// Installs the Debian packages (package, binary it provides) whose binary is missing.
fn install_missing(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, binary)| output("sh", &["-c", &format!("command -v {binary}")]).is_none())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "missing test tools; install them: apt-get install {}",
            missing.join(" ")
        );
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    if util::run("apt-get", &args).is_err() {
        util::run("apt-get", &["update"])?;
        util::run("apt-get", &args)?;
    }
    Ok(())
}
