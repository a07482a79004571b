//! `relayctl push stats`.

use clap::Subcommand;
use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{PushStatsResult, method},
};
use serde_json::Value;

use crate::output;

#[derive(Subcommand, Debug)]
pub enum PushCommand {
    /// Devices registered, and pushes by provider and outcome since relayd started
    Stats,
}

pub fn run(
    client: &mut ControlClient,
    command: &PushCommand,
    json: bool,
) -> Result<(), ClientError> {
    match command {
        PushCommand::Stats => {
            let result: PushStatsResult = client.call_as(method::PUSH_STATS, Value::Null)?;
            if json {
                output::json(&result);
                return Ok(());
            }
            println!("devices registered: {}", output::count(result.devices));
            let mut table =
                output::Table::new(&["PROVIDER", "OUTCOME", "PUSHES"]).right_aligned(&["PUSHES"]);
            for push in &result.pushes {
                table.row(vec![
                    push.provider.clone(),
                    push.outcome.clone(),
                    output::count(push.count),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}
