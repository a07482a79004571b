//! `cargo xtask run`: builds relayd and relayctl, and starts relayd to try on this machine.
//! Without a `--config` of the caller's, relayd gets a trial configuration with the main job
//! on loopback: TURN on 127.0.0.1:3478 with a user, the signalling rendezvous on
//! 127.0.0.1:8443 with a tenant, calls with their ICE port on 127.0.0.1:3479. Its secrets are
//! made for this run and printed once. The packaged /etc/relay/relay.toml is not this: it
//! starts with nothing reachable until the operator configures it.

use std::path::Path;

use anyhow::Context;

use crate::util;

const TURN: &str = "127.0.0.1:3478";
const SIGNALLING: &str = "127.0.0.1:8443";
const ICE: &str = "127.0.0.1:3479";
const TENANT: &str = "trial";
const TURN_USER: &str = "trial";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    util::build_release_binaries()?;
    let root = util::workspace_root();
    let relayd = util::target_dir().join("release/relayd");
    let mut args = args.to_vec();
    if !args
        .iter()
        .any(|arg| arg == "--config" || arg.starts_with("--config="))
    {
        let dir = root.join("target/xtask-run");
        let config = write_trial_config(&dir)?;
        args.splice(0..0, ["--config".to_owned(), config.display().to_string()]);
    }
    util::step(&format!("starting {} {}", relayd.display(), args.join(" ")));
    util::exec(&relayd, &args)
}

/// Writes the trial configuration into `dir` and says how to try it.
fn write_trial_config(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let turn_password = secret()?;
    let api_key = secret()?;
    let token_secret = secret()?;
    let state = dir.join("state.redb");
    let text = format!(
        r#"# Written by `cargo xtask run` for trying the relay on this machine: everything on
# loopback, secrets made for this run. The packaged /etc/relay/relay.toml starts with nothing
# reachable; see packaging/relay.toml for every option.

[state]
path = "{state}"

[turn]
enabled = true
listen = ["{TURN}"]
users = [{{ name = "{TURN_USER}", password = "{turn_password}" }}]
# Peers on loopback are refused by default (an edge relay must not reach its own host);
# here everything is on loopback.
allowed_peers = ["127.0.0.0/8"]

[signalling]
enabled = true
listen = "{SIGNALLING}"
token_secret = "{token_secret}"
tenants = [{{ name = "{TENANT}", api_key = "{api_key}" }}]

[calls]
enabled = true
ice_listen = "{ICE}"
lan_address = "127.0.0.1"
"#,
        state = state.display()
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let relayctl = util::target_dir().join("release/relayctl");
    eprintln!(
        "
relayd runs with a trial configuration ({path}), everything on loopback:
  TURN        turn:{TURN}  user {TURN_USER}  password {turn_password}
              try: turnutils_uclient -u {TURN_USER} -w {turn_password} -y 127.0.0.1
  signalling  wss://{SIGNALLING}  tenant {TENANT}  api_key {api_key}
              (self-signed: relayd logs the certificate's sha256 fingerprint below)
  calls       ICE on {ICE}, PBX side on 127.0.0.1 ports 40000-40999
In another terminal (as root, like relayd):
  {relayctl} status
  {relayctl} turn allocations
  {relayctl} calls list
The secrets are made anew at every `cargo xtask run`; Ctrl-C stops relayd.
",
        path = path.display(),
        relayctl = relayctl.display()
    );
    Ok(path)
}

/// 128 random bits as 32 hex digits, from the kernel.
fn secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?,
        &mut bytes,
    )
    .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
