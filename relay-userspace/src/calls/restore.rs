//! Calls across a restart of relayd. A connected call whose media goes as it is (pass-through
//! or plain RTP both ways, in the kernel or through the call's own tasks) is recorded in the
//! state store: its sides' SDP, its LAN port, its ICE leg as the port keeps it (credentials,
//! role, selected pair). The next relayd takes its pinned flows back from the sockets the
//! flow table adopted them with, binds the same LAN ports, hands the leg to the ICE port as
//! connected and follows the call as before: the app's consent checks are answered with the
//! same credentials, the PBX sees the same address, and the media never left the kernel.
//!
//! A bridged call (the relay terminates DTLS-SRTP or SDES) is recorded with its media
//! security: what each side's SDP said, each SRTP leg's master keys and the packet indices
//! each direction reached per SSRC (its rollover counters), written again whenever they
//! moved far enough that a restart could mistake them. The next relayd carries its media
//! with the same keys from the same indices on; the DTLS association that made the keys
//! stays with the relayd that ended (nothing in a call needs it again), and the DTLS
//! certificate is the store's, so the relay's fingerprint in later answers is the same.
//! Its other streams (video) are recorded with their LAN ports and the PBX's addresses.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{net::UdpSocket, sync::watch};
use webrtc_ice::candidate::CandidateType;

use super::{
    Call, CallEvent, CallState, Calls, EndReason, Requester, StateChange,
    bridge::{Bridge, LegRecords},
    media::LanSockets,
    security::{AppLeg, MediaPlan, PbxLeg},
    streams::LanStream,
};
use crate::{
    datapath::{FlowSpec, table::FlowTable},
    ice::leg::{ConnectedLeg, Credentials, IceLeg, SelectedPair},
    media::{Crypto, Fingerprint, Setup, dtls::Role},
    state::{CallRecord, IceRecord, LegRecord, LegSecurity, MediaRecord, StreamRecord},
    time::monotonic_ns,
};

/// How long a restored call's LAN port may take to come free (the adopted flow's socket on
/// it closes with its task).
const LAN_PORT_WAIT: Duration = Duration::from_secs(2);

/// A stored call and the ids of its flows that the table adopted from the pins (toward the
/// PBX, toward the app; None: not pinned, e.g. media toward the app stopped for consent).
pub(super) struct Stored {
    record: CallRecord,
    flows: [Option<u32>; 2],
}

/// Why a call is not recorded this time.
enum NotRecorded {
    /// It cannot be (not connected, a TURN-only app's channel).
    Never,
    /// Its leg is busy (connecting, an ICE restart running) or its bridge waits for the
    /// app's keys: next time.
    Busy,
}

/// The flows a stored call left in the kernel: toward the PBX from the app's address on the
/// selected pair, and back.
fn flow_specs(record: &CallRecord) -> [FlowSpec; 2] {
    let to_pbx = FlowSpec {
        src: record.ice.remote,
        dst: record.ice.local,
        new_src: record.lan,
        new_dst: record.pbx,
        channel: None,
        rtcp_to_userspace: record.pbx_rtcp.is_some(),
        opaque_payload: false,
        to_worker: false,
    };
    [to_pbx, to_pbx.reverse()]
}

/// Before the ICE port is bound: the stored calls' flows, which the table adopted with
/// relayd's own sockets on the ICE and LAN ports, are served by the calls again (their
/// sockets close). Returns the calls with the ids of their flows.
pub(super) fn take_back_flows(table: &FlowTable, records: Vec<CallRecord>) -> Vec<Stored> {
    records
        .into_iter()
        .map(|record| {
            let flows = flow_specs(&record).map(|spec| {
                let id = table.find(spec.id())?;
                match table.serve_externally(id) {
                    Ok(()) => Some(id),
                    Err(err) => {
                        tracing::warn!(call = record.call, id, %err, "calls: a stored call's flow cannot be taken back");
                        None
                    }
                }
            });
            Stored { record, flows }
        })
        .collect()
}

impl Stored {
    pub(super) fn flow_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.flows.iter().flatten().copied()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0)
}

fn candidate_type(name: &str) -> Option<CandidateType> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

