//! This relayd as one node of a cluster sharing a Redis server. Each node refreshes, every
//! third of `cluster.health_ttl_secs` and with that TTL:
//!
//! - its health record, `relay:node:<name>` (version, start, load), and its membership of
//!   the set `relay:nodes`; a member whose record has expired is down;
//! - its signalling sessions, `relay:sessions:<name>` (tenant, role, user of each);
//! - one key per connected call, `relay:call:<name>:<id>`: the record the state store
//!   keeps (SDPs, ICE credentials, selected pair, a bridged call's SRTP keys), rewritten when
//!   the calls changed and otherwise only given a new TTL; an ended call's key is deleted;
//! - its UDP TURN allocations, `relay:allocations:<name>` (one JSON array), written when
//!   they changed.
//!
//! The same round trip reads every member's health record, so the node's view of the
//! cluster is at most a refresh old.
//!
//! Signalling across nodes: a message whose recipient has no session on this node is
//! published on every other alive node's channel (`relay:inbox:<name>`); each hands it to
//! its sessions and answers on the sender's channel how many took it, so the sender gets
//! `delivered`, `busy` or `offline` as on one node.
//!
//! Calls across nodes: call ids are unique in the cluster (each node numbers its calls from
//! a base of its own, [`call_id_base`]), so a request for a call anchored elsewhere goes to
//! the one node whose ids it has, and its reply comes back the same way. A new call is
//! anchored where its app is connected (the node asks the others where that is), unless
//! that node anchors `cluster.max_calls` already: then on the least loaded node with room.
//! A call's events for a session on another node (the controller, or the app of a call
//! placed away from it) are published to the other nodes in order, without an answer.
//!
//! Takeover: a standby (`cluster.standby_for`) shares its active node's floating addresses
//! and anchors nothing while that node is alive. Once the active node's health record has
//! expired, the standby reads the node's call records (kept four health TTLs, so that they
//! outlive its health) and takes the calls over: the same addresses, ICE credentials and
//! selected pairs, the flows in its own XDP program; their sessions hear `call.state moved`.
//! Its TURN allocations likewise (relay sockets, permissions, channels and their flows).
//!
//! Redis is not needed to serve: when it does not answer
//! (at start or later) the node goes on with its own sessions and calls, says so in the log
//! and `relayctl status`, and rejoins at the first refresh that gets through, writing all
//! its keys again. A clean stop deletes the node's keys and membership; a node that dies
//! stays listed, down, once its record expires, and its keys expire with it.

pub mod config;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::time::{process_cpu_ns, unix_now, unix_now_ms};
use config::{ClusterConfig, redacted};

/// The set of the cluster's nodes.
pub const NODES_KEY: &str = "relay:nodes";

/// A node's health record key.
pub fn node_key(node: &str) -> String {
    format!("relay:node:{node}")
}

/// The key of a node's signalling sessions.
pub fn sessions_key(node: &str) -> String {
    format!("relay:sessions:{node}")
}

/// The key of a node's TURN allocations (one JSON array).
pub fn allocations_key(node: &str) -> String {
    format!("relay:allocations:{node}")
}

/// The key of one of a node's calls.
pub fn call_key(node: &str, call: u64) -> String {
    format!("relay:call:{node}:{call}")
}

/// The first call id of `node` in a cluster: each node numbers its calls from a base of its
/// own, a 20-bit hash of its name (never 0, the base of a relay alone) above the low 32
/// bits, so that ids are unique across the cluster, name the node that anchors the call,
/// and stay below 2^53 (JavaScript reads them exactly).
pub fn call_id_base(node: &str) -> u64 {
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % ((1 << 20) - 1) + 1) << 32
}

/// The base of the node that numbered `call`.
fn base_of(call: u64) -> u64 {
    call & !0xffff_ffff
}

/// One signalling session as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub tenant: String,
    /// `controller` or `client`.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What the daemon gives the cluster to publish, and where messages from other nodes go.
pub struct Sources {
    /// All but the CPU, which the cluster measures.
    pub load: Box<dyn Fn() -> Load + Send + Sync>,
    pub sessions: Option<Box<dyn Fn() -> Vec<SessionRecord> + Send + Sync>>,
    pub calls: Option<CallsSource>,
    pub deliver: Option<Deliver>,
    pub present: Option<Present>,
    pub take_over: Option<TakeOver>,
    /// The TURN allocations a standby could take over, as one JSON array.
    pub allocations: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

/// Takes over the calls and TURN allocations of a node that is down (its name, its calls'
/// records as JSON, its allocations' JSON array); returns how many of each it took.
pub type TakeOver = Box<
    dyn Fn(String, Vec<String>, Option<String>) -> BoxFuture<'static, (usize, usize)> + Send + Sync,
>;

/// Who a message routed between nodes is for, within its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipient {
    Controller,
    User(String),
}

/// Hands a message from another node to this node's sessions: (delivered, queues full).
pub type Deliver = Box<dyn Fn(&str, &Recipient, serde_json::Value) -> (usize, usize) + Send + Sync>;

/// How many sessions of a recipient this node has.
pub type Present = Box<dyn Fn(&str, &Recipient) -> usize + Send + Sync>;

/// Answers a signalling request a session on another node sent (its identity, the request's
/// text) with the reply, as JSON.
pub type Serve =
    Box<dyn Fn(SessionRecord, String) -> BoxFuture<'static, serde_json::Value> + Send + Sync>;

