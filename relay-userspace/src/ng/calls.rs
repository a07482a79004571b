//! ng calls: one per `call-id`, two sides (the caller's `from-tag`, the callee's `to-tag`),
//! each stream anchored on a port pair per side. `offer` and `answer` give a side's SDP
//! and get back the SDP for the other side; `delete` ends the call (or the branch its
//! `to-tag` names); calls nobody deletes end when their media stops.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::{
    bencode::Value,
    config::NgConfig,
    ice::IceProgress,
    media::{Peer, PortPool, StreamMedia},
    protocol::{Ice, NgError, Options, Signal, Target},
};
use crate::{
    datapath::table::FlowTable,
    session::{
        sdp::IceLines,
        streams::{self, Anchor, RtcpMux},
    },
    time::monotonic_ns,
};

/// Why an ng call ended, for the log and the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ended {
    Deleted,
    NoAnswer,
    MediaTimeout,
}

pub struct NgCalls {
    interfaces: Vec<(String, IpAddr)>,
    pool: PortPool,
    table: Arc<FlowTable>,
    /// The flow table forwards in the kernel (XDP).
    offload: bool,
    media_timeout: Duration,
    answer_timeout: Duration,
    consent_timeout: Duration,
    calls: Mutex<HashMap<String, NgCall>>,
    totals: Mutex<Totals>,
}

#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub created: u64,
    pub ended: std::collections::BTreeMap<Ended, u64>,
}

struct NgCall {
    created: SystemTime,
    created_at: Instant,
    last_signal: SystemTime,
    /// The side's tag, the caller's first.
    tags: [String; 2],
    answered_at: Option<Instant>,
    /// The relay's interface toward each side.
    ips: [IpAddr; 2],
    streams: Vec<Arc<StreamMedia>>,
}

/// One ng call as `list` and the control API show it.
#[derive(Debug, Clone)]
pub struct NgCallInfo {
    pub call_id: String,
    pub tags: [String; 2],
    pub answered: bool,
    pub since_secs: u64,
    pub streams: usize,
    pub flows: Vec<u32>,
    pub packets: u64,
    pub bytes: u64,
    /// The relay's ICE toward the sides, the worst stream's; None without ICE.
    pub ice: Option<IceProgress>,
}