impl Calls {
    /// The state store's view of a call.
    fn record(&self, call: &Call) -> Result<CallRecord, NotRecorded> {
        let leg = call
            .leg
            .try_lock()
            .map_err(|_| NotRecorded::Busy)?
            .connected();
        let inner = call.inner();
        if inner.local_channel.is_some() || inner.state.pair().is_none() {
            return Err(NotRecorded::Never);
        }
        let media = match &inner.plan {
            MediaPlan::PassThrough => None,
            plan => {
                let bridge = inner.bridge.as_ref().ok_or(NotRecorded::Busy)?;
                let srtp = bridge.records().ok_or(NotRecorded::Busy)?;
                media_record(plan, srtp)
            }
        };
        let pbx = inner.pbx.ok_or(NotRecorded::Never)?;
        let leg = leg.ok_or(NotRecorded::Busy)?;
        Ok(CallRecord {
            call: call.id,
            tenant: call.tenant.clone(),
            user: call.user.clone(),
            from_app: call.from_app,
            created: unix_now().saturating_sub(call.created.elapsed().as_secs()),
            lan: call.lan,
            pbx,
            pbx_rtcp: inner.pbx_rtcp,
            pbx_sdp: inner.pbx_sdp.clone(),
            app_sdp: inner.app_sdp.clone(),
            sent_to_app: inner.sent_to_app.clone(),
            sent_to_pbx: inner.sent_to_pbx.clone(),
            app_mids: inner.app_mids.clone(),
            streams: call
                .streams
                .iter()
                .zip(&inner.pbx_streams)
                .map(|(stream, pbx)| StreamRecord {
                    index: stream.index,
                    media: stream.media.clone(),
                    lan: stream.lan,
                    pbx: pbx.map(|(rtp, _)| rtp),
                    pbx_rtcp: pbx.and_then(|(_, rtcp)| rtcp),
                })
                .collect(),
            ice: IceRecord {
                local_ufrag: leg.credentials.local_ufrag,
                local_pwd: leg.credentials.local_pwd,
                remote_ufrag: leg.credentials.remote_ufrag,
                remote_pwd: leg.credentials.remote_pwd,
                candidates: leg.candidates,
                controlling: leg.controlling,
                priority: leg.priority,
                local: leg.pair.local,
                remote: leg.pair.remote,
                local_type: leg.pair.local_type.to_string(),
                remote_type: leg.pair.remote_type.to_string(),
            },
            media,
        })
    }

    /// The bridged calls whose SRTP moved on since the store last got it.
    fn srtp_drifted(&self) -> Vec<Arc<Call>> {
        let bridged: Vec<(Arc<Call>, Arc<Bridge>)> = self
            .calls()
            .values()
            .filter_map(|call| Some((call.clone(), call.inner().bridge.clone()?)))
            .collect();
        bridged
            .into_iter()
            .filter(|(_, bridge)| bridge.drifted())
            .map(|(call, _)| call)
            .collect()
    }

    /// Writes the recordable calls to the state store when they changed (or `always`);
    /// returns the ids of the calls it wrote, None when it could not write.
    pub(super) fn save(&self, always: bool) -> Option<Vec<u64>> {
        let store = self.store.as_ref()?;
        if self.handed_over.load(Ordering::Relaxed)
            || (!self.dirty.swap(false, Ordering::Relaxed) && !always)
        {
            return Some(Vec::new());
        }
        let (records, complete) = self.records();
        if !complete {
            self.dirty.store(true, Ordering::Relaxed);
        }
        match store.save_calls(&records) {
            Ok(()) => Some(records.iter().map(|record| record.call).collect()),
            Err(err) => {
                self.dirty.store(true, Ordering::Relaxed);
                tracing::warn!(%err, "calls: cannot write the calls to the state store; a restart would end them");
                None
            }
        }
    }

    /// The records of the calls that have any (connected ones), and whether every such
    /// call's was at hand (false: one was busy changing; ask again).
    pub fn records(&self) -> (Vec<CallRecord>, bool) {
        let changed = self.records_since(0);
        (changed.records, changed.complete)
    }