/// What became of a message sent to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Sessions on other nodes took it.
    Delivered(usize),
    /// The recipient's sessions elsewhere have full queues.
    Busy,
    /// No other node has the recipient (or none answered within a second).
    Nowhere,
    /// Redis does not answer: the other nodes cannot be asked.
    Unreachable,
}

/// Messages between nodes, on each node's channel `relay:inbox:<name>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum InboxMessage {
    Deliver {
        id: u64,
        reply_to: String,
        tenant: String,
        to: Recipient,
        message: serde_json::Value,
    },
    Delivered {
        id: u64,
        delivered: usize,
        busy: usize,
    },
    /// How many sessions of `to` the node has (answered with `Delivered`, nothing sent).
    Ask {
        id: u64,
        reply_to: String,
        tenant: String,
        to: Recipient,
    },
    /// A signalling request of a session on the sender's node, for a call this node
    /// anchors or is to anchor.
    Request {
        id: u64,
        reply_to: String,
        from: SessionRecord,
        text: String,
    },
    Replied {
        id: u64,
        reply: serde_json::Value,
    },
    /// A call event for sessions on this node; not answered.
    Event {
        tenant: String,
        to: Recipient,
        message: serde_json::Value,
    },
}

/// An answer to a message that waits for one.
enum Answer {
    Counts(usize, usize),
    Reply(serde_json::Value),
}

/// A node's channel.
pub fn inbox_channel(node: &str) -> String {
    format!("relay:inbox:{node}")
}

/// How long a message routed to another node waits for its answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a call request sent to another node waits for its reply (a new call binds its
/// ports and starts its ICE agent there).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Call events waiting to be published to the other nodes; beyond, they are dropped (and
/// counted), as a full session queue drops them on one node.
const EVENTS_QUEUED: usize = 4096;

pub struct CallsSource {
    /// Counts the changes to the calls' records.
    pub generation: Box<dyn Fn() -> u64 + Send + Sync>,
    /// What changed after a generation (0: everything).
    pub records: Box<dyn Fn(u64) -> CallRecords + Send + Sync>,
}

/// The calls changed after a generation: their records as JSON by call id, those of them
/// without a record (not connected), every call's id, and whether every changed call's
/// record was at hand (false: one was busy changing; asked again at the next refresh).
pub struct CallRecords {
    pub records: Vec<(u64, String)>,
    pub unrecorded: Vec<u64>,
    pub calls: Vec<u64>,
    pub complete: bool,
}

/// The call keys this node last wrote, and the calls' generation they were written at
/// (None: write them all at the next refresh).
#[derive(Default)]
struct Written {
    calls: Vec<u64>,
    generation: Option<u64>,
    /// The allocations' JSON last written (None: write it at the next refresh).
    allocations: Option<String>,
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub version: String,
    /// Unix seconds of the node's start.
    pub started: u64,
    /// Unix milliseconds of this record.
    pub published_ms: u64,
    pub load: Load,
    /// The node it stands by for (`cluster.standby_for`): once that node is down and this
    /// one took over, requests for that node's calls come here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_for: Option<String>,
}

/// A node's load as it published it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub calls: usize,
    pub allocations: usize,
    /// Signalling sessions (controllers and apps).
    pub sessions: usize,
    pub flows: usize,
    /// relayd's CPU since the previous record, in percent of one core.
    pub cpu_percent: f64,
    /// `cluster.max_calls` of the node (0: no limit).
    #[serde(default)]
    pub max_calls: usize,
    /// A standby that has not taken over: it anchors no calls.
    #[serde(default)]
    pub standby: bool,
}

impl Load {
    /// Whether the node takes one more call.
    pub fn has_room(&self) -> bool {
        !self.standby && (self.max_calls == 0 || self.calls < self.max_calls)
    }
}

/// How many health TTLs a node's call records outlive its last refresh: long enough for a
/// standby to see the node down and read them.
const CALL_TTLS: u64 = 4;

/// One member of the cluster as this node last read it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub node: String,
    pub state: NodeState,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeState {
    Alive(NodeRecord),
    /// A member whose health record has expired: it stopped refreshing it.
    Down,
    /// A record this relayd cannot read (another version's, or not one of ours).
    Unreadable(String),
}

/// This node's link to Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    /// Not yet tried.
    Joining,
    Up {
        since: Instant,
    },
    /// The last attempt failed: the node serves its own sessions and calls only.
    Degraded {
        since: Instant,
        reason: String,
    },
}

/// The cluster as `relayctl cluster status` shows it.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    pub node: String,
    pub redis_url: String,
    pub health_ttl_secs: u64,
    pub link: Link,
    pub nodes: Vec<NodeView>,
    /// When `nodes` was read (None: never).
    pub read_at: Option<Instant>,
    /// The node this one stands by for, and whether it still stands by (false: it took
    /// that node's calls over).
    pub standby_for: Option<String>,
    pub standing_by: bool,
}

pub struct Cluster {
    node: String,
    url: String,
    ttl: Duration,
    client: redis::Client,
    started: u64,
    view: Mutex<View>,
    /// Times Redis stopped answering (joining without it counts once).
    degraded_total: AtomicU64,
    /// Down members the operator removed, for the refresh task to delete from Redis.
    forget: mpsc::UnboundedSender<String>,
    /// The refresh task's connection, for messages to other nodes (None: Redis does not
    /// answer).
    connection: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Messages sent to other nodes that wait for their answer, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_message: AtomicU64,
    deliver: Option<Deliver>,
    present: Option<Present>,
    /// Set once the signalling serves: requests from sessions on other nodes.
    serve: OnceLock<Serve>,
    /// Call events for sessions on other nodes, published in order by one task.
    events: mpsc::Sender<(String, Recipient, serde_json::Value)>,
    events_dropped: AtomicU64,
    /// Call requests sent to other nodes: answered, and not answered in time.
    requests_answered: AtomicU64,
    requests_unanswered: AtomicU64,
    /// Takeovers of the active node, and the calls and allocations they took.
    takeovers: AtomicU64,
    taken_calls: AtomicU64,
    taken_allocations: AtomicU64,
    max_calls: usize,
    /// The active node this one stands by for, and whether it still stands by (false once
    /// it took that node's calls over).
    standby_for: Option<String>,
    standing_by: AtomicBool,
}

