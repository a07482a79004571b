//! Messages of the control API, version 1 (docs/control-api.md).
//!
//! A request is one JSON object per line: `{"version":1,"id":N,"method":"...","params":{...}}`.
//! The answer is one line with the same `id` and either `result` or `error`.
//!
//! Every type on the wire is defined here and nowhere else; the server converts the
//! domain's types into them (`control/convert.rs`), so renaming a field inside relayd never
//! changes protocol v1 by accident. This module imports nothing of the crate.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the server reads; longer ones are refused.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub id: u64,
    pub method: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    /// The request's id, or 0 when the request could not be parsed far enough to have one.
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, not a request object, unknown method, or params of the wrong shape.
    BadRequest,
    UnsupportedVersion,
    /// A parameter has a value the relay refuses; `field` names it.
    InvalidArgument,
    NotFound,
    AlreadyExists,
    TableFull,
    /// The caller is not root, relayd's user or a member of the control socket's group.
    PermissionDenied,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

/// Methods and their parameters.
pub mod method {
    pub const STATUS: &str = "status";
    pub const STATS: &str = "stats";
    pub const FLOW_ADD: &str = "flow.add";
    pub const FLOW_DEL: &str = "flow.del";
    pub const FLOW_LIST: &str = "flow.list";
    pub const FLOW_SHOW: &str = "flow.show";
    pub const TURN_ALLOCATIONS: &str = "turn.allocations";
    pub const TURN_REVOKE: &str = "turn.revoke";
    pub const CONFIG_RELOAD: &str = "config.reload";
    pub const CALLS_LIST: &str = "calls.list";
    pub const CALLS_SHOW: &str = "calls.show";
    pub const CALLS_HANGUP: &str = "calls.hangup";
    pub const PUSH_STATS: &str = "push.stats";
    pub const CLUSTER_STATUS: &str = "cluster.status";
    pub const CLUSTER_FORGET: &str = "cluster.forget";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowAddParams {
    pub src: String,
    pub dst: String,
    pub new_src: String,
    pub new_dst: String,
    /// TURN ChannelData: `{"strip": N}` or `{"add": N}` (channel number N).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelOp>,
    /// Also add the reverse flow (new_dst -> new_src re-sent from dst to src, with the
    /// opposite channel operation).
    #[serde(default)]
    pub reverse: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowIdParams {
    pub id: u32,
}

/// Revoke the allocations of a user, or the one on a relay address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnRevokeParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TurnAllocationsResult {
    pub allocations: Vec<Allocation>,
}

/// Pushes that woke sleeping apps, by provider and outcome, and the devices registered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushStatsResult {
    pub devices: u64,
    pub pushes: Vec<PushCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushCount {
    pub provider: String,
    /// `sent`, `dead-token`, `refused`, `failed`.
    pub outcome: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallsListResult {
    pub calls: Vec<CallInfo>,
    /// Calls a SIP proxy set up over ng.
    #[serde(default)]
    pub ng_calls: Vec<NgCallListed>,
}

/// An ng call in `calls.list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NgCallListed {
    pub call_id: String,
    /// The caller's tag (`from-tag`), then the callee's (`to-tag`, empty until answered).
    pub tags: [String; 2],
    /// offered, answered.
    pub state: String,
    pub since_secs: u64,
    pub streams: usize,
    pub flows: Vec<u32>,
    /// Received from both sides, kernel and relayd's sockets.
    pub packets: u64,
    pub bytes: u64,
    /// The relay's ICE toward the sides (`ICE=force`), the worst stream's: waiting,
    /// checking, connected, failed; absent without ICE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ice: Option<String>,
}

/// `calls.show`, `calls.hangup`: one call by its number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallIdParams {
    pub call: u64,
}

/// `cluster.forget`: a member by its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterNodeParams {
    pub node: String,
}

