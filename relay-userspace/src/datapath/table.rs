//! The flow table the control plane works with: ids, duplicate keys, capacity, rates and idle
//! expiry, over whichever [`Datapath`] forwards the packets.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::{
    Datapath, DatapathError, DatapathStats, DatapathStatus, FlowCounters, FlowSpec, FlowSpecError,
    SlowPath, flow::FlowId,
};

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Invalid(#[from] FlowSpecError),
    #[error("{}: a flow with this key already exists (id {id})", describe(key))]
    Duplicate { id: u32, key: FlowId },
    #[error("{}: given twice in one request", describe(key))]
    DuplicateInRequest { key: FlowId },
    #[error("flow table full: it holds {capacity} flows (datapath.capacity)")]
    Full { capacity: u32 },
    #[error("id: {0}: no such flow")]
    UnknownFlow(u32),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

impl FlowError {
    /// The request field the error is about, for the control API.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            FlowError::Invalid(err) => Some(err.field),
            FlowError::Duplicate { .. } | FlowError::DuplicateInRequest { .. } => Some("src"),
            FlowError::Full { .. } => None,
            FlowError::UnknownFlow(_) => Some("id"),
            FlowError::Datapath(err) => err.field(),
        }
    }
}

/// What `flow list` / `flow show` report about one flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub id: u32,
    pub generation: u32,
    #[serde(flatten)]
    pub spec: FlowSpec,
    pub counters: FlowCounters,
    /// Packets per second over the last sampling interval.
    pub rate_pps: f64,
    /// Seconds since the last packet (or since installation).
    pub idle_secs: f64,
}

struct FlowRecord {
    spec: FlowSpec,
    generation: u32,
    installed_ns: u64,
    rate: RateSample,
}

#[derive(Default)]
struct RateSample {
    at_ns: u64,
    packets: u64,
    pps: f64,
}

#[derive(Default)]
struct State {
    flows: BTreeMap<u32, FlowRecord>,
    by_key: HashMap<FlowId, u32>,
    next_id: u32,
    expired_total: u64,
}

pub struct FlowTable {
    datapath: Box<dyn Datapath>,
    capacity: u32,
    idle_timeout_ns: u64,
    state: Mutex<State>,
}

impl FlowTable {
    /// Wraps `datapath` and adopts the flows it already holds (pinned kernel maps).
    pub fn new(datapath: Box<dyn Datapath>, idle_timeout_secs: u64, now_ns: u64) -> FlowTable {
        let capacity = datapath.status().capacity;
        let table = FlowTable {
            datapath,
            capacity,
            idle_timeout_ns: idle_timeout_secs * 1_000_000_000,
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
        };
        table.adopt(now_ns);
        table
    }

    fn adopt(&self, now_ns: u64) {
        let mut state = self.state();
        for (id, generation, spec) in self.datapath.installed() {
            if state.flows.contains_key(&id) || id == 0 {
                tracing::warn!(
                    id,
                    ?spec,
                    "pinned flow has a duplicate or zero id; removing it"
                );
                self.datapath.remove(&spec);
                continue;
            }
            // ChannelData flows are the TURN server's: its sockets serve their relay addresses.
            let slow_path = if spec.channel.is_some() {
                SlowPath::External
            } else {
                SlowPath::Sockets
            };
            if let Err(err) = self.datapath.install(id, generation, &spec, slow_path) {
                tracing::warn!(id, %err, "pinned flow cannot be adopted; removing it");
                self.datapath.remove(&spec);
                continue;
            }
            tracing::info!(id, src = %spec.src, dst = %spec.dst, new_src = %spec.new_src, new_dst = %spec.new_dst, "adopted flow from the pinned map");
            state.by_key.insert(spec.id(), id);
            state.flows.insert(id, record(spec, generation, now_ns));
            state.next_id = state.next_id.max(id + 1);
        }
    }

    pub fn status(&self) -> DatapathStatus {
        self.datapath.status()
    }

    pub fn stats(&self) -> DatapathStats {
        self.datapath.stats()
    }