    /// The records of the calls changed after generation `since` (0: of every call), and
    /// which calls there are: what a copy written at `since` needs to be brought up to date.
    pub fn records_since(&self, since: u64) -> ChangedRecords {
        let calls: Vec<Arc<Call>> = self.calls().values().cloned().collect();
        let mut changed = ChangedRecords {
            records: Vec::new(),
            unrecorded: Vec::new(),
            calls: calls.iter().map(|call| call.id).collect(),
            complete: true,
        };
        for call in calls
            .iter()
            .filter(|call| since == 0 || call.changed_at.load(Ordering::Relaxed) > since)
        {
            match self.record(call) {
                Ok(record) => changed.records.push(record),
                Err(NotRecorded::Busy) => changed.complete = false,
                Err(NotRecorded::Never) => changed.unrecorded.push(call.id),
            }
        }
        changed
    }

    /// `call`'s record changed (or it ended): the state store writes the calls again, the
    /// cluster that call.
    pub(super) fn changed(&self, call: &Call) {
        self.dirty.store(true, Ordering::Relaxed);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        call.changed_at.store(generation, Ordering::Relaxed);
    }

    /// How many times the calls' records changed since relayd started.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Keeps the state store's calls up to date (once a second, when they changed) until
    /// relayd stops; `stop` writes them a last time. A bridged call whose SRTP moved on is
    /// marked changed, for the store and, `in_cluster`, for the cluster's copy (which a
    /// standby takes over from).
    pub async fn keep_recorded(
        self: Arc<Self>,
        in_cluster: bool,
        mut stopped: watch::Receiver<bool>,
    ) {
        if self.store.is_none() && !in_cluster {
            return;
        }
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    for call in self.srtp_drifted() {
                        self.changed(&call);
                    }
                    self.save(false);
                }
                _ = stopped.changed() => return,
            }
        }
    }

    /// Takes back the calls the state store kept (a restart). A call that cannot be taken
    /// back ends (`restore-failed`): its flows go, nothing of it stays.
    pub async fn restore(self: &Arc<Self>) {
        let stored = std::mem::take(&mut *self.stored.lock().expect("stored calls"));
        if stored.is_empty() {
            return;
        }
        let found = stored.len();
        let mut restored = 0;
        for stored in stored {
            let id = stored.record.call;
            match self.restore_one(&stored, None).await {
                Ok(()) => restored += 1,
                Err(reason) => {
                    tracing::warn!(
                        call = id,
                        reason,
                        "calls: a stored call cannot be restored; it ends"
                    );
                    let now = monotonic_ns();
                    for flow in stored.flow_ids() {
                        let _ = self.table.remove(flow, now);
                    }
                    *self
                        .tally
                        .lock()
                        .expect("calls tally")
                        .ended
                        .entry(EndReason::RestoreFailed)
                        .or_default() += 1;
                }
            }
        }
        // What the store holds is what this relayd has now.
        self.save(true);
        tracing::info!(
            restored,
            stored = found,
            "calls: calls restored from the state store; their media goes on"
        );
    }

    /// Takes over the calls of `from`, a relay of the cluster that is down, from the records
    /// it kept in Redis: this relay is its standby and shares its addresses, so each call
    /// goes on where it was (the same ICE credentials and selected pair, the same LAN
    /// port), its flows in this relay's table; the sessions connected anywhere in the
    /// cluster hear `call.state moved`, and those that connect later too. Returns how many
    /// calls it took; a call that cannot be taken ends (`restore-failed`).
    pub async fn take_over(self: &Arc<Self>, from: &str, records: Vec<CallRecord>) -> usize {
        let mut taken = Vec::new();
        for record in records {
            let id = record.call;
            let stored = Stored {
                record,
                flows: [None, None],
            };
            match self.restore_one(&stored, Some(from)).await {
                Ok(()) => taken.push(stored.record),
                Err(reason) => {
                    tracing::warn!(
                        call = id,
                        from,
                        reason,
                        "calls: a call of the relay that is down cannot be taken over; it ends"
                    );
                    *self
                        .tally
                        .lock()
                        .expect("calls tally")
                        .ended
                        .entry(EndReason::RestoreFailed)
                        .or_default() += 1;
                }
            }
        }
        self.save(true);
        for record in &taken {
            self.announce_restored(&Requester::Controller {
                tenant: record.tenant.clone(),
            });
            self.announce_restored(&Requester::App {
                tenant: record.tenant.clone(),
                user: record.user.clone(),
            });
        }
        taken.len()
    }

    async fn restore_one(
        self: &Arc<Self>,
        stored: &Stored,
        moved_from: Option<&str>,
    ) -> Result<(), String> {
        let record = &stored.record;
        if self.calls().contains_key(&record.call) {
            return Err("a call with its id exists".into());
        }
        if record.ice.local != self.ice.address() {
            return Err(format!(
                "its ICE address {} is not this relay's ({})",
                record.ice.local,
                self.ice.address()
            ));
        }
        if record.lan.ip() != self.lan_ip || !self.ports.contains(&record.lan.port()) {
            return Err(format!(
                "its LAN address {} is outside calls.lan_address and calls.port_range",
                record.lan
            ));
        }
        let (Some(local_type), Some(remote_type)) = (
            candidate_type(&record.ice.local_type),
            candidate_type(&record.ice.remote_type),
        ) else {
            return Err("its candidate types do not parse".into());
        };
        let pair = SelectedPair {
            local: record.ice.local,
            remote: record.ice.remote,
            local_type,
            remote_type,
        };
        let bridged = match &record.media {
            Some(media) => {
                let (plan, srtp) = media_plan(media)?;
                let indexes: Vec<usize> = record.streams.iter().map(|s| s.index).collect();
                let routes = super::streams::routes_for(&record.app_sdp, &indexes);
                let bridge =
                    Bridge::restored(&plan, &srtp, routes).map_err(|err| err.to_string())?;
                Some((plan, Arc::new(bridge)))
            }
            None => None,
        };
        let sockets = bind_lan_port_again(record.lan).await?;
        let mut streams = Vec::with_capacity(record.streams.len());
        for stream in &record.streams {
            if stream.lan.ip() != self.lan_ip || !self.ports.contains(&stream.lan.port()) {
                return Err(format!(
                    "the LAN address {} of its m-line {} is outside calls.lan_address and calls.port_range",
                    stream.lan,
                    stream.index + 1
                ));
            }
            let sockets = bind_lan_port_again(stream.lan).await?;
            streams.push(LanStream {
                index: stream.index,
                media: stream.media.clone(),
                lan: stream.lan,
                rtp: sockets.rtp,
                rtcp: sockets.rtcp,
            });
        }
        let leg = IceLeg::restored(
            &self.ice,
            self.consent_timeout,
            ConnectedLeg {
                credentials: Credentials {
                    local_ufrag: record.ice.local_ufrag.clone(),
                    local_pwd: record.ice.local_pwd.clone(),
                    remote_ufrag: record.ice.remote_ufrag.clone(),
                    remote_pwd: record.ice.remote_pwd.clone(),
                },
                candidates: record.ice.candidates.clone(),
                controlling: record.ice.controlling,
                priority: record.ice.priority,
                pair,
            },
        );
        let conn = leg.conn().ok_or("its ICE leg has no connection")?;
        let mut call = Call::offered(
            record.call,
            record.tenant.clone(),
            record.user.clone(),
            record.from_app,
            (record.lan, sockets),
            leg,
        );
        call.streams = streams;
        let age = Duration::from_secs(unix_now().saturating_sub(record.created));
        call.created = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        {
            let mut inner = call.inner();
            inner.state = CallState::Connected(pair);
            inner.pbx = Some(record.pbx);
            inner.pbx_rtcp = record.pbx_rtcp;
            inner.pbx_streams = record
                .streams
                .iter()
                .map(|stream| stream.pbx.map(|rtp| (rtp, stream.pbx_rtcp)))
                .collect();
            inner.pbx_sdp = record.pbx_sdp.clone();
            inner.app_sdp = record.app_sdp.clone();
            inner.sent_to_app = record.sent_to_app.clone();
            inner.sent_to_pbx = record.sent_to_pbx.clone();
            inner.app_mids = record.app_mids.clone();
            inner.plan = bridged
                .as_ref()
                .map_or(MediaPlan::PassThrough, |(plan, _)| plan.clone());
            inner.bridge = bridged.as_ref().map(|(_, bridge)| bridge.clone());
            inner.flows.adopt(stored.flows);
            inner.unannounced = [true, true];
            inner.moved_from = moved_from.map(str::to_owned);
        }
        let call = Arc::new(call);
        self.calls().insert(record.call, call.clone());
        // A call taken over keeps the id its relay gave it; this relay numbers its own.
        if record.call & !0xffff_ffff == self.id_base.load(Ordering::Relaxed) {
            self.next.fetch_max(record.call + 1, Ordering::Relaxed);
        }
        match &bridged {
            Some((_, bridge)) => {
                // No handshake reads the legs' DTLS records now: they are dropped.
                let (app_records, _) = crate::media::dtls::record_queue();
                let (pbx_records, _) = crate::media::dtls::record_queue();
                self.carry_bridged_media(&call, bridge, conn, [app_records, pbx_records]);
            }
            None => self.start_userspace_media(&call, conn),
        }
        let calls = self.clone();
        let following = {
            let call = call.clone();
            tokio::spawn(async move { calls.follow(call, pair).await })
        };
        call.inner().tasks.push(following);
        // A flow that was not pinned (media toward the app stopped for consent, the
        // userspace datapath has none) is put in again: the call goes on where it was. A
        // bridged call has none: its media goes toward the app again.
        if bridged.is_some() || stored.flows.iter().any(Option::is_none) {
            self.install(&call, pair);
        }
        let (app_security, pbx_security) = call.inner().plan.names();
        tracing::info!(call = record.call, tenant = %record.tenant, user = %record.user, app = %pair.remote, lan = %record.lan, pbx = %record.pbx, flows = ?stored.flows, app_security, pbx_security, "calls: call restored from the state store");
        Ok(())
    }

    /// A session of `who` has joined: the calls a restart took back that it has not heard
    /// of yet get `call.state restored`.
    pub fn announce_restored(&self, who: &Requester) {
        let calls = self.calls_of(who);
        let side = match who {
            Requester::App { .. } => 0,
            Requester::Controller { .. } => 1,
        };
        for call in calls {
            let (pair, moved_from) = {
                let inner = call.inner();
                if !inner.unannounced[side] {
                    continue;
                }
                (inner.state.pair(), inner.moved_from.clone())
            };
            let Some(pair) = pair else { continue };
            let change = match moved_from {
                Some(from) => StateChange::Moved {
                    remote: pair.remote,
                    remote_type: pair.remote_type,
                    from,
                },
                None => StateChange::Restored {
                    remote: pair.remote,
                    remote_type: pair.remote_type,
                },
            };
            let event = CallEvent::State {
                call: call.id,
                change,
            };
            let delivered = match who {
                Requester::App { .. } => self.notify.to_app(&call.tenant, &call.user, &event) > 0,
                Requester::Controller { .. } => self.notify.to_controller(&call.tenant, &event),
            };
            if delivered {
                call.inner().unannounced[side] = false;
            }
        }
    }

    /// relayd stops with a state store: the recorded calls are left as they are (flows in
    /// the kernel, nobody told) for the next relayd; returns their ids. None: nothing could
    /// be written, so every call ends.
    pub(super) fn keep_for_next_relayd(&self) -> Option<Vec<u64>> {
        self.store.as_ref()?;
        let kept = self.save(true)?;
        self.handed_over.store(true, Ordering::Relaxed);
        Some(kept)
    }
}

