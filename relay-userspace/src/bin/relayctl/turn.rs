//! `relayctl turn allocations|revoke`.

use clap::Subcommand;
use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{TurnAllocationsResult, TurnRevokeParams, TurnRevokeResult, method},
};
use serde_json::Value;

use crate::output;

#[derive(Subcommand, Debug)]
pub enum TurnCommand {
    /// TURN allocations: user, client, relay address, permissions, channels, offload, traffic
    Allocations,
    /// Delete the allocations of a user, or the one on a relay address (ADDRESS:PORT)
    Revoke {
        /// A username, or a relay ADDRESS:PORT
        target: String,
    },
}

pub fn run(
    client: &mut ControlClient,
    command: &TurnCommand,
    json: bool,
) -> Result<(), ClientError> {
    match command {
        TurnCommand::Allocations => {
            let result: TurnAllocationsResult =
                client.call_as(method::TURN_ALLOCATIONS, Value::Null)?;
            if json {
                output::json(&result);
            } else if result.allocations.is_empty() {
                println!("no allocations");
            } else {
                let mut table = output::Table::new(&[
                    "USER",
                    "CLIENT",
                    "OVER",
                    "RELAY",
                    "PERMISSIONS",
                    "CHANNELS",
                    "OFFLOADED",
                    "PACKETS",
                    "BYTES",
                    "EXPIRES",
                ])
                .right_aligned(&[
                    "PERMISSIONS",
                    "CHANNELS",
                    "PACKETS",
                    "BYTES",
                    "EXPIRES",
                ]);
                for allocation in &result.allocations {
                    table.row(vec![
                        allocation.username.clone(),
                        allocation.client.to_string(),
                        allocation.transport.clone(),
                        allocation
                            .relays
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" "),
                        allocation.permissions.len().to_string(),
                        allocation.channels.len().to_string(),
                        if allocation.offloaded_flows > 0 {
                            format!("yes ({} flows)", allocation.offloaded_flows)
                        } else {
                            "no".to_owned()
                        },
                        output::count(allocation.packets),
                        output::bytes(allocation.bytes),
                        output::duration(allocation.expires_in_secs as f64),
                    ]);
                }
                table.print();
            }
        }
        TurnCommand::Revoke { target } => {
            // An address names a relay address; anything else is a username.
            let params = if target.parse::<std::net::SocketAddr>().is_ok() {
                TurnRevokeParams {
                    username: None,
                    relay: Some(target.clone()),
                }
            } else {
                TurnRevokeParams {
                    username: Some(target.clone()),
                    relay: None,
                }
            };
            let result: TurnRevokeResult = client.call_as(
                method::TURN_REVOKE,
                serde_json::to_value(params).expect("serializes"),
            )?;
            if json {
                output::json(&result);
            } else {
                println!("{} allocation(s) revoked", result.revoked);
            }
        }
    }
    Ok(())
}