/// Why a member cannot be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgetRefusal {
    #[error("{0} is not a member of the cluster")]
    NotMember(String),
    #[error("{0} is alive: only a member that is down can be forgotten")]
    Alive(String),
    #[error("{0} is this node")]
    ThisNode(String),
    #[error("Redis is unavailable: nothing can be removed from it now")]
    Degraded,
}

struct View {
    link: Link,
    nodes: Vec<NodeView>,
    read_at: Option<Instant>,
}

impl Cluster {
    /// Joins the cluster (in the background: Redis need not answer yet) and keeps the
    /// node's record fresh until `stopped`, then leaves.
    pub fn start(
        config: &ClusterConfig,
        mut sources: Sources,
        stopped: watch::Receiver<bool>,
    ) -> anyhow::Result<(Arc<Cluster>, tokio::task::JoinHandle<()>)> {
        let client = config.client()?;
        let deliver = sources.deliver.take();
        let present = sources.present.take();
        let (forget, forgotten) = mpsc::unbounded_channel();
        let (events, queued) = mpsc::channel(EVENTS_QUEUED);
        let cluster = Arc::new(Cluster {
            node: config.node_name(),
            url: redacted(&config.redis_url),
            ttl: Duration::from_secs(config.health_ttl_secs),
            client,
            started: unix_now(),
            view: Mutex::new(View {
                link: Link::Joining,
                nodes: Vec::new(),
                read_at: None,
            }),
            degraded_total: AtomicU64::new(0),
            forget,
            connection: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_message: AtomicU64::new(1),
            deliver,
            present,
            serve: OnceLock::new(),
            events,
            events_dropped: AtomicU64::new(0),
            requests_answered: AtomicU64::new(0),
            requests_unanswered: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            taken_calls: AtomicU64::new(0),
            taken_allocations: AtomicU64::new(0),
            max_calls: config.max_calls,
            standby_for: (!config.standby_for.is_empty()).then(|| config.standby_for.clone()),
            standing_by: AtomicBool::new(!config.standby_for.is_empty()),
        });
        tracing::info!(node = %cluster.node, redis = %cluster.url, ttl_secs = config.health_ttl_secs, standby_for = config.standby_for, "cluster: joining");
        let inbox = cluster
            .deliver
            .is_some()
            .then(|| tokio::spawn(cluster.clone().read_inbox(stopped.clone())));
        let publishing = tokio::spawn(cluster.clone().publish_events(queued, stopped.clone()));
        let task = tokio::spawn(cluster.clone().keep_fresh(sources, forgotten, stopped));
        let task = tokio::spawn(async move {
            let _ = task.await;
            let _ = publishing.await;
            if let Some(inbox) = inbox {
                let _ = inbox.await;
            }
        });
        Ok((cluster, task))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// How the signalling answers requests from sessions on other nodes (set once).
    pub fn serve_requests(&self, serve: Serve) {
        let _ = self.serve.set(serve);
    }

    /// Whether this node anchors no more calls (`cluster.max_calls`) with `calls` now, or
    /// none at all (a standby).
    pub fn is_full(&self, calls: usize) -> bool {
        !Load {
            calls,
            max_calls: self.max_calls,
            standby: self.standing_by(),
            ..Load::default()
        }
        .has_room()
    }

    /// A standby that has not taken over yet.
    pub fn standing_by(&self) -> bool {
        self.standing_by.load(Ordering::Relaxed)
    }

    /// Every other member alive as last read, with its load.
    pub fn others_alive(&self) -> Vec<(String, Load)> {
        self.view()
            .nodes
            .iter()
            .filter(|member| member.node != self.node)
            .filter_map(|member| match &member.state {
                NodeState::Alive(record) => Some((member.node.clone(), record.load)),
                _ => None,
            })
            .collect()
    }

    /// The other member that anchors `call`: the one whose calls are numbered from its
    /// base when alive, else its standby that took its calls over (None: this node's, or
    /// nobody alive has it).
    pub fn owner_of(&self, call: u64) -> Option<String> {
        let base = base_of(call);
        if base == 0 {
            return None;
        }
        let view = self.view();
        let numbered = view
            .nodes
            .iter()
            .find(|member| call_id_base(&member.node) == base)?;
        if numbered.node == self.node {
            return None;
        }
        if matches!(numbered.state, NodeState::Alive(_)) {
            return Some(numbered.node.clone());
        }
        view.nodes
            .iter()
            .filter(|member| member.node != self.node)
            .find_map(|member| match &member.state {
                NodeState::Alive(record)
                    if record.standby_for.as_deref() == Some(numbered.node.as_str())
                        && !record.load.standby =>
                {
                    Some(member.node.clone())
                }
                _ => None,
            })
    }

    /// Call events dropped because the queue toward the other nodes was full.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }

    /// Call requests sent to other nodes: (answered, not answered in time or not sent).
    pub fn requests(&self) -> (u64, u64) {
        (
            self.requests_answered.load(Ordering::Relaxed),
            self.requests_unanswered.load(Ordering::Relaxed),
        )
    }

    /// Takeovers this node did, and the calls and allocations they took.
    pub fn taken_over(&self) -> (u64, u64, u64) {
        (
            self.takeovers.load(Ordering::Relaxed),
            self.taken_calls.load(Ordering::Relaxed),
            self.taken_allocations.load(Ordering::Relaxed),
        )
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().expect("cluster view")
    }

    /// Times Redis stopped answering since relayd started.
    pub fn degraded_total(&self) -> u64 {
        self.degraded_total.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> ClusterStatus {
        let view = self.view();
        ClusterStatus {
            node: self.node.clone(),
            redis_url: self.url.clone(),
            health_ttl_secs: self.ttl.as_secs(),
            link: view.link.clone(),
            nodes: view.nodes.clone(),
            read_at: view.read_at,
            standby_for: self.standby_for.clone(),
            standing_by: self.standing_by(),
        }
    }

    /// Refreshes the record every third of the TTL; on a failure drops the connection and
    /// tries a new one at the next refresh.
    async fn keep_fresh(
        self: Arc<Self>,
        sources: Sources,
        mut forgotten: mpsc::UnboundedReceiver<String>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let every = self.ttl / 3;
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connection: Option<redis::aio::MultiplexedConnection> = None;
        let mut written = Written::default();
        // relayd's CPU between two records (the first says 0: no interval yet).
        let mut cpu: Option<(Instant, u64)> = None;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                Some(node) = forgotten.recv() => {
                    if let Some(connection) = connection.as_mut() {
                        self.remove_member(connection, &node).await;
                    }
                    continue;
                }
                _ = stopped.changed() => break,
            }
            let (now, cpu_ns) = (Instant::now(), process_cpu_ns());
            let cpu_percent = cpu.map_or(0.0, |(then, then_ns)| {
                let wall_ns = now.duration_since(then).as_nanos().max(1) as f64;
                (cpu_ns.saturating_sub(then_ns) as f64 * 1000.0 / wall_ns).round() / 10.0
            });
            cpu = Some((now, cpu_ns));
            let record = NodeRecord {
                node: self.node.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started: self.started,
                published_ms: unix_now_ms(),
                load: Load {
                    cpu_percent,
                    max_calls: self.max_calls,
                    standby: self.standing_by(),
                    ..(sources.load)()
                },
                standby_for: self.standby_for.clone(),
            };
            let refreshed = tokio::time::timeout(
                every,
                self.refresh(&mut connection, &record, &sources, &mut written),
            )
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {every:?}")));
            *self.connection.lock().expect("cluster connection") = connection.clone();
            match refreshed {
                Ok(nodes) => {
                    let active_down = self.standby_for.clone().filter(|active| {
                        self.standing_by()
                            && nodes.iter().any(|member| {
                                member.node == *active && member.state == NodeState::Down
                            })
                    });
                    // The view first: the calls taken over tell their sessions where they
                    // are, and the down node is nowhere to tell.
                    self.joined(nodes);
                    if let (Some(active), Some(take_over), Some(connection)) =
                        (active_down, &sources.take_over, connection.as_mut())
                    {
                        match self.take_over(connection, &active, take_over).await {
                            Ok(()) => self.standing_by.store(false, Ordering::Relaxed),
                            Err(err) => {
                                tracing::warn!(node = %self.node, active, %err, "cluster: the calls of the node this one stands by for cannot be read from Redis; trying again at the next refresh")
                            }
                        }
                    }
                }
                Err(reason) => {
                    connection = None;
                    *self.connection.lock().expect("cluster connection") = None;
                    // Redis may have lost them: all written again once it answers.
                    written.generation = None;
                    written.allocations = None;
                    self.degraded(reason);
                }
            }
        }
        if let Some(mut connection) = connection {
            let leave = async {
                let mut pipe = redis::pipe();
                pipe.del(node_key(&self.node))
                    .del(sessions_key(&self.node))
                    .del(allocations_key(&self.node))
                    .srem(NODES_KEY, &self.node);
                for &call in &written.calls {
                    pipe.del(call_key(&self.node, call));
                }
                pipe.query_async::<()>(&mut connection).await
            };
            match tokio::time::timeout(Duration::from_secs(1), leave).await {
                Ok(Ok(())) => tracing::info!(node = %self.node, "cluster: left"),
                _ => {
                    tracing::info!(node = %self.node, "cluster: stopped without leaving; the others see this node down when its record expires")
                }
            }
        }
    }