/// The store's view of a bridged call's media security.
fn media_record(plan: &MediaPlan, [app_srtp, pbx_srtp]: LegRecords) -> Option<MediaRecord> {
    let MediaPlan::Bridged {
        app,
        pbx,
        app_proto,
        pbx_proto,
    } = plan
    else {
        return None;
    };
    let sdes = |own: &Crypto, peer: &Option<Crypto>| LegSecurity::Sdes {
        own: own.to_string(),
        peer: peer.as_ref().map(Crypto::to_string),
    };
    let app = match app {
        AppLeg::Plain => LegSecurity::Plain,
        AppLeg::Sdes { own, peer } => sdes(own, peer),
        AppLeg::Dtls { setup, peer } => dtls_record(*setup, peer.as_ref()),
    };
    let pbx = match pbx {
        PbxLeg::Plain => LegSecurity::Plain,
        PbxLeg::Sdes { own, peer } => sdes(own, peer),
        PbxLeg::Dtls { setup, peer } => dtls_record(*setup, peer.as_ref()),
    };
    Some(MediaRecord {
        app_proto: app_proto.clone(),
        pbx_proto: pbx_proto.clone(),
        app: LegRecord {
            security: app,
            srtp: app_srtp,
        },
        pbx: LegRecord {
            security: pbx,
            srtp: pbx_srtp,
        },
    })
}