/// What a reload changed: keys applied live, keys that wait for a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigReloadResult {
    pub applied: Vec<String>,
    pub needs_restart: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TurnRevokeResult {
    pub revoked: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowAddResult {
    pub ids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResult {
    pub relay_version: String,
    pub protocol_version: u32,
    pub uptime_secs: u64,
    pub datapath: DatapathStatus,
    pub flows: usize,
    pub idle_timeout_secs: u64,
    /// Absent when the TURN server is not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<TurnStatus>,
    /// Absent when the signalling rendezvous is not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signalling: Option<SignallingStatus>,
    /// Calls in progress; absent when calls are not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<usize>,
    /// The ICE port every call's app leg shares, when calls are enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_ice: Option<SocketAddr>,
    /// What the relay offers apps and the PBX (`calls.app_media`, `calls.pbx_media`) and
    /// its DTLS certificate's fingerprint, when calls are enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_media: Option<CallsMedia>,
    /// The TCP connections held, their limits and the refusals since the start.
    #[serde(default)]
    pub connections: ConnectionsStatus,
    /// This node in its cluster; absent when `[cluster]` is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSummary>,
}

/// This node's place in its cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub node: String,
    /// The Redis server, without its password.
    pub redis_url: String,
    /// `joining` (not tried yet), `up`, or `degraded` (Redis does not answer: the node
    /// serves its own sessions and calls only).
    pub redis: String,
    /// Seconds in that state.
    pub since_secs: u64,
    /// Why Redis is unavailable, when degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Members alive and in all, as last read.
    pub nodes_alive: usize,
    pub nodes: usize,
    /// The node this one is the standby of (`cluster.standby_for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_for: Option<String>,
    /// True while it stands by; false once it took that node's calls over.
    #[serde(default)]
    pub standing_by: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatusResult {
    #[serde(flatten)]
    pub summary: ClusterSummary,
    pub health_ttl_secs: u64,
    /// Seconds since the members were read; absent when they never were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_secs_ago: Option<u64>,
    pub members: Vec<ClusterNode>,
}

/// One member as its last record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub node: String,
    /// `alive`, `down` (its record expired) or `unreadable`.
    pub state: String,
    /// This relayd.
    pub this_node: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<ClusterLoad>,
    /// Why the record could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterLoad {
    pub version: String,
    pub uptime_secs: u64,
    /// Milliseconds from the record's writing to the read.
    pub record_age_ms: u64,
    pub calls: usize,
    pub allocations: usize,
    pub sessions: usize,
    pub flows: usize,
    pub cpu_percent: f64,
    /// Its `cluster.max_calls` (0: no limit).
    #[serde(default)]
    pub max_calls: usize,
    /// A standby that has not taken over (it anchors no calls).
    #[serde(default)]
    pub standby: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsStatus {
    pub open: u32,
    pub max_total: u32,
    pub max_per_source: u32,
    /// Closed at once: their source held `connections.max_per_source`.
    pub refused_per_source: u64,
    /// Closed at once: relayd held its total.
    pub refused_total: u64,
    /// Accepts that failed (out of file descriptors, mostly).
    pub accept_failures: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallsMedia {
    pub app_media: String,
    pub pbx_media: String,
    /// `sha-256 AB:CD:...`, as the relay's SDP toward apps says it.
    pub dtls_fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsResult {
    pub flows: usize,
    pub flows_expired: u64,
    #[serde(flatten)]
    pub datapath: DatapathStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowListResult {
    pub flows: Vec<FlowInfo>,
}

/// What a flow does with TURN ChannelData framing (RFC 8656 section 12): `{"strip": N}`,
/// `{"add": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOp {
    Strip(u16),
    Add(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    Xdp,
    Userspace,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// "native" or "generic".
    pub xdp_mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub kind: DatapathKind,
    pub interfaces: Vec<InterfaceStatus>,
    pub capacity: u32,
    /// Why "auto" fell back to userspace, when it did.
    pub fallback_reason: Option<String>,
    pub pin_dir: Option<String>,
    /// Where bridged calls' transcrypted media goes.
    #[serde(default)]
    pub transcrypt: TranscryptStatus,
}

/// The path of transcrypted media: AF_XDP workers, or the relay's sockets (with why, when
/// the workers were wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscryptStatus {
    /// "af_xdp" or "sockets".
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub sockets: Vec<WorkerSocket>,
    #[serde(default)]
    pub counters: WorkerCounters,
}

/// One AF_XDP socket of the workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSocket {
    pub interface: String,
    pub queue: u32,
    /// "zero-copy" or "copy".
    pub mode: String,
}

/// What the AF_XDP workers counted since relayd started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    pub received: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    pub unknown_flow: u64,
    pub refused: u64,
    pub malformed: u64,
    pub not_sent: u64,
    pub kernel_dropped: u64,
}

/// Packets and bytes the XDP program counted for one verdict, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCount {
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of the userspace socket path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStats {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub unknown_source_packets: u64,
    pub malformed_packets: u64,
    pub send_errors: u64,
    pub bound_sockets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStats {
    /// Empty for the userspace datapath.
    pub verdicts: Vec<VerdictCount>,
    pub userspace: SocketStats,
}

/// One direction of one leg: packets from `src` to `dst` are re-sent from `new_src` to
/// `new_dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSpec {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub new_src: SocketAddr,
    pub new_dst: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelOp>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rtcp_to_userspace: bool,
    /// The payload is someone's data (a TURN channel's), forwarded whatever its first byte.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opaque_payload: bool,
    /// A transcryption worker rewrites the packets (a bridged call's media).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub to_worker: bool,
}

/// Packets forwarded by the XDP program and by the userspace path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// `flow.show`, and each flow of `flow.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub id: u32,
    pub generation: u32,
    #[serde(flatten)]
    pub spec: FlowSpec,
    pub counters: FlowCounters,
    pub rate_pps: f64,
    pub idle_secs: f64,
}

/// The TURN server at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnStatus {
    pub listening: Vec<SocketAddr>,
    pub allocations: u64,
    pub channels: u64,
    /// Where allocations are kept across restarts; absent: they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_store: Option<String>,
    pub offload: bool,
    #[serde(default)]
    pub tcp: bool,
}

