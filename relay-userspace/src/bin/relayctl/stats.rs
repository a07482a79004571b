//! `relayctl stats`: what the XDP program did with packets, and the userspace path's counters.

use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{StatsResult, method},
};
use serde_json::Value;

use crate::output;

pub fn run(client: &mut ControlClient, json: bool) -> Result<(), ClientError> {
    let stats: StatsResult = client.call_as(method::STATS, Value::Null)?;
    if json {
        output::json(&stats);
        return Ok(());
    }
    println!(
        "flows {} installed, {} expired (idle)",
        stats.flows, stats.flows_expired
    );
    if !stats.datapath.verdicts.is_empty() {
        println!();
        let mut table = output::Table::new(&["XDP VERDICT", "PACKETS", "BYTES"])
            .right_aligned(&["PACKETS", "BYTES"]);
        for verdict in &stats.datapath.verdicts {
            table.row(vec![
                verdict.verdict.clone(),
                output::count(verdict.packets),
                output::bytes(verdict.bytes),
            ]);
        }
        table.print();
    }
    let user = &stats.datapath.userspace;
    println!();
    let mut table = output::Table::new(&["USERSPACE PATH", "VALUE"]).right_aligned(&["VALUE"]);
    table.row(vec![
        "forwarded packets".into(),
        output::count(user.forwarded_packets),
    ]);
    table.row(vec![
        "forwarded bytes".into(),
        output::bytes(user.forwarded_bytes),
    ]);
    table.row(vec![
        "unknown source (dropped)".into(),
        output::count(user.unknown_source_packets),
    ]);
    table.row(vec![
        "malformed ChannelData (dropped)".into(),
        output::count(user.malformed_packets),
    ]);
    table.row(vec!["send errors".into(), output::count(user.send_errors)]);
    table.row(vec!["bound sockets".into(), user.bound_sockets.to_string()]);
    table.print();
    Ok(())
}
