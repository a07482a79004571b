//! A call's two flows in the flow table, and what the flows they replaced carried (a route
//! change or a consent loss removes flows mid-call; the call's traffic keeps their counts).

use serde::{Deserialize, Serialize};

use crate::datapath::{
    FlowSpec,
    table::{FlowError, FlowTable},
};

/// Packets and bytes in one direction, both datapaths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// A call's traffic: from the app toward the PBX, and back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directions {
    pub to_pbx: Traffic,
    pub to_app: Traffic,
}

impl Directions {
    pub fn total(&self) -> Traffic {
        Traffic {
            packets: self.to_pbx.packets + self.to_app.packets,
            bytes: self.to_pbx.bytes + self.to_app.bytes,
        }
    }
}

#[derive(Debug, Default)]
pub struct CallFlows {
    to_pbx: Option<u32>,
    to_app: Option<u32>,
    retired: Directions,
}

impl CallFlows {
    /// Flows a restored call takes back from the table (adopted from the pins), toward the
    /// PBX first.
    pub fn adopt(&mut self, [to_pbx, to_app]: [Option<u32>; 2]) {
        self.to_pbx = to_pbx;
        self.to_app = to_app;
    }

    /// The installed flow ids, toward the PBX first.
    pub fn ids(&self) -> Vec<u32> {
        self.to_pbx
            .iter()
            .chain(self.to_app.iter())
            .copied()
            .collect()
    }

    /// Puts the flows of a new pair in: the installed ones are replaced in place (same ids,
    /// one generation more), missing ones added. What a replaced flow carried on a key it
    /// leaves (the app's old address) stays in the call's traffic. On an error nothing of
    /// the call is left in the table.
    pub fn install(
        &mut self,
        table: &FlowTable,
        to_pbx: FlowSpec,
        to_app: FlowSpec,
        now_ns: u64,
    ) -> Result<[u32; 2], FlowError> {
        let put = |slot: &mut Option<u32>, retired: &mut Traffic, spec: FlowSpec| {
            if let Some(id) = *slot {
                match table.replace(id, spec, now_ns) {
                    Ok(before) => {
                        if before.spec.id() != spec.id() {
                            add(retired, Some(before));
                        }
                        return Ok(id);
                    }
                    Err(err) => {
                        tracing::debug!(id, %err, "calls: a flow cannot be replaced in place; added anew");
                        add(retired, table.remove(id, now_ns).ok());
                        *slot = None;
                    }
                }
            }
            // The call ends its flows (hangup, media timeout, consent): a call silent longer
            // than flows.idle_timeout_secs (on hold) keeps them for when media resumes.
            let id = table.offload_owned(&[spec], now_ns)?[0];
            *slot = Some(id);
            Ok(id)
        };
        let installed =
            put(&mut self.to_pbx, &mut self.retired.to_pbx, to_pbx).and_then(|to_pbx| {
                Ok([
                    to_pbx,
                    put(&mut self.to_app, &mut self.retired.to_app, to_app)?,
                ])
            });
        if installed.is_err() {
            self.remove_all(table, now_ns);
        }
        installed
    }

    /// Removes the flow toward the app (consent lost), keeping the one toward the PBX.
    pub fn remove_to_app(&mut self, table: &FlowTable, now_ns: u64) {
        if let Some(id) = self.to_app.take() {
            add(&mut self.retired.to_app, table.remove(id, now_ns).ok());
        }
    }

    pub fn remove_all(&mut self, table: &FlowTable, now_ns: u64) {
        self.remove_to_app(table, now_ns);
        if let Some(id) = self.to_pbx.take() {
            add(&mut self.retired.to_pbx, table.remove(id, now_ns).ok());
        }
    }

    /// Everything the call's flows carried, removed ones included.
    pub fn traffic(&self, table: &FlowTable, now_ns: u64) -> Directions {
        let mut traffic = self.retired;
        if let Some(id) = self.to_pbx {
            add(&mut traffic.to_pbx, table.get(id, now_ns).ok());
        }
        if let Some(id) = self.to_app {
            add(&mut traffic.to_app, table.get(id, now_ns).ok());
        }
        traffic
    }

    /// CLOCK_MONOTONIC ns of the last packet through the installed flows.
    pub fn last_seen_ns(&self, table: &FlowTable, now_ns: u64) -> Option<u64> {
        self.ids()
            .into_iter()
            .filter_map(|id| table.get(id, now_ns).ok())
            .map(|flow| flow.counters.last_seen_ns)
            .max()
    }

    /// The same as the flow table's last tick read it (up to a tick old, no syscall).
    pub fn sampled_last_seen_ns(&self, table: &FlowTable) -> Option<u64> {
        self.ids()
            .into_iter()
            .filter_map(|id| table.sampled_last_seen_ns(id).ok())
            .max()
    }
}

fn add(traffic: &mut Traffic, flow: Option<crate::datapath::table::FlowInfo>) {
    if let Some(flow) = flow {
        traffic.packets += flow.counters.packets();
        traffic.bytes += flow.counters.bytes();
    }
}
