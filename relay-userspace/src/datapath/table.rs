//! The flow table the control plane works with: ids, duplicate keys, capacity, rates and idle
//! expiry, over whichever [`Datapath`] forwards the packets.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

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
#[derive(Debug, Clone, PartialEq)]
pub struct FlowInfo {
    pub id: u32,
    pub generation: u32,
    pub spec: FlowSpec,
    pub counters: FlowCounters,
    /// Packets per second over the last sampling interval.
    pub rate_pps: f64,
    /// Seconds since the last packet (or since installation).
    pub idle_secs: f64,
}

struct FlowRecord {
    spec: FlowSpec,
    /// 1 when installed, one more at each [`FlowTable::replace`].
    generation: u32,
    slow_path: SlowPath,
    /// Its owner ends it (a call: hangup, media timeout, consent): never expired idle.
    owned: bool,
    installed_ns: u64,
    rate: RateSample,
}

/// What the last tick read from the flow's kernel counters.
#[derive(Default)]
struct RateSample {
    /// 0: not sampled yet.
    at_ns: u64,
    packets: u64,
    pps: f64,
    last_seen_ns: u64,
}

#[derive(Default)]
struct State {
    flows: BTreeMap<u32, FlowRecord>,
    by_key: HashMap<FlowId, u32>,
    next_id: u32,
    expired_total: u64,
    /// The final counters of the latest expired flows, for their owners' totals (ids are
    /// not reused); the oldest go first.
    expired: HashMap<u32, FlowCounters>,
    expired_order: std::collections::VecDeque<u32>,
    /// Ticks since the last one that read the counters; None before the first.
    ticks_unread: Option<u64>,
}

/// How many expired flows' final counters are kept.
const EXPIRED_KEPT: usize = 16_384;