    /// Sends `message` (a signalling message, as its JSON) to `to` of `tenant` on every
    /// other node alive, as this node last read the cluster, and waits for their answers
    /// (at most a second): each says how many of its sessions took it. Asking them all
    /// costs a round trip through Redis per message for a recipient not connected here,
    /// and knows at once where a session that just connected is.
    pub async fn forward(
        &self,
        tenant: &str,
        to: &Recipient,
        message: serde_json::Value,
    ) -> Forwarded {
        let Some(answers) = self
            .ask_others(|id, reply_to| InboxMessage::Deliver {
                id,
                reply_to,
                tenant: tenant.to_owned(),
                to: to.clone(),
                message: message.clone(),
            })
            .await
        else {
            return Forwarded::Unreachable;
        };
        let (mut delivered, mut busy) = (0, 0);
        for (_, took, full) in answers {
            delivered += took;
            busy += full;
        }
        match (delivered, busy) {
            (0, 0) => Forwarded::Nowhere,
            (0, _) => Forwarded::Busy,
            (delivered, _) => Forwarded::Delivered(delivered),
        }
    }

    /// The other nodes that have sessions of `to` (and how many each), asked now; None:
    /// Redis does not answer.
    pub async fn locate(&self, tenant: &str, to: &Recipient) -> Option<Vec<(String, usize)>> {
        let answers = self
            .ask_others(|id, reply_to| InboxMessage::Ask {
                id,
                reply_to,
                tenant: tenant.to_owned(),
                to: to.clone(),
            })
            .await?;
        Some(
            answers
                .into_iter()
                .filter(|(_, sessions, _)| *sessions > 0)
                .map(|(node, sessions, _)| (node, sessions))
                .collect(),
        )
    }

