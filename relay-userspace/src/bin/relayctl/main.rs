//! relayctl: manage a running relayd through its control API. One file per subcommand.

mod calls;
mod cluster;
mod flow;
mod output;
mod push;
mod reload;
mod stats;
mod status;
mod turn;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use relay::control::client::{ClientError, ControlClient};

#[derive(Parser, Debug)]
#[command(name = "relayctl", version, about = "Manage the media relay (relayd)")]
struct Cli {
    /// relayd's control socket
    #[arg(long, global = true, env = "RELAY_CONTROL_SOCKET", default_value = relay::paths::CONTROL_SOCKET)]
    socket: PathBuf,
    /// Print JSON (one document) instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Datapath, interfaces, XDP mode, flow count and capacity
    Status,
    /// Packet counters by XDP verdict and of the userspace path
    Stats,
    /// Add, remove and inspect flows
    #[command(subcommand)]
    Flow(flow::FlowCommand),
    /// TURN allocations
    #[command(subcommand)]
    Turn(turn::TurnCommand),
    /// Calls in progress
    #[command(subcommand)]
    Calls(calls::CallsCommand),
    /// Pushes that wake sleeping apps
    #[command(subcommand)]
    Push(push::PushCommand),
    /// The relays sharing this one's Redis: health and load of each
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Make relayd read its configuration again; prints what it applied and what needs a
    /// restart
    Reload,
    /// Print the man page or a shell completion script (for packaging)
    #[command(hide = true)]
    Generate { what: relay::cli_docs::Generated },
}

/// Exit codes: 0 done, 1 relayd refused or failed, 2 bad usage (clap), 3 relayd unreachable.
fn main() -> ExitCode {
    // Like other Unix tools: a closed pipe (`relayctl flow list | head`) ends the program
    // quietly instead of a panic on the next print.
    // SAFETY: setting a signal's disposition to its default has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Command::Generate { what } = cli.command {
        return match relay::cli_docs::generate(<Cli as clap::CommandFactory>::command(), what, "1")
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("relayctl: generate: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let mut client = match ControlClient::connect(&cli.socket) {
        Ok(client) => client,
        Err(err) => {
            eprintln!("relayctl: {err}");
            return ExitCode::from(3);
        }
    };
    let result = match &cli.command {
        Command::Status => status::run(&mut client, cli.json),
        Command::Stats => stats::run(&mut client, cli.json),
        Command::Flow(command) => flow::run(&mut client, command, cli.json),
        Command::Turn(command) => turn::run(&mut client, command, cli.json),
        Command::Reload => reload::run(&mut client, cli.json),
        Command::Calls(command) => calls::run(&mut client, command, cli.json),
        Command::Push(command) => push::run(&mut client, command, cli.json),
        Command::Cluster(command) => cluster::run(&mut client, command, cli.json),
        Command::Generate { .. } => unreachable!("handled before connecting"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("relayctl: {}", describe(&err));
            ExitCode::from(1)
        }
    }
}

fn describe(err: &ClientError) -> String {
    match err {
        ClientError::Refused(body) => match &body.field {
            Some(field) if !body.message.starts_with(field.as_str()) => {
                format!("{}: {}", field, body.message)
            }
            _ => body.message.clone(),
        },
        other => other.to_string(),
    }
}
