//! Messages of the control API, version 1 (docs/control-api.md).
//!
//! A request is one JSON object per line: `{"version":1,"id":N,"method":"...","params":{...}}`.
//! The answer is one line with the same `id` and either `result` or `error`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datapath::{ChannelOp, DatapathStats, DatapathStatus, table::FlowInfo};

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
    pub allocations: Vec<crate::turn::driver::AllocationReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallsListResult {
    pub calls: Vec<crate::calls::CallInfo>,
}

/// `calls.show`, `calls.hangup`: one call by its number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallIdParams {
    pub call: u64,
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
    pub turn: Option<crate::turn::driver::TurnStatus>,
    /// Absent when the signalling rendezvous is not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signalling: Option<crate::signalling::server::SignallingStatus>,
    /// Calls in progress; absent when calls are not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<usize>,
    /// The ICE port every call's app leg shares, when calls are enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_ice: Option<std::net::SocketAddr>,
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
