//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the fuzz targets (fuzz/, cargo-fuzz
//! and libFuzzer on the nightly toolchain) for N seconds each, seeded from the fixtures and
//! fuzz/seeds, and prints a table: target, executions, corpus, crashes. Fails when a target
//! crashed (a panic or a broken invariant), naming the input that did it.
//!
//! The targets are built without a sanitizer: the parsers are safe Rust, and cargo-fuzz
//! keeps debug assertions and overflow checks on. The corpus grows in fuzz/corpus (not
//! committed); crashing inputs land in fuzz/artifacts.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{self, output, step};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Each target and the directories (from the workspace root) its corpus starts from.
const TARGETS: &[(&str, &[&str])] = &[
    ("stun_decode", &["fuzz/seeds/stun_decode"]),
    ("turn_server", &["fuzz/seeds/turn_server"]),
    ("sdp_rewrite", &["fixtures/sdp"]),
    ("signalling_parse", &["fuzz/seeds/signalling_parse"]),
    ("config_parse", &["fuzz/seeds/config_parse"]),
    ("ng_request", &["fuzz/seeds/ng_request"]),
    ("control_request", &["fuzz/seeds/control_request"]),
    ("srtp_unprotect", &["fuzz/seeds/srtp_unprotect"]),
    ("worker_frame", &["fuzz/seeds/worker_frame"]),
];

struct Outcome {
    target: &'static str,
    executions: Option<u64>,
    per_second: Option<u64>,
    corpus: usize,
    crashes: Vec<PathBuf>,
}

pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    if let Some(unknown) = only
        .iter()
        .find(|name| !TARGETS.iter().any(|(target, _)| target == name))
    {
        bail!(
            "no fuzz target {unknown:?}; the targets are {}",
            TARGETS
                .iter()
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    ensure_cargo_fuzz()?;
    let root = util::workspace_root();
    step("building the fuzz targets (nightly, no sanitizer)");
    let status = cargo_fuzz(&root)
        .args(["build", "--fuzz-dir", "fuzz", "--sanitizer", "none"])
        .status()
        .context("running cargo +nightly fuzz build")?;
    if !status.success() {
        bail!("building the fuzz targets failed: {status}");
    }
    let mut outcomes = Vec::new();
    for (target, seeds) in TARGETS {
        if !only.is_empty() && !only.iter().any(|name| name == target) {
            continue;
        }
        step(&format!("fuzzing {target} for {seconds} s"));
        outcomes.push(fuzz(&root, target, seeds, seconds)?);
    }
    print_table(&outcomes);
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.crashes.is_empty()).collect();
    if !crashed.is_empty() {
        let lines: Vec<String> = crashed
            .iter()
            .flat_map(|outcome| {
                outcome.crashes.iter().map(move |input| {
                    format!(
                        "  {}: {} (replay: cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none {} {})",
                        outcome.target,
                        input.display(),
                        outcome.target,
                        input.display()
                    )
                })
            })
            .collect();
        bail!("fuzzing found crashes:\n{}", lines.join("\n"));
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if output("cargo", &["+nightly", "fuzz", "--version"]).is_some() {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}: installing"));
    util::run(
        "cargo",
        &[
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ],
    )
}

/// `cargo +nightly fuzz` in the workspace root, with none of the stable toolchain's
/// variables that `cargo xtask` was started with.
fn cargo_fuzz(root: &Path) -> Command {
    let mut command = Command::new("cargo");
    command
        .arg("+nightly")
        .arg("fuzz")
        .current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO");
    command
}

fn fuzz(
    root: &Path,
    target: &'static str,
    seeds: &[&str],
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let corpus = root.join("fuzz/corpus").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("creating {}", artifacts.display()))?;
    for seed_dir in seeds {
        for seed in files(&root.join(seed_dir))? {
            let name = seed.file_name().expect("a file name");
            let copy = corpus.join(name);
            if !copy.exists() {
                std::fs::copy(&seed, &copy)
                    .with_context(|| format!("seeding {}", copy.display()))?;
            }
        }
    }
    let before = files(&artifacts)?;
    let result = cargo_fuzz(root)
        .args(["run", "--fuzz-dir", "fuzz", "--sanitizer", "none", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .output()
        .with_context(|| format!("running the fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&result.stderr);
    let crashes: Vec<PathBuf> = files(&artifacts)?
        .into_iter()
        .filter(|file| !before.contains(file))
        .collect();
    if !result.status.success() && crashes.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        bail!(
            "the fuzz target {target} failed without leaving an input ({}):\n{}",
            result.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(Outcome {
        target,
        executions: stat(&log, "stat::number_of_executed_units"),
        per_second: stat(&log, "stat::average_exec_per_sec"),
        corpus: files(&corpus)?.len(),
        crashes,
    })
}

/// The files directly in `dir` (none when it does not exist), sorted.
fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// A `-print_final_stats` value of libFuzzer's.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|line| {
        line.strip_prefix(name)?
            .trim_start_matches(':')
            .trim()
            .parse()
            .ok()
    })
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<18} {:>12} {:>10} {:>8} {:>8}",
        "target", "executions", "exec/s", "corpus", "crashes"
    );
    for outcome in outcomes {
        let shown = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
        println!(
            "{:<18} {:>12} {:>10} {:>8} {:>8}",
            outcome.target,
            shown(outcome.executions),
            shown(outcome.per_second),
            outcome.corpus,
            outcome.crashes.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read_from_libfuzzers_log() {
        let log = "Done 1234 runs in 2 second(s)\nstat::number_of_executed_units: 1234\nstat::average_exec_per_sec:     617\n";
        assert_eq!(stat(log, "stat::number_of_executed_units"), Some(1234));
        assert_eq!(stat(log, "stat::average_exec_per_sec"), Some(617));
        assert_eq!(stat(log, "stat::peak_rss_mb"), None);
    }
}
