//! `relayctl calls list|hangup`.

use clap::Subcommand;
use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{CallsHangupParams, CallsListResult, method},
};
use serde_json::Value;

use crate::output;

#[derive(Subcommand, Debug)]
pub enum CallsCommand {
    /// Calls in progress: user, state, the app's address, PBX and LAN legs, flows, traffic
    List,
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
            } else if result.calls.is_empty() {
                println!("no calls");
            } else {
                let mut table = output::Table::new(&[
                    "CALL", "TENANT", "USER", "STATE", "APP", "PBX", "LAN", "FLOWS", "PACKETS",
                    "BYTES",
                ])
                .right_aligned(&["CALL", "FLOWS", "PACKETS", "BYTES"]);
                for call in &result.calls {
                    table.row(vec![
                        call.call.to_string(),
                        call.tenant.clone(),
                        call.user.clone(),
                        call.state.clone(),
                        call.app.map_or("-".to_owned(), |a| a.to_string()),
                        call.pbx.map_or("-".to_owned(), |a| a.to_string()),
                        call.lan.to_string(),
                        call.flows.len().to_string(),
                        output::count(call.packets),
                        output::bytes(call.bytes),
                    ]);
                }
                table.print();
            }
        }
        CallsCommand::Hangup { call } => {
            let params = CallsHangupParams { call: *call };
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
