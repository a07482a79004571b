//! A call's media: its flows in the flow table (the selected pair's, or a TURN-only app's
//! channel straight to the PBX), the userspace tasks for what the kernel passes up, the
//! LAN sockets, and the traffic the kernel counted.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};

use tokio::net::UdpSocket;
use webrtc_ice::candidate::CandidateType;

use super::{Call, CallError, CallEvent, CallState, Calls};
use crate::{
    datapath::{FlowSpec, flow::ChannelOp, table::FlowTable},
    ice::leg::{IceConn, SelectedPair},
    media::srtp::is_rtcp,
    time::monotonic_ns,
};

impl Calls {
    /// A TURN-only app's channel can be bound after ICE selected its relayed address (the
    /// app's TURN client binds it once data flows), and can go with its allocation: the
    /// flows follow, checked every second.
    pub(super) fn follow_local_channel(&self, call: &Call, pair: SelectedPair) {
        let Some(turn) = &self.turn else { return };
        if pair.remote_type != CandidateType::Relay {
            return;
        }
        let lent = call.inner().local_channel;
        let changed = match lent {
            None => turn.find_channel(pair.remote, pair.local).is_some(),
            Some(channel) => !turn.is_bound(&channel),
        };
        if changed {
            tracing::info!(call = call.id, app = %pair.remote, "calls: the app's TURN channel changed; flows replaced");
            self.install(call, pair);
        }
    }

    /// `call.stats`: the call's traffic each way from the kernel counters, and how long
    /// since the last packet.
    pub(super) fn stats_event(&self, call: &Call) -> CallEvent {
        let now = monotonic_ns();
        let traffic = self.traffic(call, now);
        CallEvent::Stats {
            call: call.id,
            duration_secs: call.created.elapsed().as_secs(),
            to_pbx: traffic.to_pbx,
            to_app: traffic.to_app,
            idle_ms: self.media_idle(call).as_millis() as u64,
        }
    }

    /// How long since media last went through the call's flows (the kernel counters' last
    /// seen, the later of the two); zero before they exist.
    pub(super) fn media_idle(&self, call: &Call) -> Duration {
        self.idle(call, false)
    }

    /// The same, from the flow table's last sample of the kernel counters (up to a second
    /// older, or a few seconds beyond 10,000 flows: `FlowTable::tick`), without reading the
    /// kernel's counters per call.
    pub(super) fn media_idle_sampled(&self, call: &Call) -> Duration {
        self.idle(call, true)
    }

    fn idle(&self, call: &Call, sampled: bool) -> Duration {
        let now = monotonic_ns();
        let last = {
            let inner = call.inner();
            match &inner.bridge {
                Some(bridge) => Some(bridge.counters.read().last_seen_ns).filter(|ns| *ns > 0),
                None if sampled => inner.flows.sampled_last_seen_ns(&self.table),
                None => inner.flows.last_seen_ns(&self.table, now),
            }
        };
        match last {
            Some(last) => Duration::from_nanos(now.saturating_sub(last)),
            None => Duration::ZERO,
        }
    }

    /// A call's traffic each way: the kernel counters of its flows, or what the relay
    /// carried itself for a bridged call.
    pub(super) fn traffic(&self, call: &Call, now: u64) -> super::Directions {
        let inner = call.inner();
        match &inner.bridge {
            Some(bridge) => {
                let totals = bridge.counters.read();
                super::Directions {
                    to_pbx: super::Traffic {
                        packets: totals.to_pbx_packets,
                        bytes: totals.to_pbx_bytes,
                    },
                    to_app: super::Traffic {
                        packets: totals.to_app_packets,
                        bytes: totals.to_app_bytes,
                    },
                }
            }
            None => inner.flows.traffic(&self.table, now),
        }
    }

    /// Stops media toward the app (consent lost), keeping the direction toward the PBX.
    pub(super) fn stop_toward_app(&self, call: &Call) {
        let inner = call.inner();
        match &inner.bridge {
            Some(bridge) => bridge.set_toward_app(false),
            None => {
                let mut inner = inner;
                inner.flows.remove_to_app(&self.table, monotonic_ns());
            }
        }
    }

    /// The two flows of the selected pair, replacing the call's previous ones.
    ///
    /// A TURN-only app's pair has its relayed address on this relay's TURN server as the
    /// remote: its media reaches the ICE port from the relay socket, a hairpin through the
    /// stack the kernel path never sees. The flows then start at the app's TURN channel
    /// instead: ChannelData from the app is stripped and sent on to the PBX, and the PBX's
    /// RTP gets the header and goes to the app from the TURN port, one flow pair in XDP.
    ///
    /// A bridged call's media is the relay's to transcrypt: on the AF_XDP workers where it
    /// can be steered to them, else on the call's sockets (the ICE connection sends on the
    /// selected pair); media toward the app resumes.
    pub(super) fn install(&self, call: &Call, pair: SelectedPair) {
        self.changed(call);
        let mut inner = call.inner();
        inner.state = CallState::Connected(pair);
        if let Some(bridge) = &inner.bridge {
            bridge.set_toward_app(true);
            self.steer(call, &mut inner, pair);
            return;
        }
        let previous = inner.local_channel.take();
        let local = match (&self.turn, pair.remote_type) {
            (Some(turn), CandidateType::Relay) => turn.lend_channel(pair.remote, pair.local),
            _ => None,
        };
        if let (Some(turn), Some(previous)) = (&self.turn, previous)
            && Some(previous) != local
        {
            // The channel's key goes back to the TURN server's own flows: the call's flow
            // on it must be gone first.
            inner.flows.remove_all(&self.table, monotonic_ns());
            turn.return_channel(&previous);
        }
        inner.local_channel = local;
        let (pbx, rtcp_apart) = (inner.pbx(), inner.pbx_rtcp.is_some());
        let to_pbx = match local {
            Some(channel) => FlowSpec {
                src: channel.client,
                dst: channel.server,
                new_src: call.lan,
                new_dst: pbx,
                channel: Some(ChannelOp::Strip(channel.number)),
                rtcp_to_userspace: rtcp_apart,
                opaque_payload: false,
                to_worker: false,
            },
            None => FlowSpec {
                src: pair.remote,
                dst: pair.local,
                new_src: call.lan,
                new_dst: pbx,
                channel: None,
                rtcp_to_userspace: rtcp_apart,
                opaque_payload: false,
                to_worker: false,
            },
        };
        // The ICE and LAN sockets are the call's own: the kernel-only kind of flow.
        match inner
            .flows
            .install(&self.table, to_pbx, to_pbx.reverse(), monotonic_ns())
        {
            Ok(ids) => {
                tracing::info!(call = call.id, app = %pair.remote, %pbx, ?ids, "calls: media flows installed");
            }
            Err(err) => {
                tracing::warn!(call = call.id, %err, "calls: media stays in userspace");
            }
        }
    }

