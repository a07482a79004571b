//! A datapath in memory, for unit tests of what sits on the flow table: it keeps what was
//! installed, returns counters a test sets, "finds" pinned flows at start, and can refuse
//! one spec (as a relay address it cannot bind).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::{
    Datapath, DatapathError, DatapathKind, DatapathStats, DatapathStatus, FlowCounters, FlowSpec,
    SlowPath, SocketStats, flow::FlowId,
};

/// A datapath in memory: what the table installed, counters a test sets, flows "found
/// pinned" at start, and a spec it refuses (a relay address it "cannot bind").
#[derive(Default)]
pub struct Memory {
    pub installed: Mutex<HashMap<FlowId, (u32, u32, FlowSpec)>>,
    pub counters: Mutex<HashMap<FlowId, FlowCounters>>,
    pub pinned: Vec<(u32, u32, FlowSpec)>,
    pub refuse: Option<FlowSpec>,
    /// The capacity it reports; 4 when not set.
    pub capacity: Option<u32>,
}

impl Datapath for Arc<Memory> {
    fn status(&self) -> DatapathStatus {
        DatapathStatus {
            kind: DatapathKind::Userspace,
            interfaces: Vec::new(),
            capacity: self.capacity.unwrap_or(4),
            fallback_reason: None,
            pin_dir: None,
            workers: None,
            workers_reason: None,
        }
    }

    fn install(
        &self,
        id: u32,
        generation: u32,
        spec: &FlowSpec,
        _slow_path: SlowPath,
    ) -> Result<(), DatapathError> {
        if self.refuse == Some(*spec) {
            return Err(DatapathError::Map("refused".into()));
        }
        self.installed
            .lock()
            .unwrap()
            .insert(spec.id(), (id, generation, *spec));
        Ok(())
    }

    fn remove(&self, spec: &FlowSpec) {
        self.installed.lock().unwrap().remove(&spec.id());
    }

    fn counters(&self, spec: &FlowSpec) -> FlowCounters {
        self.counters
            .lock()
            .unwrap()
            .get(&spec.id())
            .copied()
            .unwrap_or_default()
    }

    fn stats(&self) -> DatapathStats {
        DatapathStats {
            verdicts: Vec::new(),
            userspace: SocketStats::default(),
        }
    }

    fn installed(&self) -> Vec<(u32, u32, FlowSpec)> {
        self.pinned.clone()
    }
}