/// One TURN allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub username: String,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// udp, tcp, or tls (on the signalling port).
    pub transport: String,
    pub relays: Vec<SocketAddr>,
    pub expires_in_secs: u64,
    pub permissions: Vec<IpAddr>,
    pub channels: Vec<(u16, SocketAddr)>,
    pub offloaded_flows: usize,
    pub packets: u64,
    pub bytes: u64,
}

/// The signalling rendezvous at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignallingStatus {
    pub listening: SocketAddr,
    pub certificate_sha256: String,
    pub tenants: usize,
    pub controllers: usize,
    pub clients: usize,
    pub turn_over_tls: bool,
}

/// Packets and bytes in one direction of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// One call in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallInfo {
    pub call: u64,
    pub tenant: String,
    pub user: String,
    /// offered, connecting, connected.
    pub state: String,
    pub app: Option<SocketAddr>,
    pub ice: Option<SocketAddr>,
    pub lan: SocketAddr,
    pub pbx: Option<SocketAddr>,
    pub flows: Vec<u32>,
    pub app_candidate: Option<String>,
    pub since_secs: u64,
    pub packets: u64,
    pub bytes: u64,
    pub to_pbx: Traffic,
    pub to_app: Traffic,
    /// Each leg's media security: `pass-through` (the kernel forwards what the sides
    /// negotiated with each other) or what the relay terminates (`dtls-srtp`, `sdes-srtp`,
    /// `rtp`).
    #[serde(default)]
    pub app_security: String,
    #[serde(default)]
    pub pbx_security: String,
    /// A bridged call's media, which the relay carries itself.
    #[serde(default)]
    pub bridged: Option<BridgedMedia>,
    /// The streams anchored besides the audio (a bridged call's video).
    #[serde(default)]
    pub streams: Vec<CallStream>,
}

/// One of a call's streams besides its audio: its m-line (1 is the first), its media, the
/// relay's LAN address for it and the PBX's (None: refused, or not answered yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallStream {
    pub line: usize,
    pub media: String,
    pub lan: SocketAddr,
    pub pbx: Option<SocketAddr>,
}

/// What the relay did with a bridged call's packets.
fn not_dtls() -> String {
    "-".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgedMedia {
    /// The app's DTLS handshake: `connecting`, `connected`, `failed`, or `-` (not DTLS).
    pub dtls: String,
    /// The PBX's, likewise (a relayd from before PBX DTLS leaves it out: `-`).
    #[serde(default = "not_dtls")]
    pub pbx_dtls: String,
    /// The SRTP suite toward the app, once keyed.
    pub suite: Option<String>,
    /// Dropped: SRTP whose tag did not verify, replays, packets neither RTP nor RTCP.
    pub auth_failures: u64,
    pub replays: u64,
    pub malformed: u64,
    /// The flows that steer its media to the AF_XDP workers; empty: the call's sockets
    /// carry it.
    #[serde(default)]
    pub steered_flows: Vec<u32>,
}