/// Flows whose counters a tick reads each second (see [`FlowTable::tick`]): what a batch
/// read of the kernel map and the table's own pass cost well under 1% of a core for.
pub const FLOWS_READ_PER_TICK: usize = 10_000;

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
            // A flow to the workers of the relayd that installed it: their handlers went
            // with it. Its call, once restored, is steered again.
            if spec.to_worker {
                tracing::info!(id, src = %spec.src, dst = %spec.dst, "pinned flow of an earlier relayd's transcryption workers removed");
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
            state
                .flows
                .insert(id, record(spec, generation, slow_path, now_ns));
            state.next_id = state.next_id.max(id + 1);
        }
    }

    pub fn status(&self) -> DatapathStatus {
        self.datapath.status()
    }

    pub fn stats(&self) -> DatapathStats {
        self.datapath.stats()
    }

    /// The AF_XDP transcryption workers, when the datapath has them.
    pub fn workers(&self) -> Option<&super::worker::Workers> {
        self.datapath.workers()
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
        self.add_served(specs, now_ns, SlowPath::Sockets, false, |_| {})
    }

    /// Offloads flows whose relay addresses another component's sockets serve (the TURN
    /// server): only the kernel datapath is touched.
    pub fn offload(&self, specs: &[FlowSpec], now_ns: u64) -> Result<Vec<u32>, FlowError> {
        self.add_served(specs, now_ns, SlowPath::External, false, |_| {})
    }

    /// [`FlowTable::offload`] for flows whose owner ends them itself (a call, by hangup,
    /// media timeout or consent): never expired idle, so a call silent longer than
    /// `flows.idle_timeout_secs` (on hold) keeps its media in the kernel when it resumes,
    /// and its media timeout reads their counters.
    pub fn offload_owned(&self, specs: &[FlowSpec], now_ns: u64) -> Result<Vec<u32>, FlowError> {
        self.add_served(specs, now_ns, SlowPath::External, true, |_| {})
    }

    /// [`FlowTable::offload_owned`] for one flow, with `prepare` told its id before the
    /// datapath sees the flow (the transcryption workers get the flow's handler before the
    /// program steers a packet of it to them).
    pub fn offload_owned_prepared(
        &self,
        spec: FlowSpec,
        now_ns: u64,
        prepare: impl FnMut(u32),
    ) -> Result<u32, FlowError> {
        Ok(self.add_served(&[spec], now_ns, SlowPath::External, true, prepare)?[0])
    }

    fn add_served(
        &self,
        specs: &[FlowSpec],
        now_ns: u64,
        slow_path: SlowPath,
        owned: bool,
        mut prepare: impl FnMut(u32),
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
            prepare(id);
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
            let mut record = record(*spec, 1, slow_path, now_ns);
            record.owned = owned;
            state.flows.insert(*id, record);
        }
        Ok(added.into_iter().map(|(id, _)| id).collect())
    }

    /// Replaces flow `id` with `spec`, keeping its id and bumping its generation (a call's
    /// media moved). With the same key the datapath replaces it in place and its counters go
    /// on; with another key (the app's new address) the old key's flow goes and the new one
    /// starts counting from zero. Returns the flow as it was just before, with its counters.
    pub fn replace(&self, id: u32, spec: FlowSpec, now_ns: u64) -> Result<FlowInfo, FlowError> {
        spec.validate()?;
        let mut state = self.state();
        let record = state.flows.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        let before = self.info(id, record, now_ns);
        let (old, slow_path, generation) = (record.spec, record.slow_path, record.generation + 1);
        let key = spec.id();
        if let Some(&other) = state.by_key.get(&key)
            && other != id
        {
            return Err(FlowError::Duplicate { id: other, key });
        }
        self.datapath.install(id, generation, &spec, slow_path)?;
        if old.id() != key {
            self.datapath.remove(&old);
            state.by_key.remove(&old.id());
            state.by_key.insert(key, id);
        }
        let record = state.flows.get_mut(&id).expect("looked up above");
        record.spec = spec;
        record.generation = generation;
        record.rate = RateSample::default();
        Ok(before)
    }

    /// Flow `id`'s relay addresses are served by their owner from now on (a restored call
    /// has its ICE port and LAN sockets): relayd's own sockets for it, bound when the flow
    /// was adopted from the pins, close; the kernel entry stays as it is. The owner ends it
    /// too: it is not expired idle (see [`FlowTable::offload_owned`]).
    pub fn serve_externally(&self, id: u32) -> Result<(), FlowError> {
        let mut state = self.state();
        let record = state.flows.get_mut(&id).ok_or(FlowError::UnknownFlow(id))?;
        record.owned = true;
        if record.slow_path == SlowPath::External {
            return Ok(());
        }
        self.datapath
            .install(id, record.generation, &record.spec, SlowPath::External)?;
        record.slow_path = SlowPath::External;
        Ok(())
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

    /// Whether flow `id` is in the table (no read of its kernel counters).
    pub fn contains(&self, id: u32) -> bool {
        self.state().flows.contains_key(&id)
    }

    pub fn get(&self, id: u32, now_ns: u64) -> Result<FlowInfo, FlowError> {
        let state = self.state();
        let record = state.flows.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        Ok(self.info(id, record, now_ns))
    }

    /// The flow's last packet (CLOCK_MONOTONIC ns) as the last tick read it, without a
    /// read of the kernel counters of its own (read now if no tick has yet): what a check
    /// of every call each second can afford.
    pub fn sampled_last_seen_ns(&self, id: u32) -> Result<u64, FlowError> {
        let state = self.state();
        let record = state.flows.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        if record.rate.at_ns == 0 {
            return Ok(self.datapath.counters(&record.spec).last_seen_ns);
        }
        Ok(record.rate.last_seen_ns)
    }

    pub fn list(&self, now_ns: u64) -> Vec<FlowInfo> {
        let state = self.state();
        let flows: Vec<(u32, FlowSpec)> = state
            .flows
            .iter()
            .map(|(id, record)| (*id, record.spec))
            .collect();
        let all = self.datapath.counters_of(&flows);
        state
            .flows
            .iter()
            .zip(all)
            .map(|((id, record), counters)| info(*id, record, counters, now_ns))
            .collect()
    }

    /// Samples rates and removes flows idle longer than the timeout; returns what it removed.
    /// Called once a second. Up to [`FLOWS_READ_PER_TICK`] flows, every call reads every
    /// flow's counters; a larger table is read every `ceil(flows / FLOWS_READ_PER_TICK)`
    /// calls, so rates, last-seen times and idle expiry are that many seconds coarser and
    /// the reading costs the same per second as at that size. The counters are read
    /// without holding the table, which flow changes need meanwhile.
    pub fn tick(&self, now_ns: u64) -> Vec<FlowInfo> {
        let (flows, generations): (Vec<(u32, FlowSpec)>, Vec<u32>) = {
            let mut state = self.state();
            let every = state.flows.len().div_ceil(FLOWS_READ_PER_TICK).max(1) as u64;
            match state.ticks_unread {
                Some(unread) if unread + 1 < every => {
                    state.ticks_unread = Some(unread + 1);
                    return Vec::new();
                }
                _ => state.ticks_unread = Some(0),
            }
            state
                .flows
                .iter()
                .map(|(id, record)| ((*id, record.spec), record.generation))
                .unzip()
        };
        let all = self.datapath.counters_of(&flows);
        let mut state = self.state();
        let mut expired = Vec::new();
        // Both in id order; a flow removed meanwhile is not in the table, one replaced
        // meanwhile (another generation) waits for the next reading.
        let mut read = flows.iter().zip(generations).zip(all).peekable();
        for (id, record) in state.flows.iter_mut() {
            while read
                .next_if(|(((read_id, _), _), _)| read_id < id)
                .is_some()
            {}
            let Some((((_, _), generation), counters)) =
                read.next_if(|(((read_id, _), _), _)| read_id == id)
            else {
                continue;
            };
            if generation != record.generation {
                continue;
            }
            let packets = counters.packets();
            if record.rate.at_ns != 0 && now_ns > record.rate.at_ns {
                let elapsed = (now_ns - record.rate.at_ns) as f64 / 1e9;
                record.rate.pps = packets.saturating_sub(record.rate.packets) as f64 / elapsed;
            }
            record.rate.at_ns = now_ns;
            record.rate.packets = packets;
            record.rate.last_seen_ns = counters.last_seen_ns;
            let last = counters.last_seen_ns.max(record.installed_ns);
            if !record.owned && now_ns.saturating_sub(last) > self.idle_timeout_ns {
                expired.push(info(*id, record, counters, now_ns));
            }
        }
        for info in &expired {
            self.forget(&mut state, info.id);
            state.expired_total += 1;
            state.expired.insert(info.id, info.counters);
            state.expired_order.push_back(info.id);
            if state.expired_order.len() > EXPIRED_KEPT
                && let Some(oldest) = state.expired_order.pop_front()
            {
                state.expired.remove(&oldest);
            }
        }
        expired
    }

    /// What flow `id` had counted when the table expired it (one of the latest
    /// 16,384 expiries).
    pub fn expired_counters(&self, id: u32) -> Option<FlowCounters> {
        self.state().expired.get(&id).copied()
    }

    fn forget(&self, state: &mut State, id: u32) {
        if let Some(record) = state.flows.remove(&id) {
            state.by_key.remove(&record.spec.id());
            self.datapath.remove(&record.spec);
        }
    }

    fn info(&self, id: u32, record: &FlowRecord, now_ns: u64) -> FlowInfo {
        info(id, record, self.datapath.counters(&record.spec), now_ns)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("flow table poisoned")
    }
}

