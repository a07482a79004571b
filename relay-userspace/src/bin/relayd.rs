//! relayd: the relay daemon. See `relayd --help`.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use relay::{
    config::Config,
    datapath::config::{DatapathMode, XdpModeChoice},
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "relayd",
    version,
    about = "XDP-accelerated media relay daemon",
    after_help = "SIGHUP reloads the configuration: TURN users, secrets, peer policy, lifetimes and limits, and log.level change live; the log says what else needs a restart."
)]
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
    /// Override state.path (empty: no state store)
    #[arg(long, env = "RELAY_STATE_PATH", value_name = "PATH")]
    state_path: Option<String>,
    /// Override log.format
    #[arg(long, env = "RELAY_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<relay::config::LogFormat>,
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
        if let Some(path) = &self.state_path {
            config.state.path = PathBuf::from(path);
        }
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
    }

    /// The configuration as a start would load it: the file, then the overrides, validated.
    fn load(&self) -> Result<(Config, String), String> {
        let (mut config, origin) =
            Config::load(self.config.as_deref()).map_err(|e| e.to_string())?;
        self.apply(&mut config);
        let origin = format!("{origin} (with command-line/environment overrides)");
        config.validate(&origin).map_err(|e| e.to_string())?;
        Ok((config, origin))
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
    let (config, origin) = match args.load() {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("relayd: {err}");
            return ExitCode::from(2);
        }
    };
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
    let set_log_level = init_logging(&config.log);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %origin, "relayd starting");
    let threads = config.runtime.threads();
    tracing::info!(
        worker_threads = threads,
        "async runtime: {threads} worker thread(s) (runtime.worker_threads)"
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("relayd: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let reload = relay::reload::Reload {
        load: Box::new(move || args.load().map(|(config, _)| config)),
        set_log_level,
    };
    match runtime.block_on(relay::daemon::run(config, reload, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("relayd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (the journal under systemd) as text or JSON lines, with a filter a reload
/// can change; returns the function that changes it.
fn init_logging(log: &relay::config::LogConfig) -> relay::reload::SetLogLevel {
    use tracing_subscriber::{fmt, layer::SubscriberExt, reload, util::SubscriberInitExt};
    // Validated before this is called.
    let filter = relay::config::log_filter(&log.level).unwrap_or_default();
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        relay::config::LogFormat::Text => registry.with(fmt::layer()).init(),
        relay::config::LogFormat::Json => registry.with(fmt::layer().json()).init(),
    }
    Box::new(move |level: &str| {
        let filter = relay::config::log_filter(level)?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
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
