//! This relayd as one node of a cluster sharing a Redis server. Each node refreshes its
//! health record (`relay:node:<name>`: version, start, load) with a TTL of
//! `cluster.health_ttl_secs`, every third of it, and belongs to the set `relay:nodes`; a
//! member whose record has expired is down. The same round trip reads every member's
//! record, so the node's view of the cluster is at most a refresh old.
//!
//! Redis is not needed to serve: when it does not answer (at start or later) the node goes
//! on with its own sessions and calls, says so in the log and `relayctl status`, and
//! rejoins at the first refresh that gets through. A clean stop removes the node's record
//! and membership; a node that dies stays listed, down, once its record expires.

pub mod config;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::time::{process_cpu_ns, unix_now};
use config::{ClusterConfig, redacted};

/// The set of the cluster's nodes.
pub const NODES_KEY: &str = "relay:nodes";

/// A node's health record key.
pub fn node_key(node: &str) -> String {
    format!("relay:node:{node}")
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
}

/// What the daemon counts for the record (all but the CPU, which the cluster measures).
pub type LoadSource = Box<dyn Fn() -> Load + Send + Sync>;

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
}

pub struct Cluster {
    node: String,
    url: String,
    ttl: Duration,
    client: redis::Client,
    started: u64,
    view: Mutex<View>,
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
        load: LoadSource,
        stopped: watch::Receiver<bool>,
    ) -> anyhow::Result<(Arc<Cluster>, tokio::task::JoinHandle<()>)> {
        let client = redis::Client::open(config.redis_url.as_str())?;
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
        });
        tracing::info!(node = %cluster.node, redis = %cluster.url, ttl_secs = config.health_ttl_secs, "cluster: joining");
        let task = tokio::spawn(cluster.clone().keep_fresh(load, stopped));
        Ok((cluster, task))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().expect("cluster view")
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
        }
    }

    /// Refreshes the record every third of the TTL; on a failure drops the connection and
    /// tries a new one at the next refresh.
    async fn keep_fresh(self: Arc<Self>, load: LoadSource, mut stopped: watch::Receiver<bool>) {
        let every = (self.ttl / 3).max(Duration::from_secs(1));
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connection: Option<redis::aio::MultiplexedConnection> = None;
        // relayd's CPU between two records (the first says 0: no interval yet).
        let mut cpu: Option<(Instant, u64)> = None;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
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
                    ..load()
                },
            };
            let refreshed = tokio::time::timeout(every, self.refresh(&mut connection, &record))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {every:?}")));
            match refreshed {
                Ok(nodes) => self.joined(nodes),
                Err(reason) => {
                    connection = None;
                    self.degraded(reason);
                }
            }
        }
        if let Some(mut connection) = connection {
            let leave = async {
                redis::pipe()
                    .del(node_key(&self.node))
                    .srem(NODES_KEY, &self.node)
                    .query_async::<()>(&mut connection)
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(1), leave).await {
                Ok(Ok(())) => tracing::info!(node = %self.node, "cluster: left"),
                _ => {
                    tracing::info!(node = %self.node, "cluster: stopped without leaving; the others see this node down when its record expires")
                }
            }
        }
    }

    /// One refresh: this node's record and membership written, every member's read.
    async fn refresh(
        &self,
        connection: &mut Option<redis::aio::MultiplexedConnection>,
        record: &NodeRecord,
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
        let json = serde_json::to_string(record).expect("node records serialize");
        let (members,): (Vec<String>,) = redis::pipe()
            .set_ex(node_key(&self.node), json, self.ttl.as_secs())
            .ignore()
            .sadd(NODES_KEY, &self.node)
            .ignore()
            .smembers(NODES_KEY)
            .query_async(connection)
            .await
            .map_err(|err| err.to_string())?;
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
        Ok(members
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
            .collect())
    }

    fn joined(&self, nodes: Vec<NodeView>) {
        let mut view = self.view();
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
                tracing::warn!(node = %self.node, redis = %self.url, %reason, "cluster: Redis unavailable; this node serves its own sessions and calls only (degraded) and rejoins when Redis answers");
                view.link = Link::Degraded {
                    since: Instant::now(),
                    reason,
                };
            }
        }
    }
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