/// A DTLS leg as the store keeps it: the relay's `a=setup`, and the side's fingerprint and
/// the relay's role once known.
fn dtls_record(setup: Setup, peer: Option<&(Fingerprint, Role)>) -> LegSecurity {
    LegSecurity::Dtls {
        setup: setup.as_str().to_owned(),
        fingerprint: peer.map(|(fingerprint, _)| fingerprint.to_string()),
        role: peer.map(|(_, role)| {
            match role {
                Role::Client => "client",
                Role::Server => "server",
            }
            .to_owned()
        }),
    }
}

/// A DTLS leg of `side` from the store; an error names what does not read back.
fn dtls_leg(
    side: &str,
    setup: &str,
    fingerprint: &Option<String>,
    role: &Option<String>,
) -> Result<(Setup, Option<(Fingerprint, Role)>), String> {
    let setup =
        Setup::parse(setup).ok_or_else(|| format!("its a=setup {setup:?} does not parse"))?;
    let peer = match (fingerprint, role.as_deref()) {
        (Some(fingerprint), Some(role)) => {
            let fingerprint = Fingerprint::parse(fingerprint).ok_or_else(|| {
                format!("the {side}'s fingerprint {fingerprint:?} does not parse")
            })?;
            let role = match role {
                "client" => Role::Client,
                "server" => Role::Server,
                other => return Err(format!("its DTLS role {other:?} is unknown")),
            };
            Some((fingerprint, role))
        }
        _ => None,
    };
    Ok((setup, peer))
}

