//! The flow-table API: one trait, two datapaths (`xdp`: the kernel maps; `userspace`: tokio
//! sockets), chosen by `datapath.mode`.

mod batch;
pub mod config;
pub mod flow;
// For unit tests and the fuzz targets (cargo-fuzz builds with `--cfg fuzzing`).
#[cfg(any(test, fuzzing))]
pub mod memory;
pub mod table;
pub mod userspace;
pub mod worker;
pub mod xdp;
mod xsk;

use std::{io, net::SocketAddr};

use tokio::runtime::Handle;

use self::config::{DatapathConfig, DatapathMode};
pub use self::flow::{ChannelOp, FlowSpec, FlowSpecError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathKind {
    Xdp,
    Userspace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// "native" or "generic".
    pub xdp_mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathStatus {
    pub kind: DatapathKind,
    pub interfaces: Vec<InterfaceStatus>,
    pub capacity: u32,
    /// Why "auto" fell back to userspace, when it did.
    pub fallback_reason: Option<String>,
    pub pin_dir: Option<String>,
    /// The AF_XDP workers, when bridged media takes them; else the sockets carry it.
    pub workers: Option<worker::WorkersStatus>,
    /// Why `transcrypt = "auto"` left bridged media on the sockets with the XDP datapath.
    pub workers_reason: Option<String>,
}

/// Counters of one flow: packets forwarded by the XDP program and by the userspace path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub xdp_packets: u64,
    pub xdp_bytes: u64,
    pub userspace_packets: u64,
    pub userspace_bytes: u64,
    /// CLOCK_MONOTONIC ns of the last packet on either path (0: none yet).
    pub last_seen_ns: u64,
}

impl FlowCounters {
    pub fn packets(&self) -> u64 {
        self.xdp_packets + self.userspace_packets
    }

    pub fn bytes(&self) -> u64 {
        self.xdp_bytes + self.userspace_bytes
    }

    pub fn merge(self, other: FlowCounters) -> FlowCounters {
        FlowCounters {
            xdp_packets: self.xdp_packets + other.xdp_packets,
            xdp_bytes: self.xdp_bytes + other.xdp_bytes,
            userspace_packets: self.userspace_packets + other.userspace_packets,
            userspace_bytes: self.userspace_bytes + other.userspace_bytes,
            last_seen_ns: self.last_seen_ns.max(other.last_seen_ns),
        }
    }
}

/// Packets and bytes the XDP program counted for one verdict, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictCount {
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of the userspace socket path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketStats {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    /// Packets to a relay address from a source no flow names (strict source).
    pub unknown_source_packets: u64,
    /// ChannelData whose Length runs past the packet, dropped.
    pub malformed_packets: u64,
    pub send_errors: u64,
    pub bound_sockets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathStats {
    /// Empty for the userspace datapath.
    pub verdicts: Vec<VerdictCount>,
    pub userspace: SocketStats,
}

/// Who handles the packets of a flow that the kernel passes up (no neighbour entry yet,
/// padding, ...): relayd's own sockets on the flow's relay addresses, or another component
/// that owns those addresses (the TURN server's listening and relay sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPath {
    Sockets,
    External,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "{field}: {addr}: cannot bind a UDP socket: {source} (is it an address of this host, and free?)"
    )]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("kernel flow map: {0}")]
    Map(String),
    #[error("the userspace datapath cannot offload flows whose sockets another component owns")]
    Unsupported,
}

impl DatapathError {
    /// The flow field the error concerns, if any.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            DatapathError::Bind { field, .. } => Some(field),
            DatapathError::Map(_) | DatapathError::Unsupported => None,
        }
    }
}