    /// Sends what `message` makes (from its id and this node's name) to every other node
    /// alive, as this node last read the cluster, and waits for their answers (at most
    /// a second each): (node, delivered, busy) of those that answered. None: Redis does not
    /// answer.
    async fn ask_others(
        &self,
        message: impl Fn(u64, String) -> InboxMessage,
    ) -> Option<Vec<(String, usize, usize)>> {
        let nodes = self.others_alive();
        let mut connection = self
            .connection
            .lock()
            .expect("cluster connection")
            .clone()?;
        let mut waiting = Vec::new();
        for (node, _) in nodes {
            let (id, answered) = self.expect_answer();
            let json = serde_json::to_string(&message(id, self.node.clone()))
                .expect("inbox messages serialize");
            let published: redis::RedisResult<usize> =
                connection.publish(inbox_channel(&node), json).await;
            match published {
                Ok(listeners) if listeners > 0 => waiting.push((node, id, answered)),
                _ => {
                    self.pending().remove(&id);
                }
            }
        }
        let mut answers = Vec::new();
        for (node, id, answered) in waiting {
            match tokio::time::timeout(FORWARD_TIMEOUT, answered).await {
                Ok(Ok(Answer::Counts(delivered, busy))) => answers.push((node, delivered, busy)),
                _ => {
                    self.pending().remove(&id);
                }
            }
        }
        Some(answers)
    }