fn info(id: u32, record: &FlowRecord, counters: FlowCounters, now_ns: u64) -> FlowInfo {
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

/// "src A -> dst B", and the channel when the key has one.
fn describe((src, dst, channel): &FlowId) -> String {
    match channel {
        0 => format!("src {src} -> dst {dst}"),
        channel => format!("src {src} -> dst {dst} channel {channel:#06x}"),
    }
}

fn record(spec: FlowSpec, generation: u32, slow_path: SlowPath, now_ns: u64) -> FlowRecord {
    FlowRecord {
        spec,
        generation,
        slow_path,
        owned: false,
        installed_ns: now_ns,
        rate: RateSample::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::datapath::{ChannelOp, memory::Memory as Fake};

    const SECOND: u64 = 1_000_000_000;

    fn spec(client_port: u16) -> FlowSpec {
        FlowSpec {
            src: format!("198.51.100.7:{client_port}").parse().unwrap(),
            dst: "203.0.113.1:20000".parse().unwrap(),
            new_src: "10.0.0.1:30000".parse().unwrap(),
            new_dst: "10.0.0.5:5004".parse().unwrap(),
            channel: None,
            rtcp_to_userspace: false,
            opaque_payload: false,
            to_worker: false,
        }
    }

    fn table(fake: Fake) -> (FlowTable, Arc<Fake>) {
        let fake = Arc::new(fake);
        (FlowTable::new(Box::new(fake.clone()), 60, SECOND), fake)
    }

    fn kernel(fake: &Fake) -> Vec<(u32, u32, FlowSpec)> {
        let mut flows: Vec<_> = fake.installed.lock().unwrap().values().copied().collect();
        flows.sort_by_key(|(id, _, _)| *id);
        flows
    }

    #[test]
    fn flows_get_ids_in_order_and_a_duplicate_key_is_refused() {
        let (table, fake) = table(Fake::default());
        let ids = table
            .add(&[spec(4000), spec(4000).reverse()], SECOND)
            .unwrap();
        assert_eq!(ids, [1, 2]);
        assert_eq!(kernel(&fake).len(), 2);
        let err = table.add(&[spec(4000)], SECOND).unwrap_err();
        assert!(matches!(err, FlowError::Duplicate { id: 1, .. }), "{err}");
        assert_eq!(err.field(), Some("src"));
        let err = table.add(&[spec(4001), spec(4001)], SECOND).unwrap_err();
        assert!(matches!(err, FlowError::DuplicateInRequest { .. }), "{err}");
        assert_eq!(table.len(), 2, "refused requests change nothing");
        assert_eq!(table.find(spec(4000).id()), Some(1));
    }

    #[test]
    fn a_request_that_does_not_fit_or_fails_changes_nothing() {
        let (table, fake) = table(Fake {
            refuse: Some(spec(4003)),
            ..Fake::default()
        });
        table.add(&[spec(4000), spec(4001)], SECOND).unwrap();
        let err = table
            .add(&[spec(4002), spec(4005), spec(4006)], SECOND)
            .unwrap_err();
        assert!(matches!(err, FlowError::Full { capacity: 4 }), "{err}");
        // The second flow fails in the datapath: the first, installed already, is taken out.
        let err = table.add(&[spec(4002), spec(4003)], SECOND).unwrap_err();
        assert!(matches!(err, FlowError::Datapath(_)), "{err}");
        assert_eq!(table.len(), 2);
        assert_eq!(
            kernel(&fake).len(),
            2,
            "all or nothing: {:?}",
            kernel(&fake)
        );
        assert!(table.find(spec(4002).id()).is_none());
        // An invalid spec names its field.
        let mut bad = spec(4004);
        bad.new_dst = bad.src;
        assert_eq!(
            table.add(&[bad], SECOND).unwrap_err().field(),
            Some("new_dst")
        );
    }

    #[test]
    fn idle_flows_expire_and_busy_ones_stay() {
        let (table, fake) = table(Fake::default());
        let ids = table.add(&[spec(4000), spec(4001)], SECOND).unwrap();
        assert!(table.tick(30 * SECOND).is_empty());
        fake.counters.lock().unwrap().insert(
            spec(4001).id(),
            FlowCounters {
                xdp_packets: 500,
                last_seen_ns: 60 * SECOND,
                ..FlowCounters::default()
            },
        );
        let expired = table.tick(62 * SECOND);
        assert_eq!(
            expired.iter().map(|f| f.id).collect::<Vec<_>>(),
            [ids[0]],
            "idle since it was installed, 61 s > 60 s"
        );
        assert_eq!(table.expired_total(), 1);
        assert_eq!(kernel(&fake).len(), 1);
        // Its final counters stay for its owner; a flow that did not expire has none.
        assert_eq!(table.expired_counters(ids[0]), Some(expired[0].counters));
        assert_eq!(table.expired_counters(ids[1]), None);
        let busy = table.get(ids[1], 62 * SECOND).unwrap();
        assert_eq!(busy.counters.xdp_packets, 500);
        // A flow its owner ends (a call's) stays however long it is idle.
        let owned = table.offload_owned(&[spec(4002)], 62 * SECOND).unwrap()[0];
        assert!(table.tick(200 * SECOND).iter().all(|flow| flow.id != owned));
        assert!(table.contains(owned));
        // 500 packets between the two samples, 32 s apart.
        assert!(
            (busy.rate_pps - 500.0 / 32.0).abs() < 0.01,
            "{}",
            busy.rate_pps
        );
    }

    #[test]
    fn a_table_larger_than_a_tick_reads_is_read_every_few_ticks() {
        let (table, fake) = table(Fake {
            capacity: Some(20_000),
            ..Fake::default()
        });
        let flows = FLOWS_READ_PER_TICK as u16 + 1;
        let specs: Vec<FlowSpec> = (0..flows).map(|n| spec(4000 + n)).collect();
        let ids = table.add(&specs, SECOND).unwrap();
        let count = |packets| {
            fake.counters.lock().unwrap().insert(
                specs[0].id(),
                FlowCounters {
                    xdp_packets: packets,
                    last_seen_ns: 2 * SECOND,
                    ..FlowCounters::default()
                },
            );
        };
        let sampled = |table: &FlowTable| table.sampled_last_seen_ns(ids[0]).unwrap();
        count(100);
        assert!(table.tick(2 * SECOND).is_empty());
        assert_eq!(sampled(&table), 2 * SECOND, "the first tick reads");
        count(300);
        table.tick(3 * SECOND);
        assert_eq!(
            table.get(ids[0], 3 * SECOND).unwrap().rate_pps,
            0.0,
            "10,001 flows: the second tick reads nothing"
        );
        table.tick(4 * SECOND);
        assert_eq!(
            table.get(ids[0], 4 * SECOND).unwrap().rate_pps,
            100.0,
            "the third reads again: 200 packets in 2 s"
        );
        // Flows idle past the timeout still go, on a tick that reads.
        let expired = table.tick(62 * SECOND);
        assert!(expired.is_empty(), "a tick that does not read");
        assert_eq!(table.tick(63 * SECOND).len(), usize::from(flows));
    }

    #[test]
    fn pinned_flows_are_adopted_with_their_ids_and_new_ones_come_after() {
        let pinned = spec(4000);
        let mut channel = spec(4001);
        channel.channel = Some(ChannelOp::Strip(0x4001));
        let (table, fake) = table(Fake {
            pinned: vec![(7, 3, pinned), (7, 1, spec(4002)), (9, 1, channel)],
            ..Fake::default()
        });
        // The second id 7 is a duplicate: removed, not adopted.
        assert_eq!(
            table
                .list(SECOND)
                .iter()
                .map(|f| (f.id, f.generation))
                .collect::<Vec<_>>(),
            [(7, 3), (9, 1)]
        );
        assert_eq!(kernel(&fake).len(), 2);
        assert_eq!(table.add(&[spec(4003)], SECOND).unwrap(), [10]);
    }

    #[test]
    fn a_replaced_flow_keeps_its_id_and_counts_a_generation_more() {
        let (table, fake) = table(Fake::default());
        let id = table.add(&[spec(4000)], SECOND).unwrap()[0];
        let other = table.add(&[spec(4001)], SECOND).unwrap()[0];
        // Same key, new destination (the PBX moved): replaced in place.
        let mut moved = spec(4000);
        moved.new_dst = "10.0.0.6:5004".parse().unwrap();
        let before = table.replace(id, moved, 2 * SECOND).unwrap();
        assert_eq!((before.generation, before.spec), (1, spec(4000)));
        assert_eq!(kernel(&fake)[0], (id, 2, moved));
        // Another key (the app moved): the old key's flow is gone, the id stays.
        let from_elsewhere = spec(4010);
        table.replace(id, from_elsewhere, 3 * SECOND).unwrap();
        assert_eq!(table.find(from_elsewhere.id()), Some(id));
        assert_eq!(table.find(spec(4000).id()), None);
        assert_eq!(
            kernel(&fake),
            [(id, 3, from_elsewhere), (other, 1, spec(4001))]
        );
        assert_eq!(table.get(id, 3 * SECOND).unwrap().generation, 3);
        // Onto another flow's key: refused, nothing changes.
        let err = table.replace(id, spec(4001), 4 * SECOND).unwrap_err();
        assert!(
            matches!(err, FlowError::Duplicate { id, .. } if id == other),
            "{err}"
        );
        assert_eq!(
            kernel(&fake),
            [(id, 3, from_elsewhere), (other, 1, spec(4001))]
        );
        assert!(matches!(
            table.replace(99, spec(4020), SECOND),
            Err(FlowError::UnknownFlow(99))
        ));
    }
}