fn unix(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl NgCalls {
    pub fn new(config: &NgConfig, table: Arc<FlowTable>) -> NgCalls {
        NgCalls {
            interfaces: config.interface_addresses(),
            pool: PortPool::new(config.ports().unwrap_or(30000..=39999)),
            offload: table.status().kind == crate::datapath::DatapathKind::Xdp,
            table,
            media_timeout: Duration::from_secs(config.media_timeout_secs),
            answer_timeout: Duration::from_secs(config.answer_timeout_secs),
            consent_timeout: Duration::from_secs(config.ice_consent_timeout_secs),
            calls: Mutex::new(HashMap::new()),
            totals: Mutex::new(Totals::default()),
        }
    }

    fn calls(&self) -> MutexGuard<'_, HashMap<String, NgCall>> {
        self.calls.lock().expect("ng calls poisoned")
    }

    pub fn totals(&self) -> Totals {
        self.totals.lock().expect("ng totals poisoned").clone()
    }

    pub fn len(&self) -> usize {
        self.calls().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The relay's addresses toward the sender and toward the other side.
    fn interfaces_for(&self, options: &Options) -> Result<[IpAddr; 2], NgError> {
        let find = |name: Option<&String>| -> Result<IpAddr, NgError> {
            match name {
                None => Ok(self.interfaces[0].1),
                Some(name) => self
                    .interfaces
                    .iter()
                    .find(|(known, _)| known == name)
                    .map(|(_, ip)| *ip)
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            self.interfaces.iter().map(|(n, _)| n.as_str()).collect();
                        NgError::new(format!(
                            "direction={name}: no such interface (ng.interfaces: {})",
                            known.join(", ")
                        ))
                    }),
            }
        };
        let sender = find(options.direction.first())?;
        let other = find(options.direction.get(1).or(options.direction.first()))?;
        Ok([sender, other])
    }

    /// What the relay cannot do for a side, refused before anything changes.
    fn check_supported(options: &Options, parsed: &[streams::Stream]) -> Result<(), NgError> {
        if let Some(mode) = &options.dtls {
            return Err(NgError::new(format!(
                "DTLS={mode}: this relay passes DTLS-SRTP between the sides as is on ng calls, it does not terminate it; use DTLS=off"
            )));
        }
        if let Some(wanted) = &options.transport_protocol
            && let Some(stream) = parsed
                .iter()
                .find(|s| s.endpoint.is_some() && &s.proto != wanted)
        {
            return Err(NgError::new(format!(
                "transport-protocol={wanted}: the {} stream is {}; this relay forwards each stream's profile as is on ng calls (no transcrypting between profiles)",
                stream.media, stream.proto
            )));
        }
        Ok(())
    }

    fn address_override(options: &Options) -> Option<IpAddr> {
        options
            .received_from
            .filter(|_| options.sip_source_address && !options.trust_address)
    }

    fn peers(options: &Options, parsed: &[streams::Stream]) -> Vec<Option<Peer>> {
        parsed
            .iter()
            .map(|stream| {
                stream.endpoint.map(|endpoint| Peer {
                    endpoint,
                    advertised: endpoint,
                    learn: !options.asymmetric,
                    learned: false,
                })
            })
            .collect()
    }

    pub async fn offer(&self, signal: &Signal) -> Result<String, NgError> {
        let parsed = streams::streams(&signal.sdp, Self::address_override(&signal.options))
            .map_err(|err| NgError::new(format!("sdp: {err}")))?;
        Self::check_supported(&signal.options, &parsed)?;
        let existing = {
            let calls = self.calls();
            calls.get(&signal.call_id).map(|call| {
                let sender = call.tags.iter().position(|t| *t == signal.from_tag);
                (sender, call.ips, call.streams.clone())
            })
        };
        let (sender, ips, mut media) = match existing {
            Some((Some(sender), ips, media)) => (sender, ips, media),
            Some((None, _, _)) => {
                return Err(NgError::new(format!(
                    "call {}: from-tag {} is neither side of the call",
                    signal.call_id, signal.from_tag
                )));
            }
            None => {
                let [here, there] = self.interfaces_for(&signal.options)?;
                (0, [here, there], Vec::new())
            }
        };
        if parsed.len() < media.len() {
            return Err(NgError::new(format!(
                "sdp: the re-offer has {} m-lines, the call has {} (RFC 3264: m-lines are never removed, a refused one keeps its place with port 0)",
                parsed.len(),
                media.len()
            )));
        }
        // Streams the offer adds (a new call's, or a re-offer's new m-lines).
        let mut added = Vec::new();
        for (index, stream) in parsed.iter().enumerate().skip(media.len()) {
            let mut pair = Vec::new();
            for ip in ips {
                match self.pool.bind(ip).await {
                    Some(ports) => pair.push(ports),
                    None => {
                        return Err(NgError::new(format!(
                            "no free port pair left in ng.port_range on {ip}"
                        )));
                    }
                }
            }
            let (b, a) = (pair.pop().expect("two"), pair.pop().expect("two"));
            let stream = StreamMedia::new(
                index,
                stream.media.clone(),
                stream.proto.clone(),
                [a, b],
                self.offload,
            );
            stream.start(self.table.clone());
            added.push(stream.clone());
            media.push(stream);
        }
        let other = 1 - sender;
        let ports: Vec<Option<u16>> = parsed
            .iter()
            .zip(&media)
            .map(|(stream, m)| stream.endpoint.map(|_| m.ports[other].address.port()))
            .collect();
        // ICE is forced on a stream the other side has not described yet: a side already
        // plain is not moved to ICE in the middle of a call (its media would stop until
        // its answer); one that speaks ICE keeps it.
        let force = signal.options.ice == Ice::Force;
        let ports_with_ice: Vec<Option<u16>> = ports
            .iter()
            .zip(&media)
            .map(|(port, m)| port.filter(|_| !force || !m.described(other) || m.speaks_ice(other)))
            .collect();
        let ice = match self
            .speak_ice(&media, &ports_with_ice, other, force, true)
            .await
        {
            Ok(ice) => ice,
            Err(err) => {
                for stream in &added {
                    stream.close(&self.table);
                }
                return Err(err);
            }
        };
        let sdp = streams::anchor_streams(
            &signal.sdp,
            Anchor {
                ip: ips[other],
                ports: &ports,
                // ICE checks one component: RTCP multiplexed unless the proxy says not.
                rtcp_mux: match signal.options.rtcp_mux {
                    RtcpMux::AsIs if force => RtcpMux::Offer,
                    mux => mux,
                },
                origin: signal.options.replace_origin,
                full_rtcp: signal.options.full_rtcp_attribute,
                ice: &ice,
            },
        );
        let sdp = match sdp {
            Ok(sdp) => sdp,
            Err(err) => {
                for stream in &added {
                    stream.close(&self.table);
                }
                return Err(NgError::new(format!("sdp: {err}")));
            }
        };
        for ((stream, peer), parsed) in media
            .iter()
            .zip(Self::peers(&signal.options, &parsed))
            .zip(&parsed)
        {
            stream.set_peer(&self.table, sender, peer);
            stream
                .remote_ice(&self.table, sender, parsed.ice.clone(), true)
                .await;
        }
        let now = SystemTime::now();
        let mut calls = self.calls();
        let new = !calls.contains_key(&signal.call_id);
        let call = calls
            .entry(signal.call_id.clone())
            .or_insert_with(|| NgCall {
                created: now,
                created_at: Instant::now(),
                last_signal: now,
                tags: [signal.from_tag.clone(), String::new()],
                answered_at: None,
                ips,
                streams: Vec::new(),
            });
        call.last_signal = now;
        call.streams = media;
        if let Some(to_tag) = &signal.to_tag
            && sender == 0
            && call.tags[1].is_empty()
        {
            call.tags[1] = to_tag.clone();
        }
        drop(calls);
        if new {
            self.totals.lock().expect("ng totals poisoned").created += 1;
            tracing::info!(call_id = %signal.call_id, from_tag = %signal.from_tag, streams = parsed.len(), "ng: call offered");
        }
        Ok(sdp)
    }

    pub async fn answer(&self, signal: &Signal) -> Result<String, NgError> {
        let to_tag = signal.to_tag.clone().unwrap_or_default();
        let (answerer, ips, media) = {
            let mut calls = self.calls();
            let call = calls
                .get_mut(&signal.call_id)
                .ok_or_else(|| NgError::new(format!("unknown call-id {:?}", signal.call_id)))?;
            // The answerer is the side the offer went to: the to-tag's (a re-INVITE from the
            // callee is answered by the caller, whose tag is then the to-tag).
            let answerer = match call.tags.iter().position(|t| *t == to_tag) {
                Some(side) => side,
                None if call.tags[0] == signal.from_tag => {
                    // The first answer, or another branch of a forked call taking over.
                    if !call.tags[1].is_empty() {
                        tracing::info!(call_id = %signal.call_id, from = %call.tags[1], to = %to_tag, "ng: another branch answers the call");
                    }
                    call.tags[1] = to_tag.clone();
                    1
                }
                None => {
                    return Err(NgError::new(format!(
                        "call {}: neither from-tag {} nor to-tag {} is a side of the call",
                        signal.call_id, signal.from_tag, to_tag
                    )));
                }
            };
            (answerer, call.ips, call.streams.clone())
        };
        let parsed = streams::streams(&signal.sdp, Self::address_override(&signal.options))
            .map_err(|err| NgError::new(format!("sdp: {err}")))?;
        Self::check_supported(&signal.options, &parsed)?;
        if parsed.len() != media.len() {
            return Err(NgError::new(format!(
                "sdp: the answer has {} m-lines, the offer had {} (RFC 3264: one for each)",
                parsed.len(),
                media.len()
            )));
        }
        let offerer = 1 - answerer;
        let ports: Vec<Option<u16>> = parsed
            .iter()
            .zip(&media)
            .map(|(stream, m)| {
                (stream.endpoint.is_some() && m.described(offerer))
                    .then(|| m.ports[offerer].address.port())
            })
            .collect();
        // ICE toward the offerer only where its offer had ICE (RFC 8839 section 4.2.1: an
        // answer has ICE only if the offer did).
        let force = signal.options.ice == Ice::Force;
        let ports_with_ice: Vec<Option<u16>> = ports
            .iter()
            .zip(&media)
            .map(|(port, m)| port.filter(|_| !force || m.remote_ice_known(offerer)))
            .collect();
        let ice = self
            .speak_ice(&media, &ports_with_ice, offerer, force, false)
            .await?;
        let speaks_ice = ice.iter().any(Option::is_some);
        let sdp = streams::anchor_streams(
            &signal.sdp,
            Anchor {
                ip: ips[offerer],
                ports: &ports,
                // An answer takes what the offer had; it can only refuse multiplexing. An
                // ICE offerer multiplexes (RFC 8829 5.1.3): the relay's one component.
                rtcp_mux: match signal.options.rtcp_mux {
                    RtcpMux::Demux => RtcpMux::Demux,
                    _ if speaks_ice => RtcpMux::Offer,
                    _ => RtcpMux::AsIs,
                },
                origin: signal.options.replace_origin,
                full_rtcp: signal.options.full_rtcp_attribute,
                ice: &ice,
            },
        )
        .map_err(|err| NgError::new(format!("sdp: {err}")))?;
        // Where the answer the offerer gets refuses rtcp-mux, its RTCP goes apart.
        let written = streams::streams(&sdp, None)
            .map_err(|err| NgError::new(format!("sdp: the relay's own answer: {err}")))?;
        for (stream, written) in media.iter().zip(&written) {
            if written.endpoint.is_some_and(|e| !e.rtcp_mux) {
                stream.refuse_rtcp_mux(&self.table, offerer);
            }
        }
        for ((stream, peer), parsed) in media
            .iter()
            .zip(Self::peers(&signal.options, &parsed))
            .zip(&parsed)
        {
            if parsed.ice.is_none() && stream.plain_again(&self.table, answerer) {
                tracing::warn!(call_id = %signal.call_id, stream = stream.index, "ng: the answer has no ICE for the relay's ICE offer: that side is plain UDP at its SDP's address");
            }
            stream.set_peer(&self.table, answerer, peer);
            stream
                .remote_ice(&self.table, answerer, parsed.ice.clone(), false)
                .await;
        }
        let mut calls = self.calls();
        if let Some(call) = calls.get_mut(&signal.call_id) {
            call.last_signal = SystemTime::now();
            if call.answered_at.is_none() {
                call.answered_at = Some(Instant::now());
                tracing::info!(call_id = %signal.call_id, to_tag = %to_tag, flows = media.iter().map(|m| m.flow_ids().len()).sum::<usize>(), "ng: call answered; media flows installed");
            }
        }
        Ok(sdp)
    }

    /// The relay's ICE toward `side` for each m-line the SDP toward it keeps (`ports`):
    /// where it already speaks ICE, or everywhere when `force`d; `offer` when that SDP is an
    /// offer (the relay is then the controlling agent).
    async fn speak_ice(
        &self,
        media: &[Arc<StreamMedia>],
        ports: &[Option<u16>],
        side: usize,
        force: bool,
        offer: bool,
    ) -> Result<Vec<Option<IceLines>>, NgError> {
        let mut lines = Vec::new();
        for (stream, port) in media.iter().zip(ports) {
            lines.push(match port {
                Some(_) if force || stream.speaks_ice(side) => Some(
                    stream
                        .speak_ice(&self.table, side, offer, self.consent_timeout)
                        .await
                        .map_err(|err| NgError::new(format!("ICE: {err:#}")))?,
                ),
                _ => None,
            });
        }
        Ok(lines)
    }

    /// `delete`: the whole call, or with a `to-tag` that is not the answering side's, nothing
    /// (a branch that never answered); the call's totals in the reply.
    pub fn delete(&self, target: &Target) -> Result<Value, NgError> {
        let mut calls = self.calls();
        let call = calls
            .get(&target.call_id)
            .ok_or_else(|| NgError::new(format!("unknown call-id {:?}", target.call_id)))?;
        if let Some(to_tag) = &target.to_tag
            && !call.tags.contains(to_tag)
        {
            return Err(NgError::new(format!(
                "call {}: no branch with to-tag {to_tag}",
                target.call_id
            )));
        }
        let reply = self.report(call);
        let call = calls.remove(&target.call_id).expect("just found");
        drop(calls);
        self.end(&target.call_id, call, Ended::Deleted);
        Ok(reply)
    }

    pub fn query(&self, target: &Target) -> Result<Value, NgError> {
        let calls = self.calls();
        let call = calls
            .get(&target.call_id)
            .ok_or_else(|| NgError::new(format!("unknown call-id {:?}", target.call_id)))?;
        Ok(self.report(call))
    }

    pub fn list(&self, limit: usize) -> Vec<String> {
        let mut ids: Vec<String> = self.calls().keys().cloned().collect();
        ids.sort();
        ids.truncate(limit);
        ids
    }

    pub fn infos(&self) -> Vec<NgCallInfo> {
        let calls = self.calls();
        let mut infos: Vec<NgCallInfo> = calls
            .iter()
            .map(|(id, call)| {
                let (mut packets, mut bytes) = (0, 0);
                for stream in &call.streams {
                    for side in 0..2 {
                        let r = stream.received(&self.table, side);
                        packets += r.rtp_packets + r.rtcp_packets;
                        bytes += r.rtp_bytes + r.rtcp_bytes;
                    }
                }
                NgCallInfo {
                    call_id: id.clone(),
                    tags: call.tags.clone(),
                    answered: call.answered_at.is_some(),
                    since_secs: call.created_at.elapsed().as_secs(),
                    streams: call.streams.len(),
                    flows: call.streams.iter().flat_map(|s| s.flow_ids()).collect(),
                    packets,
                    bytes,
                    ice: call.streams.iter().filter_map(|s| s.ice_progress()).min(),
                }
            })
            .collect();
        infos.sort_by(|a, b| a.call_id.cmp(&b.call_id));
        infos
    }

    /// Ends unanswered and silent calls; run every second.
    pub fn expire(&self) {
        let now_ns = monotonic_ns();
        let mut ended = Vec::new();
        {
            let mut calls = self.calls();
            calls.retain(|id, call| {
                let why = match call.answered_at {
                    None if call.created_at.elapsed() > self.answer_timeout => Ended::NoAnswer,
                    None => return true,
                    Some(answered) => {
                        let last = call
                            .streams
                            .iter()
                            .map(|s| s.last_packet_ns(&self.table, None))
                            .max()
                            .unwrap_or(0);
                        let idle = if last == 0 {
                            answered.elapsed()
                        } else {
                            Duration::from_nanos(now_ns.saturating_sub(last))
                                .min(answered.elapsed())
                        };
                        if idle <= self.media_timeout {
                            return true;
                        }
                        Ended::MediaTimeout
                    }
                };
                ended.push((id.clone(), std::mem::take(&mut call.streams), why));
                false
            });
        }
        for (id, streams, why) in ended {
            for stream in &streams {
                stream.close(&self.table);
            }
            self.tally(why);
            match why {
                Ended::NoAnswer => {
                    tracing::info!(call_id = %id, timeout_secs = self.answer_timeout.as_secs(), "ng: call deleted: no answer within ng.answer_timeout_secs")
                }
                _ => {
                    tracing::info!(call_id = %id, timeout_secs = self.media_timeout.as_secs(), "ng: call deleted: no media for ng.media_timeout_secs (the SIP proxy never deleted it)")
                }
            }
        }
    }

    /// Ends every call (relayd stopping): flows out of the kernel.
    pub fn stop(&self) {
        let calls: Vec<(String, NgCall)> = self.calls().drain().collect();
        for (id, call) in calls {
            self.end(&id, call, Ended::Deleted);
        }
    }

    fn tally(&self, why: Ended) {
        *self
            .totals
            .lock()
            .expect("ng totals poisoned")
            .ended
            .entry(why)
            .or_default() += 1;
    }

    fn end(&self, id: &str, call: NgCall, why: Ended) {
        for stream in &call.streams {
            stream.close(&self.table);
        }
        self.tally(why);
        tracing::info!(call_id = %id, secs = call.created_at.elapsed().as_secs(), "ng: call deleted; its flows are removed");
    }

    /// A call as `query` and `delete` report it, in rtpengine's shape (which Kamailio's
    /// `rtpengine_query` and `$rtpstat` read): per tag its medias and their RTP and RTCP
    /// streams, with what was received from that side, and the totals.
    fn report(&self, call: &NgCall) -> Value {
        let int = |n: u64| Value::Int(n.min(i64::MAX as u64) as i64);
        let text = |s: &str| Value::bytes(s);
        let (now_ns, now_unix) = (monotonic_ns(), crate::time::unix_now() as i64);
        // A monotonic instant as Unix seconds; none yet: the call's creation.
        let unix_of = |ns: u64| match ns {
            0 => Value::Int(unix(call.created)),
            ns => Value::Int(now_unix - (now_ns.saturating_sub(ns) / 1_000_000_000) as i64),
        };
        let address = |address: std::net::SocketAddr| {
            Value::dict([
                (
                    "family",
                    text(if address.is_ipv4() { "IPv4" } else { "IPv6" }),
                ),
                ("address", Value::bytes(address.ip().to_string())),
                ("port", int(address.port().into())),
            ])
        };
        let or_empty = |endpoint: Option<std::net::SocketAddr>| {
            endpoint.map_or_else(|| Value::dict([]), address)
        };
        let stats = |packets: u64, bytes: u64, errors: u64| {
            Value::dict([
                ("packets", int(packets)),
                ("bytes", int(bytes)),
                ("errors", int(errors)),
            ])
        };
        let created = call.created.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut totals = [[0u64; 3]; 2];
        let mut tags = Vec::new();
        for side in 0..2 {
            let tag = &call.tags[side];
            if tag.is_empty() {
                continue;
            }
            let other = &call.tags[1 - side];
            let medias: Vec<Value> = call
                .streams
                .iter()
                .map(|stream| {
                    let received = stream.received(&self.table, side);
                    totals[0][0] += received.rtp_packets;
                    totals[0][1] += received.rtp_bytes;
                    totals[0][2] += received.refused;
                    totals[1][0] += received.rtcp_packets;
                    totals[1][1] += received.rtcp_bytes;
                    let peer = stream.peer(side);
                    let ports = &stream.ports[side];
                    let last = unix_of(stream.last_packet_ns(&self.table, Some(side)));
                    let family = text(if ports.address.is_ipv4() {
                        "IPv4"
                    } else {
                        "IPv6"
                    });
                    let one =
                        |kind: &str, local: std::net::SocketAddr, endpoint, advertised, stats| {
                            Value::dict([
                                ("local address", Value::bytes(local.ip().to_string())),
                                ("local port", int(local.port().into())),
                                ("family", family.clone()),
                                ("endpoint", or_empty(endpoint)),
                                ("advertised endpoint", or_empty(advertised)),
                                ("last packet", last.clone()),
                                ("stats", stats),
                                ("flags", Value::List(vec![text(kind)])),
                            ])
                        };
                    let rtp = one(
                        "RTP",
                        ports.address,
                        peer.map(|p| p.endpoint.rtp),
                        peer.map(|p| p.advertised.rtp),
                        stats(received.rtp_packets, received.rtp_bytes, received.refused),
                    );
                    let rtcp = one(
                        "RTCP",
                        ports.rtcp_address(),
                        peer.map(|p| p.endpoint.rtcp),
                        peer.map(|p| p.advertised.rtcp),
                        stats(received.rtcp_packets, received.rtcp_bytes, 0),
                    );
                    let mut flags = Vec::new();
                    if peer.is_some() {
                        flags.push(text("initialized"));
                    }
                    if peer.is_some_and(|p| p.endpoint.rtcp_mux) {
                        flags.push(text("RTCP-mux"));
                    }
                    if peer.is_some_and(|p| p.learned) {
                        flags.push(text("learned address"));
                    }
                    Value::dict([
                        ("index", int(stream.index as u64 + 1)),
                        ("type", Value::bytes(stream.media.clone())),
                        ("protocol", Value::bytes(stream.proto.clone())),
                        ("streams", Value::List(vec![rtp, rtcp])),
                        ("flags", Value::List(flags)),
                    ])
                })
                .collect();
            let peers = || {
                let list = if other.is_empty() {
                    Vec::new()
                } else {
                    vec![Value::dict([
                        ("tag", Value::bytes(other.clone())),
                        ("type", text("offer/answer")),
                    ])]
                };
                Value::List(list)
            };
            tags.push((
                tag.clone(),
                Value::dict([
                    ("tag", Value::bytes(tag.clone())),
                    ("created", Value::Int(created.as_secs() as i64)),
                    ("in dialogue with", Value::bytes(other.clone())),
                    ("medias", Value::List(medias)),
                    ("subscribers", peers()),
                    ("subscriptions", peers()),
                ]),
            ));
        }
        Value::dict([
            ("result", text("ok")),
            ("created", Value::Int(created.as_secs() as i64)),
            ("created_us", int(created.subsec_micros().into())),
            ("last signal", Value::Int(unix(call.last_signal))),
            // The relay does not look into RTP: no SSRCs to report.
            ("SSRC", Value::dict([])),
            (
                "tags",
                Value::Dict(
                    tags.into_iter()
                        .map(|(tag, value)| (tag.into_bytes(), value))
                        .collect(),
                ),
            ),
            (
                "totals",
                Value::dict([
                    ("RTP", stats(totals[0][0], totals[0][1], totals[0][2])),
                    ("RTCP", stats(totals[1][0], totals[1][1], totals[1][2])),
                ]),
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::memory::Memory,
        ng::protocol::{Options, Signal},
    };

    fn signal(call_id: &str, from_tag: &str, to_tag: Option<&str>, sdp: String) -> Signal {
        Signal {
            call_id: call_id.to_owned(),
            from_tag: from_tag.to_owned(),
            to_tag: to_tag.map(str::to_owned),
            via_branch: None,
            sdp,
            options: Options::default(),
        }
    }

    fn sdp(ip: &str, media: &[(&str, u16)]) -> String {
        let mut text = format!("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n");
        for (kind, port) in media {
            text.push_str(&format!("m={kind} {port} RTP/AVP 0\r\n"));
        }
        text
    }

    fn calls() -> NgCalls {
        let config = NgConfig {
            listen: "127.0.0.1:0".into(),
            interfaces: [("lo".to_owned(), "127.0.0.1".to_owned())].into(),
            port_range: "47000-47099".into(),
            ice_consent_timeout_secs: 3,
            ..NgConfig::default()
        };
        let table = Arc::new(FlowTable::new(Box::new(Arc::new(Memory::default())), 60, 1));
        NgCalls::new(&config, table)
    }

    #[tokio::test]
    async fn a_reoffer_keeps_its_ports_may_add_streams_and_may_not_remove_them() {
        let calls = calls();
        let first = calls
            .offer(&signal(
                "c",
                "a",
                None,
                sdp("127.0.0.2", &[("audio", 5000)]),
            ))
            .await
            .unwrap();
        calls
            .answer(&signal(
                "c",
                "a",
                Some("b"),
                sdp("127.0.0.3", &[("audio", 6000)]),
            ))
            .await
            .unwrap();
        // The caller re-offers with video added: audio keeps its relay port.
        let again = calls
            .offer(&signal(
                "c",
                "a",
                Some("b"),
                sdp("127.0.0.2", &[("audio", 5000), ("video", 5002)]),
            ))
            .await
            .unwrap();
        let port = |text: &str, kind: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("m={kind} ")))
                .map(|rest| rest.split(' ').next().unwrap().to_owned())
        };
        assert_eq!(port(&first, "audio"), port(&again, "audio"));
        assert!(port(&again, "video").is_some_and(|p| p != "0"), "{again}");
        // The callee re-offers (its re-INVITE): it is the sender now.
        calls
            .offer(&signal(
                "c",
                "b",
                Some("a"),
                sdp("127.0.0.3", &[("audio", 6000), ("video", 0)]),
            ))
            .await
            .unwrap();
        let fewer = calls
            .offer(&signal(
                "c",
                "a",
                Some("b"),
                sdp("127.0.0.2", &[("audio", 5000)]),
            ))
            .await
            .unwrap_err();
        assert!(fewer.0.contains("m-lines are never removed"), "{fewer}");
        let stranger = calls
            .offer(&signal(
                "c",
                "x",
                None,
                sdp("127.0.0.2", &[("audio", 5000)]),
            ))
            .await
            .unwrap_err();
        assert!(stranger.0.contains("neither side"), "{stranger}");
        assert_eq!(calls.len(), 1);
        calls.stop();
        assert!(calls.is_empty());
    }

    /// A caller that offers rtcp-mux (with its RTCP port for the fallback) and a callee that
    /// does not multiplex: the answer the caller gets has no rtcp-mux, and the relay takes
    /// and sends the caller's RTCP on its RTCP port.
    #[tokio::test]
    async fn an_offerer_whose_rtcp_mux_is_refused_keeps_rtcp_apart() {
        let calls = calls();
        let mut offer = sdp("127.0.0.2", &[("audio", 5000)]);
        offer.push_str("a=rtcp-mux\r\na=rtcp:5009\r\n");
        calls.offer(&signal("mux", "a", None, offer)).await.unwrap();
        let answer = calls
            .answer(&signal(
                "mux",
                "a",
                Some("b"),
                sdp("127.0.0.3", &[("audio", 6000)]),
            ))
            .await
            .unwrap();
        assert!(!answer.contains("a=rtcp-mux"), "{answer}");
        let stream = calls.calls()["mux"].streams[0].clone();
        let caller = stream.peer(0).unwrap().endpoint;
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(
            (caller.rtcp_mux, caller.rtcp),
            (false, addr("127.0.0.2:5009"))
        );
        assert_eq!(
            stream.peer(1).unwrap().endpoint.rtcp,
            addr("127.0.0.3:6001")
        );
        calls.stop();
    }

    /// A callee agent that stops answering the relay's consent checks: after
    /// `ng.ice_consent_timeout_secs` (3 s here) its side fails and the relay forwards
    /// nothing toward it.
    #[tokio::test]
    async fn a_side_that_stops_answering_consent_checks_loses_its_media() {
        let calls = calls();
        let mut offer = signal("consent", "a", None, sdp("127.0.0.2", &[("audio", 5000)]));
        offer.options.ice = Ice::Force;
        let toward_callee = calls.offer(&offer).await.unwrap();
        let relay_ice = streams::streams(&toward_callee, None).unwrap()[0]
            .ice
            .clone()
            .unwrap();
        let (agent, agent_sdp) = loopback_agent().await;
        calls
            .answer(&signal("consent", "a", Some("b"), agent_sdp))
            .await
            .unwrap();
        let _conn = accept(&agent, relay_ice).await;
        let stream = calls.calls()["consent"].streams[0].clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while stream.peer(1).is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay selects the pair"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = agent.close().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        while calls.infos()[0].ice != Some(IceProgress::Failed) {
            assert!(tokio::time::Instant::now() < deadline, "consent expires");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(stream.peer(1), None, "nothing goes toward the side");
        calls.stop();
    }

    /// A callee that answers the relay's forced ICE without any is plain from then on: a
    /// re-offer does not offer it ICE again, and its stream keeps its port.
    #[tokio::test]
    async fn a_side_that_declined_ice_is_not_offered_it_again() {
        let calls = calls();
        let forced = |sdp: String, to_tag: Option<&str>| {
            let mut offer = signal("declined", "a", to_tag, sdp);
            offer.options.ice = Ice::Force;
            offer
        };
        let first = calls
            .offer(&forced(sdp("127.0.0.2", &[("audio", 5000)]), None))
            .await
            .unwrap();
        assert!(first.contains("a=ice-ufrag:"), "{first}");
        assert_eq!(calls.infos()[0].ice, Some(IceProgress::Waiting));
        let answer = signal(
            "declined",
            "a",
            Some("b"),
            sdp("127.0.0.3", &[("audio", 6000)]),
        );
        calls.answer(&answer).await.unwrap();
        let again = calls
            .offer(&forced(sdp("127.0.0.2", &[("audio", 5000)]), Some("b")))
            .await
            .unwrap();
        assert!(!again.contains("a=ice-ufrag:"), "{again}");
        assert_eq!(calls.infos()[0].ice, None, "plain again");
        let port = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("m=audio"))
                .map(str::to_owned)
        };
        assert_eq!(port(&first), port(&again));
        calls.stop();
    }

    /// A webrtc-ice agent on loopback with its host candidate gathered, and the SDP a
    /// callee with it would answer or offer (PCMU, rtcp-mux, its ICE).
    async fn loopback_agent() -> (webrtc_ice::agent::Agent, String) {
        use webrtc_ice::{
            agent::{Agent, agent_config::AgentConfig},
            candidate::{Candidate, CandidateType, candidate_base::unmarshal_candidate},
            network_type::NetworkType,
            udp_network::UDPNetwork,
        };
        let agent = Agent::new(AgentConfig {
            network_types: vec![NetworkType::Udp4],
            candidate_types: vec![CandidateType::Host],
            udp_network: UDPNetwork::Ephemeral(Default::default()),
            ip_filter: Arc::new(Some(Box::new(|ip: IpAddr| ip.is_loopback()))),
            include_loopback: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let (gathered_tx, mut gathered) = tokio::sync::mpsc::unbounded_channel();
        agent.on_candidate(Box::new(move |candidate| {
            let _ = gathered_tx.send(candidate.map(|c| c.marshal()));
            Box::pin(async {})
        }));
        agent.gather_candidates().unwrap();
        let mut candidates = Vec::new();
        while let Some(Some(candidate)) = gathered.recv().await {
            candidates.push(candidate);
        }
        let host = unmarshal_candidate(&candidates[0]).unwrap().addr();
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        let mut text = sdp("127.0.0.1", &[("audio", host.port())]);
        text.push_str(&format!(
            "a=rtcp-mux\r\na=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n"
        ));
        for candidate in &candidates {
            text.push_str(&format!("a=candidate:{candidate}\r\n"));
        }
        (agent, text)
    }

    /// The agent's checks (controlled) against the relay's ICE; its connection.
    async fn accept(
        agent: &webrtc_ice::agent::Agent,
        relay: IceLines,
    ) -> Arc<impl webrtc_util::Conn> {
        use webrtc_ice::candidate::{Candidate, candidate_base::unmarshal_candidate};
        for candidate in &relay.candidates {
            let candidate: Arc<dyn Candidate + Send + Sync> =
                Arc::new(unmarshal_candidate(candidate).unwrap());
            agent.add_remote_candidate(&candidate).unwrap();
        }
        let (_cancel, cancel_rx) = tokio::sync::mpsc::channel(1);
        tokio::time::timeout(
            Duration::from_secs(10),
            agent.accept(cancel_rx, relay.ufrag, relay.pwd),
        )
        .await
        .expect("ICE in time")
        .expect("ICE connects")
    }

    /// Caller -> relay -> agent, then agent -> relay -> caller, each sent until it arrives
    /// (the relay moves its flows once its own side has selected the pair).
    async fn media_both_ways(
        caller: &tokio::net::UdpSocket,
        relay_for_caller: std::net::SocketAddr,
        conn: &impl webrtc_util::Conn,
    ) {
        let mut buf = [0u8; 1500];
        let rtp = [0x80u8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xab];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let to_agent = loop {
            caller.send_to(&rtp, relay_for_caller).await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), conn.recv(&mut buf)).await
            {
                break buf[..n].to_vec();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no media to the agent"
            );
        };
        assert_eq!(to_agent, rtp);
        let back = loop {
            conn.send(&rtp).await.unwrap();
            if let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_millis(100), caller.recv_from(&mut buf)).await
            {
                break (buf[..n].to_vec(), from);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no media to the caller"
            );
        };
        assert_eq!(back, (rtp.to_vec(), relay_for_caller));
    }

    /// `ICE=force` in the offer: the callee is a webrtc-ice agent (controlled), the relay
    /// checks as the controlling agent from the stream's own port, and the media goes both
    /// ways between the caller's plain socket and the agent's selected pair (through the
    /// forwarders and the ICE leg: the in-memory datapath forwards nothing itself). Then
    /// the callee moves (a re-INVITE with a new agent's credentials): the relay restarts
    /// ICE, answers with new credentials of its own, and the media follows.
    #[tokio::test]
    async fn ice_forced_toward_a_callee_agent_connects_carries_the_media_and_restarts() {
        let calls = calls();
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let caller_port = caller.local_addr().unwrap().port();
        let forced = |from: &str, to: Option<&str>, sdp: String| {
            let mut signal = signal("ice", from, to, sdp);
            signal.options.ice = Ice::Force;
            signal
        };
        let caller_sdp = sdp("127.0.0.1", &[("audio", caller_port)]);
        let toward_callee = calls
            .offer(&forced("a", None, caller_sdp.clone()))
            .await
            .unwrap();
        let relay = streams::streams(&toward_callee, None).unwrap();
        let relay_ice = relay[0].ice.clone().expect("the relay's ICE");
        let relay_rtp = relay[0].endpoint.unwrap().rtp;
        assert!(toward_callee.contains("a=rtcp-mux\r\n"), "{toward_callee}");
        assert!(
            relay_ice.candidates[0].contains(&format!("127.0.0.1 {} typ host", relay_rtp.port())),
            "{toward_callee}"
        );

        let (agent, agent_sdp) = loopback_agent().await;
        let toward_caller = calls
            .answer(&forced("a", Some("b"), agent_sdp))
            .await
            .unwrap();
        // The caller's side is plain: no ICE toward it.
        assert!(!toward_caller.contains("ice-ufrag"), "{toward_caller}");
        let relay_for_caller = streams::streams(&toward_caller, None).unwrap()[0]
            .endpoint
            .unwrap()
            .rtp;
        let conn = accept(&agent, relay_ice.clone()).await;
        media_both_ways(&caller, relay_for_caller, &*conn).await;
        let report = calls
            .query(&Target {
                call_id: "ice".into(),
                from_tag: None,
                to_tag: None,
            })
            .unwrap();
        let rtp_in = report
            .get("totals")
            .and_then(|t| t.get("RTP"))
            .and_then(|r| r.get("packets"));
        assert!(
            matches!(rtp_in, Some(Value::Int(n)) if *n >= 2),
            "{report:?}"
        );
        assert_eq!(calls.infos()[0].ice, Some(IceProgress::Connected));

        // The callee moves: its re-INVITE carries a new agent's credentials.
        let _ = agent.close().await;
        let (moved, moved_sdp) = loopback_agent().await;
        let toward_caller_again = calls
            .offer(&forced("b", Some("a"), moved_sdp))
            .await
            .unwrap();
        // The plain caller is not moved to ICE in the middle of the call.
        assert!(
            !toward_caller_again.contains("ice-ufrag"),
            "{toward_caller_again}"
        );
        let toward_moved = calls
            .answer(&forced("b", Some("a"), caller_sdp))
            .await
            .unwrap();
        let restarted = streams::streams(&toward_moved, None).unwrap()[0]
            .ice
            .clone()
            .expect("the relay's ICE in the answer");
        assert_ne!(
            restarted.ufrag, relay_ice.ufrag,
            "new credentials for the restart"
        );
        assert_eq!(restarted.candidates, relay_ice.candidates, "the same port");
        let conn = accept(&moved, restarted).await;
        media_both_ways(&caller, relay_for_caller, &*conn).await;
        assert_eq!(calls.infos()[0].ice, Some(IceProgress::Connected));
        let _ = moved.close().await;
        calls.stop();
        // The ICE port lets go of the stream's socket: the port can be bound again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while std::net::UdpSocket::bind(relay_rtp).is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{relay_rtp} still bound"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
