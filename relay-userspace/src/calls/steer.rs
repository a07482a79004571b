//! A bridged call's media on the AF_XDP workers: flows that steer its packets from the app
//! and from the PBX to the workers, and what a worker does with each one (the bridge's
//! transcryption, then the addresses of the leg it goes to). The call's sockets keep the
//! rest: DTLS and STUN (the program passes them up), and every packet when no worker
//! socket serves the queue it arrived on.

use std::{net::SocketAddr, sync::Arc};

use super::{Call, CallInner, Calls, bridge::Bridge, media::rtcp_above};
use crate::{
    datapath::{
        FlowSpec,
        worker::{Egress, Transcrypt},
    },
    ice::leg::SelectedPair,
    media::srtp::is_rtcp,
    time::monotonic_ns,
};

/// Where one stream's packets go toward the PBX: from the stream's LAN ports to the PBX's
/// RTP address, and its RTCP to the PBX's RTCP address when it keeps one.
#[derive(Debug, Clone, Copy)]
struct PbxRoute {
    rtp: (SocketAddr, SocketAddr),
    rtcp: Option<(SocketAddr, SocketAddr)>,
}

enum Direction {
    /// From the app: each packet to its stream's PBX address (None: a stream the PBX
    /// refused).
    ToPbx(Vec<Option<PbxRoute>>),
    /// From the PBX's address of `stream` (its RTP, or its RTCP port with `rtcp`) to the
    /// app on the selected pair.
    ToApp {
        stream: usize,
        rtcp: bool,
        from: SocketAddr,
        to: SocketAddr,
    },
}

struct SteeredFlow {
    bridge: Arc<Bridge>,
    direction: Direction,
}

impl Transcrypt for SteeredFlow {
    fn transcrypt(&self, buf: &mut [u8], len: usize) -> Option<Egress> {
        match &self.direction {
            Direction::ToPbx(routes) => {
                let len = self.bridge.app_to_pbx(buf, len)?;
                let out = &buf[..len];
                let rtcp = is_rtcp(out);
                let route = (*routes.get(self.bridge.routes.app_stream(out, rtcp))?)?;
                let (from, to) = match route.rtcp {
                    Some(addresses) if rtcp => addresses,
                    _ => route.rtp,
                };
                self.bridge.counters.to_pbx(len, monotonic_ns());
                Some(Egress { len, from, to })
            }
            Direction::ToApp {
                stream,
                rtcp,
                from,
                to,
            } => {
                if !rtcp {
                    self.bridge.routes.learn_pbx(&buf[..len], *stream);
                }
                let len = self.bridge.pbx_to_app(buf, len)?;
                self.bridge.counters.to_app(len, monotonic_ns());
                Some(Egress {
                    len,
                    from: *from,
                    to: *to,
                })
            }
        }
    }
}

/// The flows of a bridged call on the workers (ids in the flow table).
#[derive(Debug, Default)]
pub(super) struct SteeredFlows {
    ids: Vec<u32>,
}

impl SteeredFlows {
    pub(super) fn ids(&self) -> Vec<u32> {
        self.ids.clone()
    }
}

impl Calls {
    /// Puts a bridged call's media on the workers for `pair`, in place of the flows of an
    /// earlier pair or PBX address. Nothing is steered (the sockets carry it all) without
    /// workers, before both legs have keys, for an app reached through a TURN relay, or when
    /// the PBX's streams are not all on the one address the flows' next hop reaches.
    pub(super) fn steer(&self, call: &Call, inner: &mut CallInner, pair: SelectedPair) {
        self.unsteer(inner);
        let Some(workers) = self.table.workers() else {
            return;
        };
        let Some(bridge) = inner.bridge.clone() else {
            return;
        };
        let Some(specs) = steered_flows(call, inner, &bridge, pair) else {
            return;
        };
        let now = monotonic_ns();
        for (spec, flow) in specs {
            let handler: Arc<dyn Transcrypt> = Arc::new(flow);
            // The workers have the handler before the program steers a packet to them.
            let mut given = None;
            let installed = self.table.offload_owned_prepared(spec, now, |id| {
                workers.install(id, handler.clone());
                given = Some(id);
            });
            match installed {
                Ok(id) => inner.steered.ids.push(id),
                Err(err) => {
                    if let Some(id) = given {
                        workers.remove(id);
                    }
                    tracing::warn!(call = call.id, %err, "calls: bridged media stays on the relay's sockets");
                    return self.unsteer(inner);
                }
            }
        }
        tracing::info!(call = call.id, app = %pair.remote, flows = ?inner.steered.ids, "calls: bridged media steered to the AF_XDP workers");
    }