    /// Media between the ICE connection and the LAN sockets, for what the kernel does not
    /// forward (the first packets, the userspace datapath, RTCP for a PBX without
    /// rtcp-mux: the app multiplexes it, the PBX wants it from and on the ports above RTP).
    pub(super) fn start_userspace_media(&self, call: &Arc<Call>, conn: IceConn) {
        let to_pbx = {
            let (conn, call) = (conn.clone(), call.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok(n) = conn.recv(&mut buf).await {
                    let packet = &buf[..n];
                    let _ = match call.pbx_rtcp() {
                        Some(rtcp) if is_rtcp(packet) => {
                            call.rtcp_socket.send_to(packet, rtcp).await
                        }
                        _ => call.lan_socket.send_to(packet, call.pbx()).await,
                    };
                }
            })
        };
        let rtcp_to_app = {
            let (conn, call) = (conn.clone(), call.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = call.rtcp_socket.recv_from(&mut buf).await {
                    // Strict source: only the PBX's RTCP address.
                    if Some(from) == call.pbx_rtcp() {
                        let _ = conn.send(&buf[..n]).await;
                    }
                }
            })
        };
        let to_app = {
            let call = call.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = call.lan_socket.recv_from(&mut buf).await {
                    // Strict source: only the PBX's RTP address.
                    if from == call.pbx() {
                        let _ = conn.send(&buf[..n]).await;
                    }
                }
            })
        };
        call.inner().tasks.extend([to_pbx, to_app, rtcp_to_app]);
    }

    /// A free LAN port: the first even one in the range that binds (RTP takes even ports,
    /// RTCP the odd one above).
    pub(super) async fn bind_lan_port(&self) -> Result<(LanSockets, SocketAddr), CallError> {
        for port in self.ports.clone().filter(|port| port.is_multiple_of(2)) {
            let address = SocketAddr::new(self.lan_ip, port);
            let rtcp = rtcp_above(address);
            if let (Ok(rtp), Ok(rtcp)) =
                (UdpSocket::bind(address).await, UdpSocket::bind(rtcp).await)
            {
                return Ok((
                    LanSockets {
                        rtp: Arc::new(rtp),
                        rtcp: Arc::new(rtcp),
                    },
                    address,
                ));
            }
        }
        Err(CallError::Busy(
            "no free LAN port left in calls.port_range".into(),
        ))
    }
}

/// Flows of calls a relayd left in the pinned table without ending them or keeping them in
/// the state store (killed, not stopped; or no store): the table adopted them and bound
/// their relay addresses, which are the ICE port and the calls' LAN ports this relayd needs.
/// Nobody could end those calls now; removed. `kept`: the flows of the stored calls.
pub(super) fn remove_flows_of_earlier_calls(
    table: &FlowTable,
    ice: SocketAddr,
    lan_ip: IpAddr,
    ports: &RangeInclusive<u16>,
    kept: &std::collections::HashSet<u32>,
) -> bool {
    let ours = |address: SocketAddr| {
        address == ice || (address.ip() == lan_ip && ports.contains(&address.port()))
    };
    let now = monotonic_ns();
    let stale: Vec<u32> = table
        .list(now)
        .into_iter()
        .filter(|flow| !kept.contains(&flow.id))
        .filter(|flow| ours(flow.spec.dst) || ours(flow.spec.new_src))
        .map(|flow| flow.id)
        .collect();
    if !stale.is_empty() {
        tracing::warn!(
            flows = stale.len(),
            "calls: removing the flows of calls an earlier relayd did not end (it was not stopped cleanly)"
        );
    }
    let removed = !stale.is_empty();
    for id in stale {
        let _ = table.remove(id, now);
    }
    removed
}

/// The address of the RTCP port above a LAN RTP port (RFC 3550: RTP even, RTCP the next).
pub(super) fn rtcp_above(rtp: SocketAddr) -> SocketAddr {
    SocketAddr::new(rtp.ip(), rtp.port().saturating_add(1))
}

/// A call's LAN side: its RTP port (even) and the RTCP port above it, for PBXs that keep
/// RTCP on its own port.
pub(super) struct LanSockets {
    pub(super) rtp: Arc<UdpSocket>,
    pub(super) rtcp: Arc<UdpSocket>,
}