    /// A message id, and where its answer will arrive.
    fn expect_answer(&self) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_message.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.pending().insert(id, answer);
        (id, answered)
    }

    /// Sends a signalling request of a session here (`from`, the request's `text`) to
    /// `node` and waits for its reply (at most [`REQUEST_TIMEOUT`]). Err: why there is none.
    pub async fn request(
        &self,
        node: &str,
        from: SessionRecord,
        text: String,
    ) -> Result<serde_json::Value, String> {
        let reply = self.ask(node, from, text).await;
        let counter = match reply {
            Ok(_) => &self.requests_answered,
            Err(_) => &self.requests_unanswered,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        reply
    }

    async fn ask(
        &self,
        node: &str,
        from: SessionRecord,
        text: String,
    ) -> Result<serde_json::Value, String> {
        let connection = self.connection.lock().expect("cluster connection").clone();
        let Some(mut connection) = connection else {
            return Err("Redis does not answer".to_owned());
        };
        let (id, answered) = self.expect_answer();
        let message = InboxMessage::Request {
            id,
            reply_to: self.node.clone(),
            from,
            text,
        };
        let json = serde_json::to_string(&message).expect("inbox messages serialize");
        let published: redis::RedisResult<usize> =
            connection.publish(inbox_channel(node), json).await;
        match published {
            Ok(listeners) if listeners > 0 => {}
            Ok(_) => {
                self.pending().remove(&id);
                return Err(format!("relay {node} is not listening"));
            }
            Err(err) => {
                self.pending().remove(&id);
                return Err(err.to_string());
            }
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, answered).await {
            Ok(Ok(Answer::Reply(reply))) => Ok(reply),
            _ => {
                self.pending().remove(&id);
                Err(format!(
                    "relay {node} did not answer within {REQUEST_TIMEOUT:?}"
                ))
            }
        }
    }

    /// Hands a call event to `to` on every other node alive, in order and without waiting
    /// for an answer. False: it cannot go anywhere (Redis does not answer, no other node is
    /// alive, or the queue toward them is full).
    pub fn publish(&self, tenant: &str, to: &Recipient, message: serde_json::Value) -> bool {
        if self
            .connection
            .lock()
            .expect("cluster connection")
            .is_none()
            || self.others_alive().is_empty()
        {
            return false;
        }
        match self
            .events
            .try_send((tenant.to_owned(), to.clone(), message))
        {
            Ok(()) => true,
            Err(_) => {
                if self.events_dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        queued = EVENTS_QUEUED,
                        "cluster: call events for other relays dropped: Redis takes them slower than they come"
                    );
                }
                false
            }
        }
    }

    /// Publishes the queued call events, one at a time so that they arrive in order.
    async fn publish_events(
        self: Arc<Self>,
        mut queued: mpsc::Receiver<(String, Recipient, serde_json::Value)>,
        mut stopped: watch::Receiver<bool>,
    ) {
        loop {
            let (tenant, to, message) = tokio::select! {
                Some(event) = queued.recv() => event,
                _ = stopped.changed() => return,
            };
            let connection = self.connection.lock().expect("cluster connection").clone();
            let Some(mut connection) = connection else {
                continue;
            };
            let json = serde_json::to_string(&InboxMessage::Event {
                tenant,
                to,
                message,
            })
            .expect("inbox messages serialize");
            for (node, _) in self.others_alive() {
                let published: redis::RedisResult<usize> =
                    connection.publish(inbox_channel(&node), &json).await;
                if let Err(err) = published {
                    tracing::debug!(%err, node, "cluster: a call event for another relay not published");
                }
            }
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<Answer>>> {
        self.pending.lock().expect("cluster pending messages")
    }

    /// Reads this node's channel until `stopped`: messages for its sessions, and the
    /// answers to what it sent. Subscribes again a second after Redis went away.
    async fn read_inbox(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        use futures_util::StreamExt;
        let channel = inbox_channel(&self.node);
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub.into_on_message())
            };
            if let Ok(Ok(mut messages)) = tokio::time::timeout(self.ttl / 3, subscribed).await {
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => {
                                if let Ok(text) = message.get_payload::<String>() {
                                    self.inbox(&text).await;
                                }
                            }
                            None => break,
                        },
                        _ = stopped.changed() => return,
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped.changed() => return,
            }
        }
    }

    async fn inbox(self: &Arc<Self>, text: &str) {
        let message = match serde_json::from_str::<InboxMessage>(text) {
            Ok(message) => message,
            Err(err) => {
                tracing::debug!(%err, "cluster: a message on this node's channel that is not one of ours");
                return;
            }
        };
        match message {
            InboxMessage::Deliver {
                id,
                reply_to,
                tenant,
                to,
                message,
            } => {
                let (delivered, busy) = match &self.deliver {
                    Some(deliver) => deliver(&tenant, &to, message),
                    None => (0, 0),
                };
                let answer = InboxMessage::Delivered {
                    id,
                    delivered,
                    busy,
                };
                self.answer(&reply_to, &answer).await;
            }
            InboxMessage::Ask {
                id,
                reply_to,
                tenant,
                to,
            } => {
                let sessions = self
                    .present
                    .as_ref()
                    .map_or(0, |present| present(&tenant, &to));
                let answer = InboxMessage::Delivered {
                    id,
                    delivered: sessions,
                    busy: 0,
                };
                self.answer(&reply_to, &answer).await;
            }
            InboxMessage::Request {
                id,
                reply_to,
                from,
                text,
            } => {
                // Its own task: a call's setup takes a moment, and the channel carries the
                // answers to this node's own requests meanwhile.
                let cluster = self.clone();
                tokio::spawn(async move {
                    let reply = match cluster.serve.get() {
                        Some(serve) => serve(from, text).await,
                        None => {
                            serde_json::json!({"type": "error", "id": null, "code": "forbidden",
                            "message": format!("relay {} does not serve signalling", cluster.node)})
                        }
                    };
                    cluster
                        .answer(&reply_to, &InboxMessage::Replied { id, reply })
                        .await;
                });
            }
            InboxMessage::Event {
                tenant,
                to,
                message,
            } => {
                if let Some(deliver) = &self.deliver {
                    deliver(&tenant, &to, message);
                }
            }
            InboxMessage::Delivered {
                id,
                delivered,
                busy,
            } => {
                if let Some(waiting) = self.pending().remove(&id) {
                    let _ = waiting.send(Answer::Counts(delivered, busy));
                }
            }
            InboxMessage::Replied { id, reply } => {
                if let Some(waiting) = self.pending().remove(&id) {
                    let _ = waiting.send(Answer::Reply(reply));
                }
            }
        }
    }

    /// Publishes an answer on the asking node's channel.
    async fn answer(&self, node: &str, answer: &InboxMessage) {
        let json = serde_json::to_string(answer).expect("inbox messages serialize");
        let connection = self.connection.lock().expect("cluster connection").clone();
        if let Some(mut connection) = connection {
            let _: redis::RedisResult<usize> = connection.publish(inbox_channel(node), json).await;
        }
    }

    /// The active node is down: its calls' records are read from Redis and handed to the
    /// calls here, then deleted there (they are this node's now, written under its name).
    async fn take_over(
        &self,
        connection: &mut redis::aio::MultiplexedConnection,
        active: &str,
        take_over: &TakeOver,
    ) -> Result<(), redis::RedisError> {
        let started = Instant::now();
        // Node names have no glob characters (cluster.node).
        let pattern = format!("relay:call:{active}:*");
        let mut keys: Vec<String> = Vec::new();
        {
            let mut scan = connection.scan_match::<_, String>(&pattern).await?;
            while let Some(key) = futures_util::StreamExt::next(&mut scan).await {
                keys.push(key?);
            }
        }
        let records: Vec<String> = if keys.is_empty() {
            Vec::new()
        } else {
            let found: Vec<Option<String>> = connection.mget(&keys).await?;
            found.into_iter().flatten().collect()
        };
        let allocations: Option<String> = connection.get(allocations_key(active)).await?;
        let found = records.len();
        tracing::warn!(node = %self.node, active, calls = found, "cluster: the node this one stands by for is down (its health record expired); taking its calls over");
        let (taken, allocations) = take_over(active.to_owned(), records, allocations).await;
        self.takeovers.fetch_add(1, Ordering::Relaxed);
        self.taken_calls.fetch_add(taken as u64, Ordering::Relaxed);
        self.taken_allocations
            .fetch_add(allocations as u64, Ordering::Relaxed);
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.del(key).ignore();
        }
        pipe.del(sessions_key(active))
            .ignore()
            .del(allocations_key(active))
            .ignore();
        pipe.query_async::<()>(connection).await?;
        tracing::info!(node = %self.node, active, taken, lost = found - taken, allocations, ms = started.elapsed().as_millis() as u64, "cluster: took over the calls of the node that is down; this node is the active one now");
        Ok(())
    }

    /// Removes a down member the operator gave up on (`relayctl cluster forget`): out of
    /// the member set, its session list gone (its call records have expired with it).
    pub fn forget(&self, node: &str) -> Result<(), ForgetRefusal> {
        let mut view = self.view();
        if node == self.node {
            return Err(ForgetRefusal::ThisNode(node.to_owned()));
        }
        if !matches!(view.link, Link::Up { .. }) {
            return Err(ForgetRefusal::Degraded);
        }
        let Some(index) = view.nodes.iter().position(|member| member.node == node) else {
            return Err(ForgetRefusal::NotMember(node.to_owned()));
        };
        if matches!(view.nodes[index].state, NodeState::Alive(_)) {
            return Err(ForgetRefusal::Alive(node.to_owned()));
        }
        view.nodes.remove(index);
        let _ = self.forget.send(node.to_owned());
        tracing::info!(node, "cluster: a down member forgotten by the operator");
        Ok(())
    }

    async fn remove_member(&self, connection: &mut redis::aio::MultiplexedConnection, node: &str) {
        let removed = redis::pipe()
            .srem(NODES_KEY, node)
            .del(sessions_key(node))
            .query_async::<()>(connection)
            .await;
        if let Err(err) = removed {
            tracing::warn!(node, %err, "cluster: the forgotten member could not be removed from Redis; forget it again");
        }
    }

    /// One refresh: this node's keys written (or given a new TTL), every member's health
    /// record read.
    async fn refresh(
        &self,
        connection: &mut Option<redis::aio::MultiplexedConnection>,
        record: &NodeRecord,
        sources: &Sources,
        written: &mut Written,
    ) -> Result<Vec<NodeView>, String> {
        if connection.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.ttl / 3))
                .set_response_timeout(Some(self.ttl / 3));
            *connection = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|err| err.to_string())?,
            );
        }
        let connection = connection.as_mut().expect("connected above");
        let ttl = self.ttl.as_secs();
        let call_ttl = ttl * CALL_TTLS;
        let json = serde_json::to_string(record).expect("node records serialize");
        let mut pipe = redis::pipe();
        pipe.set_ex(node_key(&self.node), json, ttl)
            .ignore()
            .sadd(NODES_KEY, &self.node)
            .ignore();
        if let Some(sessions) = &sources.sessions {
            let json = serde_json::to_string(&sessions()).expect("sessions serialize");
            pipe.set_ex(sessions_key(&self.node), json, ttl).ignore();
        }
        // The calls: those changed since the last write written again, the others given a
        // new TTL, the ended ones deleted.
        let mut now_written = None;
        if let Some(calls) = &sources.calls {
            let generation = (calls.generation)();
            if written.generation == Some(generation) {
                for &call in &written.calls {
                    pipe.expire(call_key(&self.node, call), call_ttl as i64)
                        .ignore();
                }
            } else {
                let CallRecords {
                    records,
                    unrecorded,
                    calls,
                    complete,
                } = (calls.records)(written.generation.unwrap_or(0));
                // Sets: a thousand calls each looked up in lists of a thousand would be
                // a million comparisons a refresh.
                let calls: HashSet<u64> = calls.into_iter().collect();
                let unrecorded: HashSet<u64> = unrecorded.into_iter().collect();
                let rewritten: HashSet<u64> = records.iter().map(|(call, _)| *call).collect();
                let mut now: Vec<u64> = rewritten.iter().copied().collect();
                for (call, json) in records {
                    pipe.set_ex(call_key(&self.node, call), json, call_ttl)
                        .ignore();
                }
                for &call in &written.calls {
                    if rewritten.contains(&call) {
                        continue;
                    }
                    if calls.contains(&call) && !unrecorded.contains(&call) {
                        pipe.expire(call_key(&self.node, call), call_ttl as i64)
                            .ignore();
                        now.push(call);
                    } else {
                        pipe.del(call_key(&self.node, call)).ignore();
                    }
                }
                now_written = Some((now, complete.then_some(generation)));
            }
        }
        // The allocations: written when they changed, else given a new TTL.
        let mut allocations_written = None;
        if let Some(allocations) = &sources.allocations {
            let json = allocations();
            if written.allocations.as_ref() == Some(&json) {
                pipe.expire(allocations_key(&self.node), call_ttl as i64)
                    .ignore();
            } else {
                pipe.set_ex(allocations_key(&self.node), &json, call_ttl)
                    .ignore();
                allocations_written = Some(json);
            }
        }
        let (members,): (Vec<String>,) = pipe
            .smembers(NODES_KEY)
            .query_async(connection)
            .await
            .map_err(|err| err.to_string())?;
        if let Some((calls, generation)) = now_written {
            written.calls = calls;
            written.generation = generation;
        }
        if allocations_written.is_some() {
            written.allocations = allocations_written;
        }
        let mut members = members;
        members.sort();
        let keys: Vec<String> = members.iter().map(|node| node_key(node)).collect();
        let records: Vec<Option<String>> = if keys.is_empty() {
            Vec::new()
        } else {
            connection
                .mget(&keys)
                .await
                .map_err(|err| err.to_string())?
        };
        let nodes = members
            .into_iter()
            .zip(records)
            .map(|(node, record)| {
                let state = match record {
                    None => NodeState::Down,
                    Some(json) => match serde_json::from_str::<NodeRecord>(&json) {
                        Ok(record) => NodeState::Alive(record),
                        Err(err) => NodeState::Unreadable(err.to_string()),
                    },
                };
                NodeView { node, state }
            })
            .collect();
        Ok(nodes)
    }

    fn joined(&self, nodes: Vec<NodeView>) {
        let mut view = self.view();
        let newcomer = |member: &&NodeView| !view.nodes.iter().any(|seen| seen.node == member.node);
        let base = call_id_base(&self.node);
        if let Some(twin) = nodes
            .iter()
            .filter(newcomer)
            .find(|member| member.node != self.node && call_id_base(&member.node) == base)
        {
            tracing::error!(node = %self.node, other = %twin.node, "cluster: two nodes whose names give the same call ids: requests for their calls may reach the wrong one; rename one of them");
        }
        match &view.link {
            Link::Up { .. } => {}
            Link::Joining => {
                tracing::info!(node = %self.node, redis = %self.url, nodes = nodes.len(), "cluster: joined");
                view.link = Link::Up {
                    since: Instant::now(),
                };
            }
            Link::Degraded { since, .. } => {
                tracing::info!(node = %self.node, redis = %self.url, nodes = nodes.len(), after_secs = since.elapsed().as_secs(), "cluster: Redis answers again; rejoined");
                view.link = Link::Up {
                    since: Instant::now(),
                };
            }
        }
        view.nodes = nodes;
        view.read_at = Some(Instant::now());
    }

    fn degraded(&self, reason: String) {
        let mut view = self.view();
        match &view.link {
            Link::Degraded { since, .. } => {
                tracing::debug!(redis = %self.url, %reason, "cluster: Redis still unavailable");
                view.link = Link::Degraded {
                    since: *since,
                    reason,
                };
            }
            _ => {
                self.degraded_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.node, redis = %self.url, %reason, "cluster: Redis unavailable; this node serves its own sessions and calls only (degraded) and rejoins when Redis answers");
                view.link = Link::Degraded {
                    since: Instant::now(),
                    reason,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_name_their_node_and_stay_exact_in_javascript() {
        let (a, b) = (call_id_base("edge-a"), call_id_base("edge-b"));
        assert_ne!(a, b);
        assert_eq!(a, call_id_base("edge-a"), "the same name, the same base");
        for base in [a, b, call_id_base(""), call_id_base(&"z".repeat(64))] {
            assert_ne!(base, 0, "0 is a lone relay's");
            assert_eq!(base & 0xffff_ffff, 0);
            assert!(base + 0xffff_ffff < 1 << 53, "{base}");
        }
        assert_eq!(base_of(a + 41), a);
        assert_eq!(base_of(41), 0);
    }

    /// A cluster view as `node` read it, without Redis.
    fn viewing(node: &str, nodes: Vec<NodeView>) -> Cluster {
        Cluster {
            node: node.to_owned(),
            url: String::new(),
            ttl: Duration::from_secs(3),
            client: redis::Client::open("redis://127.0.0.1:1").unwrap(),
            started: 0,
            view: Mutex::new(View {
                link: Link::Up {
                    since: Instant::now(),
                },
                nodes,
                read_at: None,
            }),
            degraded_total: AtomicU64::new(0),
            forget: mpsc::unbounded_channel().0,
            connection: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_message: AtomicU64::new(1),
            deliver: None,
            present: None,
            serve: OnceLock::new(),
            events: mpsc::channel(1).0,
            events_dropped: AtomicU64::new(0),
            requests_answered: AtomicU64::new(0),
            requests_unanswered: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            taken_calls: AtomicU64::new(0),
            taken_allocations: AtomicU64::new(0),
            max_calls: 0,
            standby_for: None,
            standing_by: AtomicBool::new(false),
        }
    }

    fn alive(node: &str, standby_for: Option<&str>, standby: bool) -> NodeView {
        NodeView {
            node: node.to_owned(),
            state: NodeState::Alive(NodeRecord {
                node: node.to_owned(),
                version: String::new(),
                started: 0,
                published_ms: 0,
                load: Load {
                    standby,
                    ..Load::default()
                },
                standby_for: standby_for.map(str::to_owned),
            }),
        }
    }

    #[test]
    fn a_call_is_asked_of_its_node_or_of_the_standby_that_took_it_over() {
        let down = NodeView {
            node: "edge-a".to_owned(),
            state: NodeState::Down,
        };
        let call = |node: &str, n: u64| call_id_base(node) + n;
        let cluster = viewing(
            "edge-c",
            vec![
                down.clone(),
                alive("edge-b", Some("edge-a"), false),
                alive("edge-c", None, false),
            ],
        );
        assert_eq!(
            cluster.owner_of(call("edge-a", 5)).as_deref(),
            Some("edge-b")
        );
        assert_eq!(
            cluster.owner_of(call("edge-b", 1)).as_deref(),
            Some("edge-b")
        );
        assert_eq!(cluster.owner_of(call("edge-c", 1)), None, "this node's");
        assert_eq!(cluster.owner_of(7), None, "a lone relay's id");
        assert_eq!(cluster.owner_of(call("edge-z", 1)), None, "nobody's");
        // A standby that has not taken over does not have the down node's calls.
        let waiting = viewing("edge-c", vec![down, alive("edge-b", Some("edge-a"), true)]);
        assert_eq!(waiting.owner_of(call("edge-a", 5)), None);
    }

    #[test]
    fn a_node_at_its_max_calls_has_no_room() {
        let load = |calls, max_calls| Load {
            calls,
            max_calls,
            ..Load::default()
        };
        assert!(load(1000, 0).has_room(), "0: no limit");
        assert!(load(1, 2).has_room());
        assert!(!load(2, 2).has_room());
    }
}
