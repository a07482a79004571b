//! `relayctl reload`: relayd reads its configuration again (as on SIGHUP) and says what it
//! applied and what waits for a restart. The unit's ExecReload.

use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{ConfigReloadResult, method},
};
use serde_json::Value;

use crate::output;

pub fn run(client: &mut ControlClient, json: bool) -> Result<(), ClientError> {
    let result: ConfigReloadResult = client.call_as(method::CONFIG_RELOAD, Value::Null)?;
    if json {
        output::json(&result);
        return Ok(());
    }
    if result.applied.is_empty() && result.needs_restart.is_empty() {
        println!("configuration unchanged");
        return Ok(());
    }
    if !result.applied.is_empty() {
        println!("applied: {}", result.applied.join(", "));
    }
    if !result.needs_restart.is_empty() {
        println!(
            "needs a restart (systemctl restart relayd; media keeps flowing): {}",
            result.needs_restart.join(", ")
        );
    }
    Ok(())
}
