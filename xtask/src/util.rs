//! Running commands with a visible step line.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

pub fn step(message: &str) {
    eprintln!("\x1b[1m==>\x1b[0m {message}");
}

/// Where cargo builds: `CARGO_TARGET_DIR` when set, else the workspace's `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs a command, inheriting stdio; fails with the command line when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None when it cannot run or fails.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Builds relayd and relayctl in release mode: what the package ships and the trial runs.
pub fn build_release_binaries() -> anyhow::Result<()> {
    cargo(
        &[
            "build",
            "-p",
            "relay-userspace",
            "--bin",
            "relayd",
            "--bin",
            "relayctl",
        ],
        true,
    )
}

pub fn cargo(args: &[&str], release: bool) -> anyhow::Result<()> {
    let mut full: Vec<&str> = args.to_vec();
    if release {
        full.push("--release");
    }
    step(&format!("cargo {}", full.join(" ")));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&full)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed: {status}", full.join(" "));
    }
    Ok(())
}

/// Replaces this process with `program` (so signals reach it directly).
pub fn exec(program: &Path, args: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let err = Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("starting {}", program.display()))
}

pub fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|uid| uid.trim() == "0")
}