/// A bridged call's media plan and SRTP legs from the store; an error names what does not
/// read back.
fn media_plan(record: &MediaRecord) -> Result<(MediaPlan, LegRecords), String> {
    let crypto = |value: &str| {
        Crypto::parse(value).ok_or_else(|| {
            format!(
                "its SDES key {:?} does not parse",
                value.split(" inline:").next().unwrap_or("")
            )
        })
    };
    let peer_crypto = |value: &Option<String>| value.as_deref().map(crypto).transpose();
    let app = match &record.app.security {
        LegSecurity::Plain => AppLeg::Plain,
        LegSecurity::Sdes { own, peer } => AppLeg::Sdes {
            own: crypto(own)?,
            peer: peer_crypto(peer)?,
        },
        LegSecurity::Dtls {
            setup,
            fingerprint,
            role,
        } => {
            let (setup, peer) = dtls_leg("app", setup, fingerprint, role)?;
            AppLeg::Dtls { setup, peer }
        }
    };
    let pbx = match &record.pbx.security {
        LegSecurity::Plain => PbxLeg::Plain,
        LegSecurity::Sdes { own, peer } => PbxLeg::Sdes {
            own: crypto(own)?,
            peer: peer_crypto(peer)?,
        },
        LegSecurity::Dtls {
            setup,
            fingerprint,
            role,
        } => {
            let (setup, peer) = dtls_leg("PBX", setup, fingerprint, role)?;
            PbxLeg::Dtls { setup, peer }
        }
    };
    let plan = MediaPlan::Bridged {
        app,
        pbx,
        app_proto: record.app_proto.clone(),
        pbx_proto: record.pbx_proto.clone(),
    };
    Ok((plan, [record.app.srtp.clone(), record.pbx.srtp.clone()]))
}

