//! The Debian package in a clean Debian root (debootstrap, minbase with systemd, as on an
//! edge box; systemd is not running in it): dpkg installs it (the
//! maintainer scripts create the service user and the state directory), the binaries run
//! there (`relayd --version`, `relayd --check` on the shipped configuration, `relayctl
//! --help`), systemd-analyze accepts the unit, and purge leaves no file, user or group
//! behind. The package is the one `cargo xtask test` builds and names in RELAY_DEB.
//!
//! The root is made once with debootstrap (a few minutes) and kept as a tarball under
//! target/test-roots; each run unpacks a fresh copy and removes it, also when it fails.

use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use relay_tests::{require_root, unique};

/// The Debian release of the clean root: the one this machine and CI run.
const SUITE: &str = "bookworm";

/// A clean Debian root, removed on drop.
struct CleanRoot {
    path: PathBuf,
}

impl CleanRoot {
    fn new() -> CleanRoot {
        let tarball = cached_root_tarball();
        let path = env::temp_dir().join(unique("relay-clean-root-"));
        fs::create_dir_all(&path).unwrap();
        let root = CleanRoot { path };
        let output = Command::new("tar")
            .args(["-xpf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&root.path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "unpacking {}: {output:?}",
            tarball.display()
        );
        root
    }

    /// Runs a command inside the root with a clean environment.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("chroot")
            .arg(&self.path)
            .args([
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C",
            ])
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("chroot {}: {err}", args.join(" ")))
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{} failed in the clean root: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Every path in the root, but dpkg's own records, logs, caches and /tmp, which
    /// installing and purging any package changes.
    fn files(&self) -> BTreeSet<String> {
        let mut files = BTreeSet::new();
        walk(&self.path, &self.path, &mut files);
        files
    }
}

impl Drop for CleanRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

const NOT_COMPARED: &[&str] = &[
    "proc",
    "sys",
    "dev",
    "tmp",
    "var/lib/dpkg",
    "var/log",
    "var/cache",
];

fn walk(root: &Path, dir: &Path, files: &mut BTreeSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let relative = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if NOT_COMPARED.contains(&relative.as_str()) {
            continue;
        }
        // shadow's backups of the files useradd and userdel rewrite.
        if ["etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"].contains(&relative.as_str())
        {
            continue;
        }
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        files.insert(relative);
        if is_dir {
            walk(root, &path, files);
        }
    }
}

/// target/test-roots/<suite>-minbase-systemd.tar, made with debootstrap when missing.
fn cached_root_tarball() -> PathBuf {
    let exe = env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let dir = target.join("test-roots");
    let tarball = dir.join(format!("{SUITE}-minbase-systemd.tar"));
    if tarball.exists() {
        return tarball;
    }
    fs::create_dir_all(&dir).unwrap();
    let staging = dir.join(unique("debootstrap-"));
    let mirror = env::var("RELAY_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_owned());
    eprintln!(
        "making a clean {SUITE} root with debootstrap from {mirror} (once; cached in {})",
        tarball.display()
    );
    let output = Command::new("debootstrap")
        // systemd's units let systemd-analyze verify the unit against the root.
        .args(["--variant=minbase", "--include=systemd", SUITE])
        .arg(&staging)
        .arg(&mirror)
        .output()
        .expect("debootstrap (apt-get install debootstrap)");
    if !output.status.success() {
        let _ = fs::remove_dir_all(&staging);
        panic!(
            "debootstrap failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let partial = tarball.with_extension("partial");
    let output = Command::new("tar")
        .arg("-cpf")
        .arg(&partial)
        .arg("-C")
        .arg(&staging)
        .arg(".")
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&staging);
    assert!(output.status.success(), "tar: {output:?}");
    fs::rename(&partial, &tarball).unwrap();
    tarball
}

#[test]
fn the_package_installs_runs_and_purges_cleanly_in_a_clean_debian_root() {
    require_root();
    let deb = PathBuf::from(env::var("RELAY_DEB").expect(
        "RELAY_DEB names the package to test: cargo xtask test builds it and sets it (or build it with cargo xtask deb)",
    ));
    assert!(deb.exists(), "{} does not exist", deb.display());
    let root = CleanRoot::new();
    let before = root.files();
    let passwd_before = fs::read_to_string(root.path.join("etc/passwd")).unwrap();
    let group_before = fs::read_to_string(root.path.join("etc/group")).unwrap();
    fs::copy(&deb, root.path.join("tmp/relay.deb")).unwrap();

    let installed = root.run_ok(&["dpkg", "-i", "/tmp/relay.deb"]);
    assert!(
        installed.contains("systemctl enable --now relayd"),
        "the first install says what to do next: {installed}"
    );
    assert_eq!(
        root.run_ok(&["relayd", "--version"]),
        format!("relayd {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        root.run_ok(&["relayd", "--check"]),
        "relayd: /etc/relay/relay.toml (with command-line/environment overrides): configuration is valid\n"
    );
    assert!(
        root.run_ok(&["relayctl", "--help"])
            .contains("Manage the media relay")
    );
    // relayctl without relayd: exit 3, says why.
    let unreachable = root.run(&["relayctl", "status"]);
    assert_eq!(unreachable.status.code(), Some(3), "{unreachable:?}");

    let user = root.run_ok(&["getent", "passwd", "relay"]);
    assert!(user.contains(":/var/lib/relay:/usr/sbin/nologin"), "{user}");
    assert_eq!(
        root.run_ok(&[
            "stat",
            "-c",
            "%U:%G %a",
            "/var/lib/relay",
            "/etc/relay/relay.toml"
        ]),
        "relay:relay 750\nroot:relay 640\n"
    );
    for file in [
        "usr/share/man/man8/relayd.8.gz",
        "usr/share/man/man1/relayctl.1.gz",
        "usr/share/bash-completion/completions/relayctl",
        "usr/share/zsh/vendor-completions/_relayctl",
        "usr/share/fish/vendor_completions.d/relayctl.fish",
        "lib/systemd/system/relayd.service",
        "usr/share/doc/relay/copyright",
    ] {
        assert!(root.path.join(file).exists(), "{file} is missing");
    }
    let conffiles = root.run_ok(&["dpkg-query", "-W", "-f", "${Conffiles}", "relay"]);
    assert!(conffiles.contains("/etc/relay/relay.toml"), "{conffiles}");

    // The unit, with the root's binaries.
    let unit = root.path.join("lib/systemd/system/relayd.service");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path.display()))
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    root.run_ok(&["dpkg", "--purge", "relay"]);
    let _ = fs::remove_file(root.path.join("tmp/relay.deb"));
    let after = root.files();
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "purge left the root changed: added {added:?}, removed {removed:?}"
    );
    assert_eq!(
        fs::read_to_string(root.path.join("etc/passwd")).unwrap(),
        passwd_before
    );
    assert_eq!(
        fs::read_to_string(root.path.join("etc/group")).unwrap(),
        group_before
    );
}
