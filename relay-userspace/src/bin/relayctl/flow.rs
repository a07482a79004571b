//! `relayctl flow add|del|list|show`.

use clap::Subcommand;
use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{
        ChannelOp, FlowAddParams, FlowAddResult, FlowIdParams, FlowInfo, FlowListResult, method,
    },
    server::parse_endpoint,
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
        /// Packets are TURN ChannelData on this channel: remove the 4-byte header
        #[arg(long, value_name = "CHANNEL", value_parser = channel_number, conflicts_with = "add_channel")]
        strip_channel: Option<u16>,
        /// Prepend a TURN ChannelData header with this channel number
        #[arg(long, value_name = "CHANNEL", value_parser = channel_number)]
        add_channel: Option<u16>,
        /// Also add the reverse direction (NEW_DST -> NEW_SRC re-sent from DST to SRC, with the
        /// opposite channel operation)
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

/// A channel number, decimal or 0x-prefixed hex (relayd checks the range).
fn channel_number(text: &str) -> Result<u16, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a channel number (e.g. 0x4000)"))
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
            strip_channel,
            add_channel,
            reverse,
        } => {
            let params = FlowAddParams {
                src: src.clone(),
                dst: dst.clone(),
                new_src: new_src.clone(),
                new_dst: new_dst.clone(),
                channel: strip_channel
                    .map(ChannelOp::Strip)
                    .or(add_channel.map(ChannelOp::Add)),
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
                    "ID", "SRC", "DST", "NEW SRC", "NEW DST", "CHANNEL", "PACKETS", "BYTES",
                    "RATE", "XDP%", "IDLE",
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
                        channel(&flow.spec.channel),
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
                println!("channel     {}", channel(&flow.spec.channel));
                if flow.spec.to_worker {
                    println!(
                        "transcrypt  AF_XDP workers (a bridged call's media; xdp counts what the program steered to them)"
                    );
                }
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

/// "strip 0x4001", "add 0x4001" or "-".
fn channel(op: &Option<ChannelOp>) -> String {
    match op {
        Some(ChannelOp::Strip(number)) => format!("strip {number:#06x}"),
        Some(ChannelOp::Add(number)) => format!("add {number:#06x}"),
        None => "-".to_owned(),
    }
}