/// The call's LAN ports (RTP and the RTCP port above) bound again, waiting a moment for
/// the adopted flow's socket on them to close.
async fn bind_lan_port_again(lan: SocketAddr) -> Result<LanSockets, String> {
    let rtcp = super::media::rtcp_above(lan);
    let deadline = Instant::now() + LAN_PORT_WAIT;
    loop {
        match (UdpSocket::bind(lan).await, UdpSocket::bind(rtcp).await) {
            (Ok(rtp), Ok(rtcp)) => {
                return Ok(LanSockets {
                    rtp: Arc::new(rtp),
                    rtcp: Arc::new(rtcp),
                });
            }
            (Err(err), _) | (_, Err(err)) if Instant::now() >= deadline => {
                return Err(format!("its LAN port {lan} cannot be bound again: {err}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_types_read_back_as_written() {
        for kind in [
            CandidateType::Host,
            CandidateType::ServerReflexive,
            CandidateType::PeerReflexive,
            CandidateType::Relay,
        ] {
            assert_eq!(candidate_type(&kind.to_string()), Some(kind));
        }
        assert_eq!(candidate_type("bogus"), None);
    }

    fn plans_with_dtls_pbx() -> MediaPlan {
        MediaPlan::Bridged {
            app: AppLeg::Plain,
            pbx: PbxLeg::Dtls {
                setup: Setup::Active,
                peer: Some((Fingerprint::sha256(b"pbx"), Role::Client)),
            },
            app_proto: "RTP/AVP".into(),
            pbx_proto: "UDP/TLS/RTP/SAVP".into(),
        }
    }

    /// Each kind of leg reads back as written, a DTLS PBX's fingerprint and role too.
    #[test]
    fn media_plans_read_back_as_written() {
        let fingerprint = |seed: &[u8]| Fingerprint::sha256(seed);
        let plans = [
            MediaPlan::Bridged {
                app: AppLeg::Dtls {
                    setup: Setup::Passive,
                    peer: Some((fingerprint(b"app"), Role::Server)),
                },
                pbx: PbxLeg::Dtls {
                    setup: Setup::Active,
                    peer: Some((fingerprint(b"pbx"), Role::Client)),
                },
                app_proto: "UDP/TLS/RTP/SAVPF".into(),
                pbx_proto: "UDP/TLS/RTP/SAVP".into(),
            },
            MediaPlan::Bridged {
                app: AppLeg::Sdes {
                    own: Crypto::generate(1, crate::media::Suite::AesCm128HmacSha1_80),
                    peer: Some(Crypto::generate(
                        1,
                        crate::media::Suite::AesCm128HmacSha1_80,
                    )),
                },
                pbx: PbxLeg::Plain,
                app_proto: "RTP/SAVPF".into(),
                pbx_proto: "RTP/AVP".into(),
            },
        ];
        for plan in plans {
            let record = media_record(&plan, [None, None]).unwrap();
            assert_eq!(media_plan(&record).unwrap().0, plan);
        }
        // A PBX leg offered DTLS and not answered yet reads back as such.
        let offered = MediaPlan::Bridged {
            app: AppLeg::Plain,
            pbx: PbxLeg::Dtls {
                setup: Setup::ActPass,
                peer: None,
            },
            app_proto: "RTP/AVP".into(),
            pbx_proto: "UDP/TLS/RTP/SAVP".into(),
        };
        let record = media_record(&offered, [None, None]).unwrap();
        assert_eq!(media_plan(&record).unwrap().0, offered);
        // A role the relay does not know is named.
        let mut record = media_record(&plans_with_dtls_pbx(), [None, None]).unwrap();
        record.pbx.security = LegSecurity::Dtls {
            setup: "active".into(),
            fingerprint: Some(fingerprint(b"pbx").to_string()),
            role: Some("both".into()),
        };
        assert!(
            media_plan(&record)
                .unwrap_err()
                .contains("DTLS role \"both\"")
        );
    }
}

/// What changed in the calls since a generation: the records of the calls changed since
/// (connected ones), the changed calls that have no record (not connected, or no longer),
/// every call's id, and whether every changed call's record was at hand (false: one was
/// busy changing; ask again).
#[derive(Debug)]
pub struct ChangedRecords {
    pub records: Vec<CallRecord>,
    pub unrecorded: Vec<u64>,
    pub calls: Vec<u64>,
    pub complete: bool,
}
