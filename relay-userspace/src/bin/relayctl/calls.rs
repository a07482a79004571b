//! `relayctl calls list|show|hangup`.

use clap::Subcommand;
use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{CallIdParams, CallInfo, CallsListResult, NgCallListed, method},
};
use serde_json::Value;

use crate::output;

#[derive(Subcommand, Debug)]
pub enum CallsCommand {
    /// Calls in progress: user, state, the app's address and how it is reached (VIA: host,
    /// srflx/prflx through a NAT, relay through TURN), PBX and LAN legs, each leg's media
    /// security (MEDIA: app/pbx, or pass-through), flows, traffic; then the calls SIP
    /// proxies set up over ng (call-id, tags, streams, flows, traffic)
    List,
    /// One call in detail: the selected route, both legs, traffic each way
    Show {
        /// The call's number, as `calls list` shows it
        call: u64,
    },
    /// End a call (both sides are told, its flows are removed)
    Hangup {
        /// The call's number, as `calls list` shows it
        call: u64,
    },
}

pub fn run(
    client: &mut ControlClient,
    command: &CallsCommand,
    json: bool,
) -> Result<(), ClientError> {
    match command {
        CallsCommand::List => {
            let result: CallsListResult = client.call_as(method::CALLS_LIST, Value::Null)?;
            if json {
                output::json(&result);
            } else if result.calls.is_empty() && result.ng_calls.is_empty() {
                println!("no calls");
            } else {
                if !result.calls.is_empty() {
                    app_calls(&result.calls);
                }
                if !result.ng_calls.is_empty() {
                    if !result.calls.is_empty() {
                        println!();
                    }
                    ng_calls(&result.ng_calls);
                }
            }
        }
        CallsCommand::Show { call } => {
            let params = CallIdParams { call: *call };
            let info: CallInfo = client.call_as(
                method::CALLS_SHOW,
                serde_json::to_value(params).expect("serializes"),
            )?;
            if json {
                output::json(&info);
            } else {
                let or_dash = |address: Option<std::net::SocketAddr>| {
                    address.map_or("-".to_owned(), |a| a.to_string())
                };
                println!(
                    "call        {} ({}, user {})",
                    info.call, info.tenant, info.user
                );
                println!(
                    "state       {} for {}",
                    info.state,
                    output::duration(info.since_secs as f64)
                );
                println!(
                    "app leg     {} ({}) <-> relay ICE {}",
                    or_dash(info.app),
                    info.app_candidate.as_deref().unwrap_or("-"),
                    or_dash(info.ice)
                );
                println!(
                    "pbx leg     relay {} <-> PBX {}",
                    info.lan,
                    or_dash(info.pbx)
                );
                for stream in &info.streams {
                    println!(
                        "{:<11} relay {} <-> PBX {} (m-line {}, bundled toward the app)",
                        stream.media,
                        stream.lan,
                        or_dash(stream.pbx),
                        stream.line
                    );
                }
                println!(
                    "security    app {}, pbx {}",
                    info.app_security, info.pbx_security
                );
                if let Some(bridged) = &info.bridged {
                    println!(
                        "bridged     DTLS app {}, pbx {}; SRTP {}; dropped: {} failed authentication, {} replayed, {} malformed",
                        bridged.dtls,
                        bridged.pbx_dtls,
                        bridged.suite.as_deref().unwrap_or("-"),
                        bridged.auth_failures,
                        bridged.replays,
                        bridged.malformed
                    );
                    if bridged.steered_flows.is_empty() {
                        println!("            transcrypted on the call's sockets");
                    } else {
                        let flows: Vec<String> =
                            bridged.steered_flows.iter().map(u32::to_string).collect();
                        println!(
                            "            transcrypted on the AF_XDP workers (flows {})",
                            flows.join(", ")
                        );
                    }
                }
                println!(
                    "to pbx      {} packets, {}",
                    output::count(info.to_pbx.packets),
                    output::bytes(info.to_pbx.bytes)
                );
                println!(
                    "to app      {} packets, {}",
                    output::count(info.to_app.packets),
                    output::bytes(info.to_app.bytes)
                );
                let flows: Vec<String> = info.flows.iter().map(u32::to_string).collect();
                println!(
                    "flows       {} (relayctl flow show ID)",
                    if flows.is_empty() {
                        "-".to_owned()
                    } else {
                        flows.join(", ")
                    }
                );
            }
        }
        CallsCommand::Hangup { call } => {
            let params = CallIdParams { call: *call };
            let _: Value = client.call_as(
                method::CALLS_HANGUP,
                serde_json::to_value(params).expect("serializes"),
            )?;
            if json {
                output::json(&serde_json::json!({ "call": call, "hung_up": true }));
            } else {
                println!("call {call} hung up");
            }
        }
    }
    Ok(())
}

fn app_calls(calls: &[CallInfo]) {
    let mut table = output::Table::new(&[
        "CALL", "TENANT", "USER", "STATE", "APP", "VIA", "PBX", "LAN", "MEDIA", "FLOWS", "PACKETS",
        "BYTES",
    ])
    .right_aligned(&["CALL", "FLOWS", "PACKETS", "BYTES"]);
    for call in calls {
        table.row(vec![
            call.call.to_string(),
            call.tenant.clone(),
            call.user.clone(),
            call.state.clone(),
            call.app.map_or("-".to_owned(), |a| a.to_string()),
            call.app_candidate.clone().unwrap_or_else(|| "-".to_owned()),
            call.pbx.map_or("-".to_owned(), |a| a.to_string()),
            call.lan.to_string(),
            media_security(call),
            call.flows.len().to_string(),
            output::count(call.packets),
            output::bytes(call.bytes),
        ]);
    }
    table.print();
}

/// Calls a SIP proxy set up over ng, under their own header.
fn ng_calls(calls: &[NgCallListed]) {
    let mut table = output::Table::new(&[
        "NG CALL-ID",
        "FROM-TAG",
        "TO-TAG",
        "STATE",
        "ICE",
        "AGE",
        "STREAMS",
        "FLOWS",
        "PACKETS",
        "BYTES",
    ])
    .right_aligned(&["STREAMS", "FLOWS", "PACKETS", "BYTES"]);
    for call in calls {
        let tag = |tag: &str| {
            if tag.is_empty() {
                "-".to_owned()
            } else {
                tag.to_owned()
            }
        };
        table.row(vec![
            call.call_id.clone(),
            tag(&call.tags[0]),
            tag(&call.tags[1]),
            call.state.clone(),
            call.ice.clone().unwrap_or_else(|| "-".to_owned()),
            output::duration(call.since_secs as f64),
            call.streams.to_string(),
            call.flows.len().to_string(),
            output::count(call.packets),
            output::bytes(call.bytes),
        ]);
    }
    table.print();
}

/// `dtls-srtp/rtp` (app leg / PBX leg, terminated by the relay), or `pass-through`.
fn media_security(call: &CallInfo) -> String {
    if call.bridged.is_none() && call.app_security == call.pbx_security {
        call.app_security.clone()
    } else {
        format!("{}/{}", call.app_security, call.pbx_security)
    }
}
