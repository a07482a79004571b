//! relayd's lifecycle: open the datapath, adopt pinned flows, serve the control API, expire
//! idle flows, reload on SIGHUP, and shut down when told to (pingora / mini-redis style
//! `run(config, shutdown)`).

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{runtime::Handle, sync::watch};

use crate::{
    config::Config,
    control::server::ControlServer,
    datapath::{self, table::FlowTable},
    reload::{Reload, Reloader, reload_on_hangup},
    time::monotonic_ns,
};

/// How often rates are sampled and idle flows looked for.
const TICK: Duration = Duration::from_secs(1);

pub async fn run(
    config: Config,
    reload: Reload,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
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

    let open_files = match crate::admission::raise_open_files_limit() {
        Ok((before, after)) => {
            if after > before {
                tracing::info!(
                    before,
                    after,
                    "open files: soft limit raised to the hard limit"
                );
            }
            after
        }
        Err(err) => {
            tracing::warn!(%err, "open files: cannot read or raise the limit; assuming 1024");
            1024
        }
    };
    let admission = crate::admission::Admission::new(&config.connections, open_files);
    let (stop, stopped) = watch::channel(false);
    let store = open_state_store(&config);
    let turn = if config.turn.enabled {
        Some(
            crate::turn::driver::TurnService::start(
                &config.turn,
                table.clone(),
                store.clone(),
                admission.clone(),
                stopped.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let mut calls = None;
    let cluster;
    let signalling = if config.signalling.enabled {
        let push = if config.push.enabled {
            Some(Arc::new(crate::push::Push::new(
                &config.push,
                store.clone(),
            )?))
        } else {
            None
        };
        let hub = Arc::new(crate::signalling::hub::Hub::with_push(
            config.signalling.queue_length,
            push,
        ));
        let state_dir = config
            .state
            .path
            .parent()
            .filter(|_| !config.state.path.as_os_str().is_empty());
        if config.calls.enabled {
            let kept = Arc::new(
                crate::calls::Calls::new(
                    &config.calls,
                    table.clone(),
                    hub.clone(),
                    turn.clone(),
                    store.clone(),
                )
                .await?,
            );
            if config.cluster.enabled {
                // Ids unique across the cluster, naming the node that anchors the call.
                kept.number_from(crate::cluster::call_id_base(&config.cluster.node_name()));
            }
            kept.restore().await;
            tokio::spawn(
                kept.clone()
                    .keep_recorded(config.cluster.enabled, stopped.clone()),
            );
            calls = Some(kept);
        }
        cluster = start_cluster(&config, &table, &turn, &calls, Some(&hub), &stopped)?;
        if let Some((cluster, _)) = &cluster {
            hub.join_cluster(cluster.clone());
        }
        let (listening, task) = crate::signalling::server::start(
            &config.signalling,
            state_dir,
            crate::signalling::server::Backends {
                hub: hub.clone(),
                calls: calls.clone(),
                cluster: cluster.as_ref().map(|(cluster, _)| cluster.clone()),
                turn: turn.clone().filter(|_| config.turn.tcp),
            },
            admission.clone(),
            stopped.clone(),
        )
        .await?;
        Some((Arc::new(listening), task))
    } else {
        cluster = start_cluster(&config, &table, &turn, &calls, None, &stopped)?;
        None
    };
    let ng = match config.ng.address() {
        Some(address) => {
            let calls = Arc::new(crate::ng::calls::NgCalls::new(&config.ng, table.clone()));
            let stats = Arc::new(crate::ng::server::NgStats::default());
            let server =
                crate::ng::server::NgServer::bind(address, calls.clone(), stats.clone()).await?;
            let interfaces: Vec<String> = config
                .ng
                .interface_addresses()
                .iter()
                .map(|(name, ip)| format!("{name}={ip}"))
                .collect();
            tracing::info!(%address, interfaces = %interfaces.join(", "), ports = %config.ng.port_range, "ng: listening for rtpengine's ng protocol (UDP)");
            let task = tokio::spawn(server.serve(stopped.clone()));
            Some((calls, stats, task))
        }
        None => None,
    };
    let metrics = match config.metrics.address() {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("metrics.listen: {address}: cannot listen"))?;
            tracing::info!(%address, "metrics: serving Prometheus metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(
                crate::admission::Listener::new(listener, "metrics", admission.clone()),
                crate::metrics::Sources {
                    table: table.clone(),
                    admission: admission.clone(),
                    turn: turn.clone(),
                    signalling: signalling
                        .as_ref()
                        .map(|(listening, _)| listening.hub.clone()),
                    calls: calls.clone(),
                    ng: ng
                        .as_ref()
                        .map(|(calls, stats, _)| (calls.clone(), stats.clone())),
                    cluster: cluster.as_ref().map(|(cluster, _)| cluster.clone()),
                },
                stopped.clone(),
            )))
        }
        None => None,
    };
    // Last: once relayctl can connect, everything else is up.
    let server = ControlServer::bind(&config.control.socket, &config.control.group)?;
    tracing::info!(socket = %config.control.socket.display(), "control API listening");
    let reloader = Arc::new(Reloader::new(config, reload, turn.clone()));
    let serving = tokio::spawn(server.serve(
        crate::control::server::Services {
            table: table.clone(),
            turn: turn.clone(),
            signalling: signalling.as_ref().map(|(listening, _)| listening.clone()),
            calls: calls.clone(),
            ng: ng.as_ref().map(|(calls, _, _)| calls.clone()),
            reloader: reloader.clone(),
            admission,
            cluster: cluster.as_ref().map(|(cluster, _)| cluster.clone()),
            started: std::time::Instant::now(),
        },
        stopped.clone(),
    ));
    let expiring = tokio::spawn(expire_idle_flows(table.clone(), stopped.clone()));
    let reloading = tokio::spawn(reload_on_hangup(reloader, stopped));
    shutdown.await;
    tracing::info!("shutting down");
    // Before the signalling stops, so that both sides of every call hear of its end.
    if let Some(calls) = &calls {
        calls.stop().await;
    }
    let _ = stop.send(true);
    if let Some(turn) = &turn {
        turn.stop();
    }
    let _ = serving.await;
    let _ = expiring.await;
    let _ = reloading.await;
    if let Some((_, task)) = signalling {
        let _ = task.await;
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    if let Some((_, task)) = cluster {
        // It leaves the cluster as it stops.
        let _ = task.await;
    }
    if let Some((_, _, task)) = ng {
        // It deletes its calls as it stops: their flows leave the kernel.
        let _ = task.await;
    }
    if status.kind == datapath::DatapathKind::Xdp {
        tracing::info!(
            flows = table.len(),
            "XDP stays attached through its pinned links: installed flows keep forwarding until relayd starts again (and adopts them) or `relayd --detach-xdp` removes them"
        );
    }
    Ok(())
}

