//! Every filesystem path the relay uses by default, in one place (bpfman `directories`).

/// Configuration file read by relayd when `--config` is not given.
pub const CONFIG_FILE: &str = "/etc/relay/relay.toml";
/// Unix socket of the local control API (relayctl talks to it).
pub const CONTROL_SOCKET: &str = "/run/relay/control.sock";
/// bpffs directory where the XDP maps are pinned.
pub const PIN_DIR: &str = "/sys/fs/bpf/relay";
/// The state store, in the unit's StateDirectory.
pub const STATE_FILE: &str = "/var/lib/relay/state.redb";
/// Root of the BPF filesystem; mounted by relayd when missing.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Default configuration shipped with the package, also used when CONFIG_FILE is absent.
pub const DEFAULT_CONFIG: &str = include_str!("../../packaging/relay.toml");
