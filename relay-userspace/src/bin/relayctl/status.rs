//! `relayctl status`: health at a glance.

use relay::control::{
    client::{ClientError, ControlClient},
    protocol::{StatusResult, method},
};
use serde_json::Value;

use crate::output;

pub fn run(client: &mut ControlClient, json: bool) -> Result<(), ClientError> {
    let status: StatusResult = client.call_as(method::STATUS, Value::Null)?;
    if json {
        output::json(&status);
        return Ok(());
    }
    let datapath = &status.datapath;
    println!(
        "relayd      {} (control API v{})",
        status.relay_version, status.protocol_version
    );
    println!(
        "uptime      {}",
        output::duration(status.uptime_secs as f64)
    );
    println!(
        "datapath    {}",
        serde_json::to_value(datapath.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    if let Some(reason) = &datapath.fallback_reason {
        println!("            XDP not in use: {reason}");
    }
    if let Some(dir) = &datapath.pin_dir {
        println!("pinned in   {dir}");
    }
    let transcrypt = &datapath.transcrypt;
    if transcrypt.path == "af_xdp" {
        let sockets: Vec<String> = transcrypt
            .sockets
            .iter()
            .map(|s| format!("{} queue {} ({})", s.interface, s.queue, s.mode))
            .collect();
        let counters = &transcrypt.counters;
        println!(
            "transcrypt  AF_XDP workers: {} thread(s) on {}",
            transcrypt.threads,
            sockets.join(", ")
        );
        println!(
            "            {} packets in, {} out; dropped: {} refused (SRTP), {} unknown flow, {} malformed, {} not sent, {} by the kernel",
            counters.received,
            counters.sent,
            counters.refused,
            counters.unknown_flow,
            counters.malformed,
            counters.not_sent,
            counters.kernel_dropped
        );
    } else if !transcrypt.path.is_empty() {
        match &transcrypt.reason {
            Some(reason) => {
                println!("transcrypt  relay's sockets (AF_XDP workers could not start: {reason})")
            }
            None => println!("transcrypt  relay's sockets"),
        }
    }
    let percent = status.flows as f64 * 100.0 / f64::from(datapath.capacity.max(1));
    println!(
        "flows       {} of {} ({percent:.1}%), idle timeout {}",
        status.flows,
        datapath.capacity,
        output::duration(status.idle_timeout_secs as f64)
    );
    if let Some(turn) = &status.turn {
        let listening: Vec<String> = turn.listening.iter().map(ToString::to_string).collect();
        println!(
            "turn        listening on {} ({}); {} allocations, {} channels ({})",
            listening.join(", "),
            if turn.tcp { "UDP and TCP" } else { "UDP" },
            turn.allocations,
            turn.channels,
            if turn.offload {
                "channels offloaded to XDP"
            } else {
                "relayed in userspace"
            }
        );
        match &turn.state_store {
            Some(path) => println!("            allocations kept across restarts in {path}"),
            None => println!("            allocations end with relayd (no state store)"),
        }
    }
    if let Some(signalling) = &status.signalling {
        println!(
            "signalling  listening on {} (WebSocket over TLS{}); tenants {}, connected: {} controllers, {} apps",
            signalling.listening,
            if signalling.turn_over_tls {
                ", and TURN over TLS"
            } else {
                ""
            },
            signalling.tenants,
            signalling.controllers,
            signalling.clients
        );
        println!(
            "            certificate sha256 {}",
            signalling.certificate_sha256
        );
    }
    if let Some(calls) = status.calls {
        println!("calls       {calls} in progress (relayctl calls list)");
        if let Some(ice) = status.calls_ice {
            println!("            ICE for the apps on {ice}");
        }
        if let Some(media) = &status.calls_media {
            println!(
                "            media toward apps {}, toward the PBX {}",
                media.app_media, media.pbx_media
            );
            println!("            DTLS certificate {}", media.dtls_fingerprint);
        }
    }
    if let Some(cluster) = &status.cluster {
        println!("{}", crate::cluster::summary_line(cluster));
    }
    let connections = &status.connections;
    println!(
        "connections {} TCP open, at most {} ({} per source)",
        connections.open, connections.max_total, connections.max_per_source
    );
    let refused = connections.refused_per_source + connections.refused_total;
    if refused > 0 || connections.accept_failures > 0 {
        println!(
            "            refused {refused} ({} at the per-source limit, {} at the total); {} accepts failed",
            connections.refused_per_source, connections.refused_total, connections.accept_failures
        );
    }
    if !datapath.interfaces.is_empty() {
        println!();
        let mut table =
            output::Table::new(&["INTERFACE", "IFINDEX", "XDP MODE"]).right_aligned(&["IFINDEX"]);
        for interface in &datapath.interfaces {
            table.row(vec![
                interface.name.clone(),
                interface.ifindex.to_string(),
                interface.xdp_mode.clone(),
            ]);
        }
        table.print();
    }
    Ok(())
}
