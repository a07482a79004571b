//! relayd: the relay daemon. See `relayd --help`.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use relay::config::{Config, DatapathMode, XdpModeChoice};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(name = "relayd", version, about = "XDP-accelerated media relay daemon")]
struct Args {
    /// Configuration file [default: /etc/relay/relay.toml, or the embedded default when absent]
    #[arg(long, env = "RELAY_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration (with overrides applied), print the result and exit
    #[arg(long)]
    check: bool,
    /// Remove the XDP program and the flow table from the kernel (everything pinned in
    /// datapath.pin_dir) and exit; run it while relayd is stopped
    #[arg(long, conflicts_with = "check")]
    detach_xdp: bool,
    /// Override datapath.mode
    #[arg(long, env = "RELAY_DATAPATH", value_name = "MODE")]
    datapath: Option<DatapathMode>,
    /// Override datapath.interfaces (repeat, or comma-separate in the environment)
    #[arg(
        long = "interface",
        env = "RELAY_INTERFACES",
        value_delimiter = ',',
        value_name = "IFACE"
    )]
    interfaces: Vec<String>,
    /// Override datapath.xdp_mode
    #[arg(long, env = "RELAY_XDP_MODE", value_name = "MODE")]
    xdp_mode: Option<XdpModeChoice>,
    /// Override datapath.pin_dir
    #[arg(long, env = "RELAY_PIN_DIR", value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Override control.socket
    #[arg(long, env = "RELAY_CONTROL_SOCKET", value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Override metrics.listen (ADDRESS:PORT, empty: off)
    #[arg(long, env = "RELAY_METRICS_LISTEN", value_name = "ADDRESS:PORT")]
    metrics_listen: Option<String>,
    /// Override flows.idle_timeout_secs
    #[arg(long, env = "RELAY_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    idle_timeout_secs: Option<u64>,
    /// Override log.level
    #[arg(long, env = "RELAY_LOG", value_name = "FILTER")]
    log_level: Option<String>,
    /// Print the man page or a shell completion script and exit (for packaging)
    #[arg(long, hide = true, value_name = "WHAT")]
    generate: Option<relay::cli_docs::Generated>,
}

impl Args {
    fn apply(&self, config: &mut Config) {
        if let Some(mode) = self.datapath {
            config.datapath.mode = mode;
        }
        if !self.interfaces.is_empty() {
            config.datapath.interfaces = self.interfaces.clone();
        }
        if let Some(mode) = self.xdp_mode {
            config.datapath.xdp_mode = mode;
        }
        if let Some(dir) = &self.pin_dir {
            config.datapath.pin_dir = dir.clone();
        }
        if let Some(socket) = &self.control_socket {
            config.control.socket = socket.clone();
        }
        if let Some(listen) = &self.metrics_listen {
            config.metrics.listen = listen.clone();
        }
        if let Some(secs) = self.idle_timeout_secs {
            config.flows.idle_timeout_secs = secs;
        }
        if let Some(level) = &self.log_level {
            config.log.level = level.clone();
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(what) = args.generate {
        return match relay::cli_docs::generate(<Args as clap::CommandFactory>::command(), what, "8")
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("relayd: --generate: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let (mut config, origin) = match Config::load(args.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("relayd: {err}");
            return ExitCode::from(2);
        }
    };
    args.apply(&mut config);
    let origin = format!("{origin} (with command-line/environment overrides)");
    if let Err(err) = config.validate(&origin) {
        eprintln!("relayd: {err}");
        return ExitCode::from(2);
    }
    if args.check {
        println!("relayd: {origin}: configuration is valid");
        return ExitCode::SUCCESS;
    }
    if args.detach_xdp {
        return match relay::datapath::xdp::detach_all(&config.datapath.pin_dir) {
            Ok(removed) if removed.is_empty() => {
                println!(
                    "relayd: nothing pinned in {}",
                    config.datapath.pin_dir.display()
                );
                ExitCode::SUCCESS
            }
            Ok(removed) => {
                for path in removed {
                    println!("relayd: unpinned {path}");
                }
                println!("relayd: XDP detached, flow table freed");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("relayd: --detach-xdp: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log.level))
        .init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %origin, "relayd starting");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("relayd: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(relay::daemon::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("relayd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; relayd will stop only when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
