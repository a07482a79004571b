//! What a test run that was killed (a timeout, a machine shut down mid-run) could not clean
//! up: its network namespaces (every test namespace's name starts with `rt-`, tests/src
//! netns.rs), its pin directories under /sys/fs/bpf (`relay-test-`) and the relayd
//! processes it started. Each test removes its own on drop; only a killed process leaves
//! them. `cargo xtask test` sweeps them first, unless test binaries are running now.

use std::path::{Path, PathBuf};

use crate::util::{output, step};

const NETNS_PREFIX: &str = "rt-";
const PIN_PREFIX: &str = "relay-test-";

/// Executables of running processes, by pid.
fn executables() -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(entry.path().join("exe")).ok()?;
            Some((pid, exe))
        })
        .collect()
}

/// Removes what killed test runs left, and says what it removed.
pub fn sweep(target_dir: &Path) {
    let running = executables();
    let me = std::process::id();
    let deps = target_dir.join("debug").join("deps");
    if running
        .iter()
        .any(|(pid, exe)| *pid != me && exe.parent() == Some(deps.as_path()))
    {
        step("test binaries are running: leftovers of earlier runs are not swept");
        return;
    }
    let relayd = target_dir.join("debug").join("relayd");
    let orphans: Vec<u32> = running
        .iter()
        .filter(|(_, exe)| *exe == relayd)
        .map(|(pid, _)| *pid)
        .collect();
    for pid in &orphans {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let namespaces: Vec<String> = output("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(NETNS_PREFIX))
        .map(str::to_owned)
        .collect();
    for name in &namespaces {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .status();
    }
    let pins: Vec<PathBuf> = std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(PIN_PREFIX))
        .map(|entry| entry.path())
        .collect();
    for pin in &pins {
        let _ = std::fs::remove_dir_all(pin);
    }
    if !(orphans.is_empty() && namespaces.is_empty() && pins.is_empty()) {
        step(&format!(
            "removed what a killed test run left: {} relayd processes, {} network namespaces ({}), {} pin directories",
            orphans.len(),
            namespaces.len(),
            namespaces.join(" "),
            pins.len()
        ));
    }
}