    /// Takes a bridged call's media off the workers: its packets go to its sockets.
    pub(super) fn unsteer(&self, inner: &mut CallInner) {
        let now = monotonic_ns();
        for id in inner.steered.ids.drain(..) {
            let _ = self.table.remove(id, now);
            if let Some(workers) = self.table.workers() {
                workers.remove(id);
            }
        }
    }
}

/// The flows that steer a bridged call's media, each with what its worker does; None when
/// the call's media stays on its sockets.
fn steered_flows(
    call: &Call,
    inner: &CallInner,
    bridge: &Arc<Bridge>,
    pair: SelectedPair,
) -> Option<Vec<(FlowSpec, SteeredFlow)>> {
    if bridge.waits_for_either()
        || pair.remote_type == webrtc_ice::candidate::CandidateType::Relay
        || pair.remote.is_ipv4() != pair.local.is_ipv4()
    {
        return None;
    }
    let pbx = inner.pbx?;
    // The flow toward the PBX resolves one next hop, for its audio's RTP address.
    let reachable = |address: SocketAddr| address.ip() == pbx.ip();
    let mut routes = vec![Some(PbxRoute {
        rtp: (call.lan, pbx),
        rtcp: inner.pbx_rtcp.map(|rtcp| (rtcp_above(call.lan), rtcp)),
    })];
    let mut from_pbx = vec![(0, false, pbx, call.lan)];
    if let Some(rtcp) = inner.pbx_rtcp {
        from_pbx.push((0, true, rtcp, rtcp_above(call.lan)));
    }
    for (k, stream) in call.streams.iter().enumerate() {
        let Some((rtp, rtcp)) = inner.pbx_streams.get(k).copied().flatten() else {
            routes.push(None);
            continue;
        };
        routes.push(Some(PbxRoute {
            rtp: (stream.lan, rtp),
            rtcp: rtcp.map(|rtcp| (rtcp_above(stream.lan), rtcp)),
        }));
        from_pbx.push((k + 1, false, rtp, stream.lan));
        if let Some(rtcp) = rtcp {
            from_pbx.push((k + 1, true, rtcp, rtcp_above(stream.lan)));
        }
    }
    if !from_pbx
        .iter()
        .all(|(_, _, address, _)| reachable(*address))
    {
        return None;
    }
    let spec = |src, dst, new_src, new_dst| FlowSpec {
        src,
        dst,
        new_src,
        new_dst,
        channel: None,
        rtcp_to_userspace: false,
        opaque_payload: false,
        to_worker: true,
    };
    let mut flows = vec![(
        spec(pair.remote, pair.local, call.lan, pbx),
        SteeredFlow {
            bridge: bridge.clone(),
            direction: Direction::ToPbx(routes),
        },
    )];
    for (stream, rtcp, pbx_address, lan) in from_pbx {
        flows.push((
            spec(pbx_address, lan, pair.local, pair.remote),
            SteeredFlow {
                bridge: bridge.clone(),
                direction: Direction::ToApp {
                    stream,
                    rtcp,
                    from: pair.local,
                    to: pair.remote,
                },
            },
        ));
    }
    Some(flows)
}