    pub fn len(&self) -> usize {
        self.state().flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn expired_total(&self) -> u64 {
        self.state().expired_total
    }

    pub fn idle_timeout_secs(&self) -> u64 {
        self.idle_timeout_ns / 1_000_000_000
    }

    /// Adds the flows in `specs` all or nothing, returning their ids in order. relayd's
    /// sockets on the flows' relay addresses take the packets the kernel passes up.
    pub fn add(&self, specs: &[FlowSpec], now_ns: u64) -> Result<Vec<u32>, FlowError> {
        self.add_served(specs, now_ns, SlowPath::Sockets)
    }

    /// Offloads flows whose relay addresses another component's sockets serve (the TURN
    /// server): only the kernel datapath is touched.
    pub fn offload(&self, specs: &[FlowSpec], now_ns: u64) -> Result<Vec<u32>, FlowError> {
        self.add_served(specs, now_ns, SlowPath::External)
    }

    fn add_served(
        &self,
        specs: &[FlowSpec],
        now_ns: u64,
        slow_path: SlowPath,
    ) -> Result<Vec<u32>, FlowError> {
        let mut state = self.state();
        for (index, spec) in specs.iter().enumerate() {
            spec.validate()?;
            let key = spec.id();
            if let Some(&id) = state.by_key.get(&key) {
                return Err(FlowError::Duplicate { id, key });
            }
            if specs[..index].iter().any(|other| other.id() == key) {
                return Err(FlowError::DuplicateInRequest { key });
            }
        }
        if state.flows.len() + specs.len() > self.capacity as usize {
            return Err(FlowError::Full {
                capacity: self.capacity,
            });
        }
        let mut added: Vec<(u32, FlowSpec)> = Vec::new();
        for spec in specs {
            let id = state.next_id;
            if let Err(err) = self.datapath.install(id, 1, spec, slow_path) {
                for (_, spec) in &added {
                    self.datapath.remove(spec);
                }
                return Err(err.into());
            }
            added.push((id, *spec));
            state.next_id += 1;
        }
        for (id, spec) in &added {
            state.by_key.insert(spec.id(), *id);
            state.flows.insert(*id, record(*spec, 1, now_ns));
        }
        Ok(added.into_iter().map(|(id, _)| id).collect())
    }

    pub fn remove(&self, id: u32, now_ns: u64) -> Result<FlowInfo, FlowError> {
        let mut state = self.state();
        let info = self.info(
            id,
            state.flows.get(&id).ok_or(FlowError::UnknownFlow(id))?,
            now_ns,
        );
        self.forget(&mut state, id);
        Ok(info)
    }

    /// The id of the flow with this key, if installed.
    pub fn find(&self, key: FlowId) -> Option<u32> {
        self.state().by_key.get(&key).copied()
    }

    pub fn get(&self, id: u32, now_ns: u64) -> Result<FlowInfo, FlowError> {
        let state = self.state();
        let record = state.flows.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        Ok(self.info(id, record, now_ns))
    }

    pub fn list(&self, now_ns: u64) -> Vec<FlowInfo> {
        let state = self.state();
        state
            .flows
            .iter()
            .map(|(id, record)| self.info(*id, record, now_ns))
            .collect()
    }

    /// Samples rates and removes flows idle longer than the timeout; returns what it removed.
    pub fn tick(&self, now_ns: u64) -> Vec<FlowInfo> {
        let mut state = self.state();
        let mut expired = Vec::new();
        for (id, record) in state.flows.iter_mut() {
            let counters = self.datapath.counters(&record.spec);
            let packets = counters.packets();
            if record.rate.at_ns != 0 && now_ns > record.rate.at_ns {
                let elapsed = (now_ns - record.rate.at_ns) as f64 / 1e9;
                record.rate.pps = packets.saturating_sub(record.rate.packets) as f64 / elapsed;
            }
            record.rate.at_ns = now_ns;
            record.rate.packets = packets;
            let last = counters.last_seen_ns.max(record.installed_ns);
            if now_ns.saturating_sub(last) > self.idle_timeout_ns {
                expired.push(self.info(*id, record, now_ns));
            }
        }
        for info in &expired {
            self.forget(&mut state, info.id);
            state.expired_total += 1;
        }
        expired
    }

    fn forget(&self, state: &mut State, id: u32) {
        if let Some(record) = state.flows.remove(&id) {
            state.by_key.remove(&record.spec.id());
            self.datapath.remove(&record.spec);
        }
    }

    fn info(&self, id: u32, record: &FlowRecord, now_ns: u64) -> FlowInfo {
        let counters = self.datapath.counters(&record.spec);
        let last = counters.last_seen_ns.max(record.installed_ns);
        FlowInfo {
            id,
            generation: record.generation,
            spec: record.spec,
            counters,
            rate_pps: record.rate.pps,
            idle_secs: now_ns.saturating_sub(last) as f64 / 1e9,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("flow table poisoned")
    }
}

/// "src A -> dst B", and the channel when the key has one.
fn describe((src, dst, channel): &FlowId) -> String {
    match channel {
        0 => format!("src {src} -> dst {dst}"),
        channel => format!("src {src} -> dst {dst} channel {channel:#06x}"),
    }
}

fn record(spec: FlowSpec, generation: u32, now_ns: u64) -> FlowRecord {
    FlowRecord {
        spec,
        generation,
        installed_ns: now_ns,
        rate: RateSample::default(),
    }
}
