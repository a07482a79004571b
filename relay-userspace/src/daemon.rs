//! relayd's lifecycle: open the datapath, adopt pinned flows, serve the control API, expire
//! idle flows, and shut down when told to (pingora / mini-redis style `run(config, shutdown)`).

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{runtime::Handle, sync::watch};

use crate::{
    config::Config,
    control::server::ControlServer,
    datapath::{self, table::FlowTable},
    time::monotonic_ns,
};

/// How often rates are sampled and idle flows looked for.
const TICK: Duration = Duration::from_secs(1);

pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let datapath = datapath::open(&config.datapath, Handle::current())?;
    let table = Arc::new(FlowTable::new(
        datapath,
        config.flows.idle_timeout_secs,
        monotonic_ns(),
    ));
    let status = table.status();
    let interfaces: Vec<String> = status
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.name, i.xdp_mode))
        .collect();
    tracing::info!(
        datapath = ?status.kind,
        interfaces = %interfaces.join(", "),
        capacity = status.capacity,
        flows = table.len(),
        "datapath ready"
    );
    let server = ControlServer::bind(&config.control.socket)?;
    tracing::info!(socket = %config.control.socket.display(), "control API listening");

    let (stop, stopped) = watch::channel(false);
    let turn = if config.turn.enabled {
        Some(
            crate::turn::driver::TurnService::start(&config.turn, table.clone(), stopped.clone())
                .await?,
        )
    } else {
        None
    };
    let metrics = match config.metrics.address() {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("metrics.listen: {address}: cannot listen"))?;
            tracing::info!(%address, "metrics: serving Prometheus metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                table.clone(),
                turn.clone(),
                stopped.clone(),
            )))
        }
        None => None,
    };
    let serving = tokio::spawn(server.serve(table.clone(), turn.clone(), stopped.clone()));
    let expiring = tokio::spawn(expire_idle_flows(table.clone(), stopped));
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    let _ = serving.await;
    let _ = expiring.await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    if status.kind == datapath::DatapathKind::Xdp {
        tracing::info!(
            flows = table.len(),
            "XDP stays attached through its pinned links: installed flows keep forwarding until relayd starts again (and adopts them) or `relayd --detach-xdp` removes them"
        );
    }
    Ok(())
}

async fn expire_idle_flows(table: Arc<FlowTable>, mut stopped: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stopped.changed() => return,
        }
        for flow in table.tick(monotonic_ns()) {
            tracing::info!(
                id = flow.id,
                src = %flow.spec.src,
                dst = %flow.spec.dst,
                new_dst = %flow.spec.new_dst,
                packets = flow.counters.packets(),
                idle_secs = flow.idle_secs as u64,
                timeout_secs = table.idle_timeout_secs(),
                "flow idle longer than flows.idle_timeout_secs: removed"
            );
        }
    }
}
