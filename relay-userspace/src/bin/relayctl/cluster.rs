//! `relayctl cluster status`.

use clap::Subcommand;
use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{ClusterNodeParams, ClusterStatusResult, ClusterSummary, method},
};
use serde_json::Value;

use crate::output;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// This node's link to Redis and every member's health and load, as last read
    Status,
    /// Remove a member that is down for good (decommissioned) from the cluster's list
    Forget {
        /// The member's node name, as `cluster status` shows it
        node: String,
    },
}

pub fn run(
    client: &mut ControlClient,
    command: &ClusterCommand,
    json: bool,
) -> Result<(), ClientError> {
    match command {
        ClusterCommand::Forget { node } => {
            let result: Value = client.call_as(
                method::CLUSTER_FORGET,
                serde_json::to_value(ClusterNodeParams { node: node.clone() })
                    .expect("params serialize"),
            )?;
            if json {
                output::json(&result);
            } else {
                println!("{node} forgotten: no longer a member");
            }
        }
        ClusterCommand::Status => {
            let result: ClusterStatusResult =
                client.call_as(method::CLUSTER_STATUS, Value::Null)?;
            if json {
                output::json(&result);
                return Ok(());
            }
            println!("{}", summary_line(&result.summary));
            let read = match result.read_secs_ago {
                Some(secs) => format!("read {} ago", output::duration(secs as f64)),
                None => "never read".to_owned(),
            };
            println!(
                "members     {} alive of {} ({read}; a member is down {}s after its last refresh)",
                result.summary.nodes_alive, result.summary.nodes, result.health_ttl_secs
            );
            if result.members.is_empty() {
                return Ok(());
            }
            println!();
            let mut table = output::Table::new(&[
                "NODE", "STATE", "CALLS", "ALLOCS", "SESSIONS", "FLOWS", "CPU", "UPTIME", "VERSION",
            ])
            .right_aligned(&["CALLS", "ALLOCS", "SESSIONS", "FLOWS", "CPU", "UPTIME"]);
            for member in &result.members {
                let name = if member.this_node {
                    format!("{} (this)", member.node)
                } else {
                    member.node.clone()
                };
                let row = match &member.load {
                    Some(load) => vec![
                        name,
                        if load.standby {
                            "standby".to_owned()
                        } else {
                            member.state.clone()
                        },
                        match load.max_calls {
                            0 => output::count(load.calls as u64),
                            max => format!(
                                "{}/{}",
                                output::count(load.calls as u64),
                                output::count(max as u64)
                            ),
                        },
                        output::count(load.allocations as u64),
                        output::count(load.sessions as u64),
                        output::count(load.flows as u64),
                        format!("{:.1}%", load.cpu_percent),
                        output::duration(load.uptime_secs as f64),
                        load.version.clone(),
                    ],
                    None => {
                        let mut row = vec![name, member.state.clone()];
                        row.extend(std::iter::repeat_n("-".to_owned(), 7));
                        row
                    }
                };
                table.row(row);
            }
            table.print();
            for member in &result.members {
                if let Some(reason) = &member.reason {
                    println!("{}: {reason}", member.node);
                }
            }
        }
    }
    Ok(())
}

/// `cluster     node edge-a, Redis redis://... up for 3m12s`, or degraded with the reason.
pub fn summary_line(summary: &ClusterSummary) -> String {
    let since = output::duration(summary.since_secs as f64);
    let state = match summary.redis.as_str() {
        "up" => format!("up for {since}"),
        "degraded" => format!(
            "UNAVAILABLE for {since}: serving this node's own sessions and calls only ({})",
            summary.reason.as_deref().unwrap_or("no reason given")
        ),
        other => other.to_owned(),
    };
    let role = match (&summary.standby_for, summary.standing_by) {
        (Some(active), true) => format!(" (standby of {active})"),
        (Some(active), false) => format!(" (took over from {active})"),
        (None, _) => String::new(),
    };
    format!(
        "cluster     node {}{role}, Redis {} {state}",
        summary.node, summary.redis_url
    )
}
