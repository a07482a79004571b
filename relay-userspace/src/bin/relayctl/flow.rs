//! `relayctl flow add|del|list|show`.

use clap::Subcommand;
use relay::{
    control::{
        client::{ClientError, ControlClient},
        protocol::{FlowAddParams, FlowAddResult, FlowIdParams, FlowListResult, method},
        server::parse_endpoint,
    },
    datapath::table::FlowInfo,
};
use serde_json::{Value, json};

use crate::output;

#[derive(Subcommand, Debug)]
pub enum FlowCommand {
    /// Forward UDP from SRC arriving at the relay address DST: re-send it from NEW_SRC to NEW_DST
    Add {
        /// Sender the packets must come from (strict source), ADDRESS:PORT
        #[arg(long, value_parser = endpoint)]
        src: String,
        /// Relay address:port the packets arrive at
        #[arg(long, value_parser = endpoint)]
        dst: String,
        /// Relay address:port to send from
        #[arg(long, value_parser = endpoint)]
        new_src: String,
        /// Where to send them
        #[arg(long, value_parser = endpoint)]
        new_dst: String,
        /// Also add the reverse direction (NEW_DST -> NEW_SRC re-sent from DST to SRC)
        #[arg(long)]
        reverse: bool,
    },
    /// Remove a flow
    Del { id: u32 },
    /// List flows with packets, bytes, rate and idle time
    List,
    /// Show one flow in detail
    Show { id: u32 },
}

/// Checks the syntax locally so that a typo is reported before relayd is asked.
fn endpoint(text: &str) -> Result<String, String> {
    parse_endpoint(text).map(|_| text.to_owned())
}

pub fn run(
    client: &mut ControlClient,
    command: &FlowCommand,
    json: bool,
) -> Result<(), ClientError> {
    match command {
        FlowCommand::Add {
            src,
            dst,
            new_src,
            new_dst,
            reverse,
        } => {
            let params = FlowAddParams {
                src: src.clone(),
                dst: dst.clone(),
                new_src: new_src.clone(),
                new_dst: new_dst.clone(),
                reverse: *reverse,
            };
            let added: FlowAddResult = client.call_as(
                method::FLOW_ADD,
                serde_json::to_value(params).expect("serializes"),
            )?;
            if json {
                output::json(&added);
            } else {
                for id in &added.ids {
                    println!("flow {id} added");
                }
            }
        }
        FlowCommand::Del { id } => {
            let removed: FlowInfo = client.call_as(method::FLOW_DEL, id_params(*id))?;
            if json {
                output::json(&removed);
            } else {
                println!(
                    "flow {} removed after {} packets ({})",
                    removed.id,
                    removed.counters.packets(),
                    output::bytes(removed.counters.bytes())
                );
            }
        }
        FlowCommand::List => {
            let list: FlowListResult = client.call_as(method::FLOW_LIST, Value::Null)?;
            if json {
                output::json(&list);
            } else if list.flows.is_empty() {
                println!("no flows");
            } else {
                let mut table = output::Table::new(&[
                    "ID", "SRC", "DST", "NEW SRC", "NEW DST", "PACKETS", "BYTES", "RATE", "XDP%",
                    "IDLE",
                ])
                .right_aligned(&["ID", "PACKETS", "BYTES", "RATE", "XDP%", "IDLE"]);
                for flow in &list.flows {
                    let packets = flow.counters.packets();
                    let xdp_share = if packets == 0 {
                        "-".to_owned()
                    } else {
                        format!(
                            "{:.1}",
                            flow.counters.xdp_packets as f64 * 100.0 / packets as f64
                        )
                    };
                    table.row(vec![
                        flow.id.to_string(),
                        flow.spec.src.to_string(),
                        flow.spec.dst.to_string(),
                        flow.spec.new_src.to_string(),
                        flow.spec.new_dst.to_string(),
                        output::count(packets),
                        output::bytes(flow.counters.bytes()),
                        format!("{}/s", output::count(flow.rate_pps.round() as u64)),
                        xdp_share,
                        output::duration(flow.idle_secs),
                    ]);
                }
                table.print();
            }
        }
        FlowCommand::Show { id } => {
            let flow: FlowInfo = client.call_as(method::FLOW_SHOW, id_params(*id))?;
            if json {
                output::json(&flow);
            } else {
                let c = &flow.counters;
                println!("flow        {} (generation {})", flow.id, flow.generation);
                println!("match       {} -> {}", flow.spec.src, flow.spec.dst);
                println!("send        {} -> {}", flow.spec.new_src, flow.spec.new_dst);
                println!(
                    "xdp         {} packets, {}",
                    c.xdp_packets,
                    output::bytes(c.xdp_bytes)
                );
                println!(
                    "userspace   {} packets, {}",
                    c.userspace_packets,
                    output::bytes(c.userspace_bytes)
                );
                println!("rate        {:.0} packets/s", flow.rate_pps);
                println!("idle        {}", output::duration(flow.idle_secs));
            }
        }
    }
    Ok(())
}

fn id_params(id: u32) -> Value {
    json!(FlowIdParams { id })
}