/// The state store, when configured and it opens; otherwise relayd runs without one and
/// says what that means.
fn open_state_store(config: &Config) -> Option<Arc<crate::state::StateStore>> {
    if config.state.path.as_os_str().is_empty() {
        return None;
    }
    match crate::state::StateStore::open(&config.state.path) {
        Ok(store) => {
            tracing::info!(path = %config.state.path.display(), "state: TURN allocations and calls are kept across restarts");
            Some(Arc::new(store))
        }
        Err(err) => {
            tracing::warn!(%err, "state: no state store: TURN allocations and calls will not survive a restart");
            None
        }
    }
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

type ClusterTask = (Arc<crate::cluster::Cluster>, tokio::task::JoinHandle<()>);

/// This node's part in its cluster, when `[cluster]` is on: what it publishes (load,
/// sessions, calls) and how messages from other nodes reach its sessions.
fn start_cluster(
    config: &Config,
    table: &Arc<FlowTable>,
    turn: &Option<Arc<crate::turn::driver::TurnService>>,
    calls: &Option<Arc<crate::calls::Calls>>,
    hub: Option<&Arc<crate::signalling::hub::Hub>>,
    stopped: &watch::Receiver<bool>,
) -> anyhow::Result<Option<ClusterTask>> {
    if !config.cluster.enabled {
        return Ok(None);
    }
    let hub = hub.cloned();
    let load = {
        let (table, turn, calls, hub) = (table.clone(), turn.clone(), calls.clone(), hub.clone());
        Box::new(move || crate::cluster::Load {
            calls: calls.as_ref().map_or(0, |calls| calls.len()),
            allocations: turn
                .as_ref()
                .map_or(0, |turn| turn.summary().allocations as usize),
            sessions: hub.as_ref().map_or(0, |hub| {
                let (controllers, clients) = hub.counts();
                controllers + clients
            }),
            flows: table.len(),
            ..crate::cluster::Load::default()
        }) as Box<dyn Fn() -> crate::cluster::Load + Send + Sync>
    };
    let deliver = hub.clone().map(|hub| {
        Box::new(
            move |tenant: &str, to: &crate::cluster::Recipient, message: serde_json::Value| {
                let Ok(message) =
                    serde_json::from_value::<crate::signalling::protocol::Outbound>(message)
                else {
                    return (0, 0);
                };
                let user = match to {
                    crate::cluster::Recipient::Controller => None,
                    crate::cluster::Recipient::User(user) => Some(user.as_str()),
                };
                hub.deliver(tenant, user, &message)
            },
        ) as crate::cluster::Deliver
    });
    let present = hub.clone().map(|hub| {
        Box::new(move |tenant: &str, to: &crate::cluster::Recipient| hub.present(tenant, to))
            as crate::cluster::Present
    });
    let sessions = hub.map(|hub| {
        Box::new(move || {
            hub.identities()
                .into_iter()
                .map(|identity| crate::cluster::SessionRecord {
                    tenant: identity.tenant,
                    role: match identity.role {
                        crate::signalling::protocol::Role::Controller => "controller",
                        crate::signalling::protocol::Role::Client => "client",
                    }
                    .to_owned(),
                    user: identity.user,
                })
                .collect()
        }) as Box<dyn Fn() -> Vec<crate::cluster::SessionRecord> + Send + Sync>
    });
    let calls_source = calls.clone().map(|calls| {
        let counted = calls.clone();
        crate::cluster::CallsSource {
            generation: Box::new(move || counted.generation()),
            records: Box::new(move |since| {
                let changed = calls.records_since(since);
                let records = changed
                    .records
                    .iter()
                    .map(|record| {
                        let json = serde_json::to_string(record).expect("call records serialize");
                        (record.call, json)
                    })
                    .collect();
                crate::cluster::CallRecords {
                    records,
                    unrecorded: changed.unrecorded,
                    calls: changed.calls,
                    complete: changed.complete,
                }
            }),
        }
    });
    // A standby takes over what the node it stands by for had: calls and allocations.
    let take_over = (!config.cluster.standby_for.is_empty()).then(|| {
        let (calls, turn) = (calls.clone(), turn.clone());
        Box::new(move |from: String, records: Vec<String>, allocations: Option<String>| {
            let (calls, turn) = (calls.clone(), turn.clone());
            Box::pin(async move {
                let records = records
                    .iter()
                    .filter_map(|json| match serde_json::from_str(json) {
                        Ok(record) => Some(record),
                        Err(err) => {
                            tracing::warn!(%err, from, "cluster: a call record in Redis that this relayd cannot read; that call is lost");
                            None
                        }
                    })
                    .collect();
                let calls = match &calls {
                    Some(calls) => calls.take_over(&from, records).await,
                    None => 0,
                };
                let allocations = match (&turn, allocations) {
                    (Some(turn), Some(json)) => match serde_json::from_str(&json) {
                        Ok(records) => turn.take_over(&from, records),
                        Err(err) => {
                            tracing::warn!(%err, from, "cluster: TURN allocations in Redis that this relayd cannot read; they are lost");
                            0
                        }
                    },
                    _ => 0,
                };
                (calls, allocations)
            }) as futures_util::future::BoxFuture<'static, (usize, usize)>
        }) as crate::cluster::TakeOver
    });
    let allocations = turn.clone().map(|turn| {
        Box::new(move || {
            serde_json::to_string(&turn.records()).expect("allocation records serialize")
        }) as Box<dyn Fn() -> String + Send + Sync>
    });
    let sources = crate::cluster::Sources {
        load,
        sessions,
        calls: calls_source,
        deliver,
        present,
        take_over,
        allocations,
    };
    Ok(Some(crate::cluster::Cluster::start(
        &config.cluster,
        sources,
        stopped.clone(),
    )?))
}
