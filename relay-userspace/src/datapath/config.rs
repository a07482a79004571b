//! The `[datapath]` and `[flows]` sections: which datapath, the interfaces XDP attaches to,
//! where its maps are pinned, the flow table's capacity and the idle timeout.

use std::path::PathBuf;

use serde::Deserialize;

use crate::paths;

/// A `port_range` value, "FIRST-LAST" with 1 <= FIRST <= LAST (the relay's ports for TURN
/// allocations, calls and ng calls).
pub fn port_range(text: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (first, last) = text.split_once('-')?;
    let (first, last): (u16, u16) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first > 0 && first <= last).then_some(first..=last)
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    Auto,
    Xdp,
    Userspace,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeChoice {
    Auto,
    Native,
    Generic,
}

impl XdpModeChoice {
    /// Whether an attachment in `mode` ("native"/"generic") is what this choice asks for.
    pub fn accepts(self, mode: &str) -> bool {
        match self {
            XdpModeChoice::Auto => true,
            XdpModeChoice::Native => mode == "native",
            XdpModeChoice::Generic => mode == "generic",
        }
    }
}

/// Where a bridged call's transcrypted media goes: AF_XDP workers (the XDP program steers
/// the packets to them) or the relay's sockets.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TranscryptPath {
    /// AF_XDP workers with the XDP datapath when their sockets open; sockets otherwise.
    Auto,
    /// AF_XDP workers, or relayd does not start.
    AfXdp,
    Sockets,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    pub mode: DatapathMode,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeChoice,
    pub pin_dir: PathBuf,
    pub capacity: u32,
    pub transcrypt: TranscryptPath,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            mode: DatapathMode::Auto,
            interfaces: Vec::new(),
            xdp_mode: XdpModeChoice::Auto,
            pin_dir: PathBuf::from(paths::PIN_DIR),
            capacity: relay_common::FLOWS_DEFAULT_CAPACITY,
            transcrypt: TranscryptPath::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FlowsConfig {
    pub idle_timeout_secs: u64,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        FlowsConfig {
            idle_timeout_secs: 60,
        }
    }
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// The flow table is a preallocated BPF hash map: keep it within what a relay box can lock.
const MAX_CAPACITY: u32 = 16 * 1024 * 1024;

impl DatapathConfig {
    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        let mut seen = Vec::new();
        for name in &self.interfaces {
            if name.is_empty() || name.len() > MAX_IFNAME_LEN {
                problem(
                    "datapath.interfaces",
                    format!("{name:?}"),
                    "an interface name has 1 to 15 characters",
                );
            } else if name.contains(['/', ' ', ':']) || name == "." || name == ".." {
                problem(
                    "datapath.interfaces",
                    format!("{name:?}"),
                    "not a valid interface name",
                );
            } else if seen.contains(&name) {
                problem("datapath.interfaces", format!("{name:?}"), "listed twice");
            }
            seen.push(name);
        }
        if self.mode == DatapathMode::Xdp && self.interfaces.is_empty() {
            problem(
                "datapath.interfaces",
                "[]".to_owned(),
                "mode \"xdp\" needs at least one interface to attach to",
            );
        }
        if self.transcrypt == TranscryptPath::AfXdp && self.mode == DatapathMode::Userspace {
            problem(
                "datapath.transcrypt",
                "\"af_xdp\"".to_owned(),
                "AF_XDP workers need the XDP datapath (mode \"xdp\" or \"auto\")",
            );
        }
        if !self.pin_dir.is_absolute() {
            problem(
                "datapath.pin_dir",
                self.pin_dir.display().to_string(),
                "must be an absolute path",
            );
        }
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            problem(
                "datapath.capacity",
                self.capacity.to_string(),
                &format!("must be between 1 and {MAX_CAPACITY}"),
            );
        }
    }
}

impl FlowsConfig {
    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if self.idle_timeout_secs == 0 || self.idle_timeout_secs > 86_400 {
            problem(
                "flows.idle_timeout_secs",
                self.idle_timeout_secs.to_string(),
                "must be between 1 and 86400 seconds",
            );
        }
    }
}