/// What both datapaths implement. Capacity, duplicate keys and ids are the table's business
/// ([`table::FlowTable`]); a datapath installs, removes and counts.
pub trait Datapath: Send + Sync {
    fn status(&self) -> DatapathStatus;
    /// Installs `spec` or replaces the flow with the same key in place (its kernel counters are
    /// kept).
    fn install(
        &self,
        id: u32,
        generation: u32,
        spec: &FlowSpec,
        slow_path: SlowPath,
    ) -> Result<(), DatapathError>;
    fn remove(&self, spec: &FlowSpec);
    fn counters(&self, spec: &FlowSpec) -> FlowCounters;
    /// The counters of each of `flows` (id, spec), in order: what the flow table's tick
    /// reads of every flow at once (the XDP datapath reads its map in a few system calls).
    /// Cheapest with the ids in increasing order, as the table keeps them.
    fn counters_of(&self, flows: &[(u32, FlowSpec)]) -> Vec<FlowCounters> {
        flows.iter().map(|(_, spec)| self.counters(spec)).collect()
    }
    fn stats(&self) -> DatapathStats;
    /// Flows found in the datapath at start-up (pinned kernel maps): `(id, generation, spec)`.
    fn installed(&self) -> Vec<(u32, u32, FlowSpec)>;
    /// The AF_XDP transcryption workers, when this datapath has them.
    fn workers(&self) -> Option<&worker::Workers> {
        None
    }
}

/// The userspace datapath.
pub struct UserspaceDatapath {
    forwarder: userspace::SocketForwarder,
    capacity: u32,
    fallback_reason: Option<String>,
}

impl Datapath for UserspaceDatapath {
    fn status(&self) -> DatapathStatus {
        DatapathStatus {
            kind: DatapathKind::Userspace,
            interfaces: Vec::new(),
            capacity: self.capacity,
            fallback_reason: self.fallback_reason.clone(),
            pin_dir: None,
            workers: None,
            workers_reason: None,
        }
    }

    fn install(
        &self,
        _id: u32,
        _generation: u32,
        spec: &FlowSpec,
        slow_path: SlowPath,
    ) -> Result<(), DatapathError> {
        match slow_path {
            SlowPath::Sockets => self.forwarder.install(spec),
            // The owner of the sockets relays these packets itself.
            SlowPath::External => Err(DatapathError::Unsupported),
        }
    }

    fn remove(&self, spec: &FlowSpec) {
        self.forwarder.remove(spec)
    }

    fn counters(&self, spec: &FlowSpec) -> FlowCounters {
        self.forwarder.counters(spec)
    }

    fn counters_of(&self, flows: &[(u32, FlowSpec)]) -> Vec<FlowCounters> {
        self.forwarder
            .counters_of(flows.iter().map(|(_, spec)| spec))
    }

    fn stats(&self) -> DatapathStats {
        DatapathStats {
            verdicts: Vec::new(),
            userspace: self.forwarder.stats(),
        }
    }

    fn installed(&self) -> Vec<(u32, u32, FlowSpec)> {
        Vec::new()
    }
}

/// Opens the datapath the configuration asks for. With `auto`, a failure to set up XDP is
/// logged with its reason and the userspace datapath is used instead.
pub fn open(config: &DatapathConfig, runtime: Handle) -> anyhow::Result<Box<dyn Datapath>> {
    let userspace = |fallback_reason| UserspaceDatapath {
        forwarder: userspace::SocketForwarder::new(runtime.clone()),
        capacity: config.capacity,
        fallback_reason,
    };
    match config.mode {
        DatapathMode::Userspace => Ok(Box::new(userspace(None))),
        DatapathMode::Xdp => Ok(Box::new(xdp::XdpDatapath::open(config, runtime.clone())?)),
        DatapathMode::Auto => {
            if config.interfaces.is_empty() {
                let reason = "no interfaces configured (datapath.interfaces is empty)".to_owned();
                tracing::warn!(
                    "datapath: using userspace: XDP not attempted: {reason}; list the WAN and LAN interfaces to forward media in the kernel"
                );
                return Ok(Box::new(userspace(Some(reason))));
            }
            match xdp::XdpDatapath::open(config, runtime.clone()) {
                Ok(datapath) => Ok(Box::new(datapath)),
                Err(err) => {
                    let reason = format!("{err:#}");
                    tracing::warn!("datapath: using userspace: XDP could not be set up: {reason}");
                    Ok(Box::new(userspace(Some(reason))))
                }
            }
        }
    }
}
