//! `cargo xtask deb`: the Debian package, built with dpkg-deb from a staged tree: relayd
//! and relayctl (release; the XDP object is embedded in relayd), the systemd unit, the
//! configuration as a conffile, man pages and shell completions generated from the clap
//! definitions, and the maintainer scripts in packaging/deb/.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{self, step};

/// The binaries of the package, from the release build in the target directory.
const BINARIES: &[&str] = &["relayd", "relayctl"];

/// Files of the package from the workspace: (path in the package, mode), besides the
/// binaries and the generated ones.
const COPIED: &[(&str, &str, u32)] = &[
    (
        "packaging/relayd.service",
        "lib/systemd/system/relayd.service",
        0o644,
    ),
    ("packaging/relay.toml", "etc/relay/relay.toml", 0o644),
    (
        "packaging/deb/copyright",
        "usr/share/doc/relay/copyright",
        0o644,
    ),
    ("README.md", "usr/share/doc/relay/README.md", 0o644),
    (
        "docs/control-api.md",
        "usr/share/doc/relay/control-api.md",
        0o644,
    ),
];

const MAINTAINER_SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

/// Builds the package; returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    util::build_release_binaries()?;
    let root = util::workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = util::output("dpkg", &["--print-architecture"])
        .context("dpkg --print-architecture (is this Debian?)")?
        .trim()
        .to_owned();
    let out_dir = root.join("target/deb");
    let stage = out_dir.join(format!("relay_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cleaning {}", stage.display()))?;
    }
    step(&format!("staging the package in {}", stage.display()));
    for (from, to, mode) in COPIED {
        install(&root.join(from), &stage.join(to), *mode)?;
    }
    let release = util::target_dir().join("release");
    for binary in BINARIES {
        install(
            &release.join(binary),
            &stage.join("usr/bin").join(binary),
            0o755,
        )?;
    }
    let relayd = release.join("relayd");
    let relayctl = release.join("relayctl");
    generated(&relayd, &["--generate"], "relayd", "8", &stage)?;
    generated(&relayctl, &["generate"], "relayctl", "1", &stage)?;

    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    for script in MAINTAINER_SCRIPTS {
        install(
            &root.join("packaging/deb").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    fs::write(debian.join("conffiles"), "/etc/relay/relay.toml\n")?;
    let control = fs::read_to_string(root.join("packaging/deb/control.in"))?
        .replace("@VERSION@", version)
        .replace("@ARCH@", &arch)
        .replace("@INSTALLED_SIZE@", &(tree_size(&stage)? / 1024).to_string())
        .replace("@DEPENDS@", &shared_library_depends(&[&relayd, &relayctl])?);
    fs::write(debian.join("control"), control)?;

    let deb = out_dir.join(format!("relay_{version}_{arch}.deb"));
    step(&format!("dpkg-deb --build -> {}", deb.display()));
    util::run(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "-Zxz",
            "--build",
            stage.to_str().expect("utf-8 path"),
            deb.to_str().expect("utf-8 path"),
        ],
    )?;
    let size = fs::metadata(&deb)?.len();
    step(&format!(
        "built {} ({:.1} MiB); install with: apt install ./{}",
        deb.display(),
        size as f64 / (1024.0 * 1024.0),
        deb.file_name().unwrap().to_string_lossy()
    ));
    Ok(deb)
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(to.parent().expect("a file in a directory"))?;
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The man page (gzipped, section `section`) and bash, zsh and fish completions of `name`,
/// from the binary itself.
fn generated(
    binary: &Path,
    command: &[&str],
    name: &str,
    section: &str,
    stage: &Path,
) -> anyhow::Result<()> {
    let run = |what: &str| -> anyhow::Result<Vec<u8>> {
        let output = Command::new(binary)
            .args(command)
            .arg(what)
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if !output.status.success() {
            bail!(
                "{} {} {what}: {}",
                binary.display(),
                command.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output.stdout)
    };
    let man_dir = stage.join(format!("usr/share/man/man{section}"));
    fs::create_dir_all(&man_dir)?;
    let page = man_dir.join(format!("{name}.{section}"));
    fs::write(&page, run("man")?)?;
    // -n: no name or time stamp inside, so the same sources give the same package.
    util::run("gzip", &["-9nf", page.to_str().expect("utf-8 path")])?;
    for (shell, path) in [
        (
            "bash",
            format!("usr/share/bash-completion/completions/{name}"),
        ),
        ("zsh", format!("usr/share/zsh/vendor-completions/_{name}")),
        (
            "fish",
            format!("usr/share/fish/vendor_completions.d/{name}.fish"),
        ),
    ] {
        let path = stage.join(path);
        fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        fs::write(&path, run(shell)?)?;
    }
    Ok(())
}

/// Bytes of the files under `dir` (for Installed-Size).
fn tree_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        total += if metadata.is_dir() {
            tree_size(&entry.path())?
        } else {
            metadata.len()
        };
    }
    Ok(total)
}

/// The Depends of the binaries' shared libraries: the Debian packages that ship them (by
/// `dpkg -S`), with the highest GLIBC symbol version they need as libc6's lower bound.
fn shared_library_depends(binaries: &[&Path]) -> anyhow::Result<String> {
    let mut packages: Vec<String> = Vec::new();
    let mut glibc = (2u32, 17u32);
    for binary in binaries {
        let path = binary.to_str().expect("utf-8 path");
        let needed = util::output("objdump", &["-p", path]).context("objdump -p")?;
        for library in needed
            .lines()
            .filter_map(|line| line.trim().strip_prefix("NEEDED"))
            .map(str::trim)
        {
            let owner = util::output("sh", &["-c", &format!("dpkg -S '*/{library}' | head -1")])
                .and_then(|line| line.split(':').next().map(str::to_owned))
                .with_context(|| format!("which package ships {library}"))?;
            if !packages.contains(&owner) {
                packages.push(owner);
            }
        }
        let symbols = util::output("objdump", &["-T", path]).context("objdump -T")?;
        for version in symbols
            .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
            .filter_map(|word| word.strip_prefix("GLIBC_"))
        {
            let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            glibc = glibc.max(found);
        }
    }
    packages.sort();
    Ok(packages
        .iter()
        .map(|package| {
            if package == "libc6" {
                format!("libc6 (>= {}.{})", glibc.0, glibc.1)
            } else {
                package.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", "))
}
