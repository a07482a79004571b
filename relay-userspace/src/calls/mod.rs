//! Calls anchored in the relay (docs/calls-design.md): the PBX side (a controller) calls a
//! user's app, or the app calls the PBX, through signalling; the relay answers each side for
//! the other, with its ICE leg toward the app and a LAN port toward the PBX. Once ICE has
//! selected a pair, the media is two flows in the flow table (XDP).
//!
//! Here: the requests (create, answer, update, hangup) and the calls' bookkeeping;
//! `connect` runs a call from ICE to its end, `media` puts its media in the flow table and
//! carries what the kernel passes up, `flows` keeps its flow ids and counts.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Map, Value};
use tokio::{net::UdpSocket, task::JoinHandle};

mod connect;
mod flows;
mod media;

use flows::CallFlows;
pub use flows::{Directions, Traffic};
use media::{LanSockets, remove_flows_of_earlier_calls};

use crate::{
    config::CallsSettings,
    datapath::table::FlowTable,
    ice::leg::{IceLeg, IcePort, LocalIce, RemoteCandidates, SelectedPair},
    session::sdp::{self, IceOffer},
    signalling::{
        hub::{Hub, Identity},
        protocol::{ErrorCode, Outbound, Role},
    },
    time::monotonic_ns,
    turn::driver::{LocalChannel, TurnService},
};

/// One call as `relayctl calls list` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CallInfo {
    pub call: u64,
    pub tenant: String,
    pub user: String,
    /// offered, connecting, connected.
    pub state: String,
    /// The app's address as the relay sees it, and the relay's ICE address, once connected.
    pub app: Option<SocketAddr>,
    pub ice: Option<SocketAddr>,
    pub lan: SocketAddr,
    /// None until the PBX has answered an app's call.
    pub pbx: Option<SocketAddr>,
    pub flows: Vec<u32>,
    /// The app's candidate type in the selected pair (host, srflx, prflx, relay).
    pub app_candidate: Option<String>,
    /// Seconds since the call was created.
    pub since_secs: u64,
    /// Both directions, kernel and slow path, flows replaced mid-call included.
    pub packets: u64,
    pub bytes: u64,
    pub to_pbx: Traffic,
    pub to_app: Traffic,
}

/// A refused call request: the error code and message the requester gets.
pub type CallError = (ErrorCode, String);

pub struct Calls {
    ice: IcePort,
    lan_ip: IpAddr,
    ports: RangeInclusive<u16>,
    ice_timeout: Duration,
    consent_timeout: Duration,
    media_timeout: Duration,
    /// Between `call.stats` events; None: none.
    stats_interval: Option<Duration>,
    table: Arc<FlowTable>,
    hub: Arc<Hub>,
    /// The TURN server in the same relay, for TURN-only apps (see `install`).
    turn: Option<Arc<TurnService>>,
    calls: Mutex<HashMap<u64, Arc<Call>>>,
    next: AtomicU64,
    /// For the metrics: calls ended by reason, and the setup times of connected calls.
    tally: Mutex<Tally>,
}

/// What the metrics count of calls that came and went.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub ended: std::collections::BTreeMap<&'static str, u64>,
    /// `call.create` to ICE connected with the flows in, summed, and how many.
    pub setup_seconds: f64,
    pub connected: u64,
}

struct Call {
    id: u64,
    tenant: String,
    user: String,
    /// Who called: the PBX (the app answers; the relay's ICE is controlling) or the app
    /// (the controller answers for the PBX; the relay's ICE is controlled).
    from_app: bool,
    /// Where the PBX wants its RTP (known from its offer, or from its answer to an app's
    /// call), and the relay's LAN address for this call.
    pbx: Mutex<Option<SocketAddr>>,
    pbx_rtcp: Mutex<Option<SocketAddr>>,
    lan: SocketAddr,
    /// The last SDP of each side as they sent it: what the relay answers an update from
    /// the other side with (`call.update`).
    pbx_sdp: Mutex<String>,
    app_sdp: Mutex<String>,
    /// An app's call: its ICE credentials, until the controller answers.
    app_ice: Mutex<Option<(String, String)>>,
    lan_socket: Arc<UdpSocket>,
    rtcp_socket: Arc<UdpSocket>,
    /// The PBX's offer, kept until the app answers.
    leg: tokio::sync::Mutex<IceLeg>,
    /// The leg's agent for the app's trickled candidates (the leg is locked while it
    /// connects).
    remote_candidates: RemoteCandidates,
    /// Where the call is, and the selected pair once connected.
    state: Mutex<(&'static str, Option<SelectedPair>)>,
    /// Installed flow ids, tasks carrying media in userspace, the call's watcher.
    flows: Mutex<CallFlows>,
    /// A TURN-only app: the channel of its allocation on this relay that its media comes
    /// in on, which the call's flows carry.
    local_channel: Mutex<Option<LocalChannel>>,
    created: std::time::Instant,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Calls {
    pub async fn new(
        settings: &CallsSettings,
        table: Arc<FlowTable>,
        hub: Arc<Hub>,
        turn: Option<Arc<TurnService>>,
    ) -> anyhow::Result<Calls> {
        let ice_address: SocketAddr = settings.ice_listen.parse()?;
        let lan_ip: IpAddr = settings.lan_address.parse()?;
        let ports = settings
            .ports()
            .ok_or_else(|| anyhow::anyhow!("calls.port_range"))?;
        let removed = remove_flows_of_earlier_calls(&table, ice_address, lan_ip, &ports);
        // The removed flows' slow-path sockets close as their tasks end: a moment.
        let mut attempts = if removed { 40 } else { 1 };
        let socket = loop {
            attempts -= 1;
            match std::net::UdpSocket::bind(ice_address) {
                Ok(socket) => break socket,
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && attempts > 0 => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => anyhow::bail!("calls.ice_listen: {ice_address}: cannot listen: {err}"),
            }
        };
        let ice = IcePort::new(socket)?;
        tracing::info!(ice = %ice_address, lan = %settings.lan_address, ports = %settings.port_range, "calls: ready");
        Ok(Calls {
            ice,
            lan_ip,
            ports,
            ice_timeout: Duration::from_secs(settings.ice_timeout_secs),
            consent_timeout: Duration::from_secs(settings.consent_timeout_secs),
            media_timeout: Duration::from_secs(settings.media_timeout_secs),
            stats_interval: (settings.stats_interval_secs > 0)
                .then(|| Duration::from_secs(settings.stats_interval_secs)),
            table,
            hub,
            turn,
            calls: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            tally: Mutex::new(Tally::default()),
        })
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Call>>> {
        self.calls.lock().expect("calls poisoned")
    }

    /// Ended calls by reason and setup times, for the metrics.
    pub fn tally(&self) -> Tally {
        self.tally.lock().expect("calls tally").clone()
    }

    /// Calls in progress.
    pub fn len(&self) -> usize {
        self.calls().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `call.create` from a controller: the PBX's offer for `user`'s app.
    pub async fn create(
        &self,
        controller: &Identity,
        user: &str,
        pbx_offer: &str,
    ) -> Result<Map<String, Value>, CallError> {
        if controller.role != Role::Controller {
            return Err((ErrorCode::Forbidden, "only controllers create calls".into()));
        }
        let pbx_endpoint = sdp::audio(pbx_offer).map_err(bad_sdp)?;
        let pbx = pbx_endpoint.rtp;
        if !self.hub.is_online(&controller.tenant, user) {
            return Err((
                ErrorCode::Offline,
                format!("user {user} has no session connected"),
            ));
        }
        let (lan_sockets, lan) = self.bind_lan_port().await?;
        let (leg, local) = IceLeg::new(&self.ice, self.consent_timeout)
            .await
            .map_err(|err| (ErrorCode::Busy, format!("ICE: {err:#}")))?;
        let app_offer = self.toward_app(pbx_offer, local)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let call = Call::offered(
            id,
            controller.tenant.clone(),
            user.to_owned(),
            false,
            (lan, lan_sockets),
            leg,
        );
        call.set_pbx(&pbx_endpoint);
        *call.pbx_sdp.lock().expect("call sdp") = pbx_offer.to_owned();
        let call = Arc::new(call);
        self.calls().insert(id, call.clone());
        let delivered = self.hub.to_user(
            &call.tenant,
            user,
            &event("call.incoming", id, [("sdp", app_offer.into())]),
        );
        tracing::info!(call = id, tenant = %call.tenant, user, %pbx, %lan, delivered, "calls: call offered to the app");
        Ok(fields([("call", id.into())]))
    }

    /// `call.create` from an app: it calls out with its SDP offer (with ICE). The
    /// controller gets a `call.incoming` with the offer for the PBX and answers it.
    pub async fn create_from_app(
        &self,
        app: &Identity,
        app_offer: &str,
    ) -> Result<Map<String, Value>, CallError> {
        let user = app.user.clone().unwrap_or_default();
        let endpoint = sdp::audio(app_offer).map_err(bad_sdp)?;
        let (Some(ufrag), Some(pwd)) = (endpoint.ice_ufrag, endpoint.ice_pwd) else {
            return Err((
                ErrorCode::BadRequest,
                "sdp: the offer has no ICE credentials (a=ice-ufrag, a=ice-pwd)".into(),
            ));
        };
        let (lan_sockets, lan) = self.bind_lan_port().await?;
        // RTCP on its own port toward the PBX: what every PBX trunk takes.
        let pbx_offer = sdp::toward_pbx(app_offer, lan, false).map_err(bad_sdp)?;
        let (leg, _) = IceLeg::new(&self.ice, self.consent_timeout)
            .await
            .map_err(|err| (ErrorCode::Busy, format!("ICE: {err:#}")))?;
        for candidate in &endpoint.candidates {
            if let Err(err) = leg.add_remote_candidate(candidate) {
                tracing::debug!(%err, "calls: an app candidate skipped");
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let incoming = event(
            "call.incoming",
            id,
            [("user", user.clone().into()), ("sdp", pbx_offer.into())],
        );
        if !self.hub.to_controller(&app.tenant, &incoming) {
            return Err((
                ErrorCode::Offline,
                format!("the controller of tenant {} is not connected", app.tenant),
            ));
        }
        let call = Call::offered(
            id,
            app.tenant.clone(),
            user.clone(),
            true,
            (lan, lan_sockets),
            leg,
        );
        *call.app_sdp.lock().expect("call sdp") = app_offer.to_owned();
        *call.app_ice.lock().expect("call ice") = Some((ufrag, pwd));
        let call = Arc::new(call);
        self.calls().insert(id, call);
        tracing::info!(call = id, tenant = %app.tenant, user, %lan, "calls: the app calls out; offered to the controller");
        Ok(fields([("call", id.into())]))
    }

    /// `call.answer`: from the app to a PBX's call, or from the controller to an app's.
    pub async fn answer(
        self: &Arc<Self>,
        who: &Identity,
        id: u64,
        sdp_answer: &str,
    ) -> Result<Map<String, Value>, CallError> {
        let call = self.owned(who, id)?;
        match (call.from_app, who.role) {
            (false, Role::Client) => self.app_answers(call, sdp_answer).await,
            (true, Role::Controller) => self.controller_answers(call, sdp_answer).await,
            _ => Err((
                ErrorCode::Forbidden,
                format!("call: {id}: the other side answers this call"),
            )),
        }
    }

    /// The PBX's answer to an app's call: the app gets its answer, and ICE runs with the
    /// relay controlled (the app offered).
    async fn controller_answers(
        self: &Arc<Self>,
        call: Arc<Call>,
        pbx_answer: &str,
    ) -> Result<Map<String, Value>, CallError> {
        let pbx_endpoint = sdp::audio(pbx_answer).map_err(bad_sdp)?;
        let Some((ufrag, pwd)) = call.app_ice.lock().expect("call ice").take() else {
            return Err((ErrorCode::BadRequest, "the call is already answered".into()));
        };
        call.set_pbx(&pbx_endpoint);
        *call.pbx_sdp.lock().expect("call sdp") = pbx_answer.to_owned();
        let local = {
            let leg = call.leg.lock().await;
            leg.local()
        };
        let app_answer = self.toward_app(pbx_answer, local)?;
        self.hub.to_user(
            &call.tenant,
            &call.user,
            &event("call.answered", call.id, [("sdp", app_answer.into())]),
        );
        *call.state.lock().expect("call state") = ("connecting", None);
        let id = call.id;
        let calls = self.clone();
        let connecting = tokio::spawn(async move { calls.connect(call, false, ufrag, pwd).await });
        if let Some(call) = self.calls().get(&id) {
            call.tasks.lock().expect("call tasks").push(connecting);
        }
        Ok(Map::new())
    }

    /// The app's answer to a PBX's call: the PBX gets its answer, and ICE runs.
    async fn app_answers(
        self: &Arc<Self>,
        call: Arc<Call>,
        app_answer: &str,
    ) -> Result<Map<String, Value>, CallError> {
        let id = call.id;
        let endpoint = sdp::audio(app_answer).map_err(bad_sdp)?;
        let (Some(ufrag), Some(pwd)) = (endpoint.ice_ufrag, endpoint.ice_pwd) else {
            return Err((
                ErrorCode::BadRequest,
                "sdp: the answer has no ICE credentials (a=ice-ufrag, a=ice-pwd)".into(),
            ));
        };
        let pbx_answer =
            sdp::toward_pbx(app_answer, call.lan, call.pbx_rtcp().is_none()).map_err(bad_sdp)?;
        *call.app_sdp.lock().expect("call sdp") = app_answer.to_owned();
        {
            let leg = call.leg.lock().await;
            for candidate in &endpoint.candidates {
                if let Err(err) = leg.add_remote_candidate(candidate) {
                    tracing::debug!(call = id, %err, "calls: an app candidate skipped");
                }
            }
        }
        self.hub.to_controller(
            &call.tenant,
            &event("call.answered", id, [("sdp", pbx_answer.into())]),
        );
        *call.state.lock().expect("call state") = ("connecting", None);
        let calls = self.clone();
        let connecting = tokio::spawn(async move { calls.connect(call, true, ufrag, pwd).await });
        if let Some(call) = self.calls().get(&id) {
            call.tasks.lock().expect("call tasks").push(connecting);
        }
        Ok(Map::new())
    }

    /// `call.update`: a new offer from one side during the call, answered by the relay
    /// itself (the other side's media does not change). From the app: an ICE restart (new
    /// credentials: it moved to another network), answered with the relay's new ICE
    /// credentials; the new selected pair replaces the flows. From the controller: the PBX's
    /// RTP moved (a re-INVITE), answered with the relay's LAN address; the flows follow.
    pub async fn update(
        &self,
        who: &Identity,
        id: u64,
        offer: &str,
    ) -> Result<Map<String, Value>, CallError> {
        let call = self.owned(who, id)?;
        let pair = {
            let (state, pair) = *call.state.lock().expect("call state");
            match pair {
                Some(pair) if state == "connected" => pair,
                _ => {
                    return Err((
                        ErrorCode::BadRequest,
                        format!("call: {id}: not connected yet ({state}); update once connected"),
                    ));
                }
            }
        };
        let endpoint = sdp::audio(offer).map_err(bad_sdp)?;
        let answer = match who.role {
            Role::Client => {
                let (Some(ufrag), Some(pwd)) = (endpoint.ice_ufrag, endpoint.ice_pwd) else {
                    return Err((
                        ErrorCode::BadRequest,
                        "sdp: the offer has no ICE credentials (a=ice-ufrag, a=ice-pwd)".into(),
                    ));
                };
                let local = {
                    let mut leg = call.leg.lock().await;
                    leg.restart(&self.ice, ufrag, pwd, &endpoint.candidates)
                        .await
                        .map_err(|err| (ErrorCode::Busy, format!("ICE: {err:#}")))?
                };
                let pbx_sdp = call.pbx_sdp.lock().expect("call sdp").clone();
                let answer = self.toward_app(&pbx_sdp, local)?;
                *call.app_sdp.lock().expect("call sdp") = offer.to_owned();
                tracing::info!(call = id, from = %pair.remote, "calls: the app restarts ICE");
                self.hub.to_controller(
                    &call.tenant,
                    &event("call.state", id, [("state", "ice-restart".into())]),
                );
                answer
            }
            Role::Controller => {
                let app_sdp = call.app_sdp.lock().expect("call sdp").clone();
                let answer =
                    sdp::toward_pbx(&app_sdp, call.lan, endpoint.rtcp_mux).map_err(bad_sdp)?;
                let old = (*call.pbx.lock().expect("call pbx"), call.pbx_rtcp());
                call.set_pbx(&endpoint);
                *call.pbx_sdp.lock().expect("call sdp") = offer.to_owned();
                if old != (Some(endpoint.rtp), call.pbx_rtcp()) {
                    tracing::info!(call = id, to = %endpoint.rtp, "calls: the PBX's media moved; flows replaced");
                    self.install(&call, pair);
                }
                answer
            }
        };
        Ok(fields([("sdp", answer.into())]))
    }

    /// `call.candidate` from the app: a trickled candidate for the call's ICE leg (RFC 8838),
    /// taken at any time, also while ICE is checking.
    pub fn candidate(
        &self,
        who: &Identity,
        id: u64,
        candidate: &str,
    ) -> Result<Map<String, Value>, CallError> {
        let call = self.owned(who, id)?;
        if who.role != Role::Client {
            return Err((
                ErrorCode::Forbidden,
                "ICE candidates are the app's: the PBX leg has no ICE".into(),
            ));
        }
        call.remote_candidates
            .add(candidate)
            .map_err(|err| (ErrorCode::BadRequest, format!("{err:#}")))?;
        tracing::debug!(call = id, candidate, "calls: the app trickled a candidate");
        Ok(Map::new())
    }

    /// `call.hangup` from either side.
    pub async fn hangup(&self, who: &Identity, id: u64) -> Result<Map<String, Value>, CallError> {
        let call = self.owned(who, id)?;
        let (to_app, to_controller) = match who.role {
            Role::Controller => (true, false),
            Role::Client => (false, true),
        };
        self.end(&call, "hangup", to_app, to_controller).await;
        Ok(Map::new())
    }

    /// The call `id`, if `who` may act on it: its tenant's controller, or its user.
    fn owned(&self, who: &Identity, id: u64) -> Result<Arc<Call>, CallError> {
        let call = self
            .calls()
            .get(&id)
            .cloned()
            .ok_or((ErrorCode::BadRequest, format!("call: {id}: no such call")))?;
        if !call.belongs_to(who) {
            return Err((ErrorCode::BadRequest, format!("call: {id}: no such call")));
        }
        Ok(call)
    }

    /// The calls in progress, for `relayctl calls list`.
    pub fn list(&self) -> Vec<CallInfo> {
        let calls: Vec<Arc<Call>> = self.calls().values().cloned().collect();
        let now = monotonic_ns();
        let mut list: Vec<CallInfo> = calls
            .iter()
            .map(|call| {
                let (state, pair) = *call.state.lock().expect("call state");
                let (flows, traffic) = {
                    let flows = call.flows.lock().expect("call flows");
                    (flows.ids(), flows.traffic(&self.table, now))
                };
                CallInfo {
                    call: call.id,
                    tenant: call.tenant.clone(),
                    user: call.user.clone(),
                    state: state.to_owned(),
                    app: pair.map(|p| p.remote),
                    ice: pair.map(|p| p.local),
                    lan: call.lan,
                    pbx: *call.pbx.lock().expect("call pbx"),
                    flows,
                    app_candidate: pair.map(|p| p.remote_type.to_string()),
                    since_secs: call.created.elapsed().as_secs(),
                    packets: traffic.total().packets,
                    bytes: traffic.total().bytes,
                    to_pbx: traffic.to_pbx,
                    to_app: traffic.to_app,
                }
            })
            .collect();
        list.sort_by_key(|call| call.call);
        list
    }

    /// The calls `who` may act on, for its `welcome`: `call`, `user`, `state`, who
    /// `called` (`app` or `pbx`).
    pub fn resumable(&self, who: &Identity) -> Vec<Value> {
        let mut calls: Vec<Arc<Call>> = self
            .calls()
            .values()
            .filter(|call| call.belongs_to(who))
            .cloned()
            .collect();
        calls.sort_by_key(|call| call.id);
        calls
            .iter()
            .map(|call| {
                serde_json::json!({
                    "call": call.id,
                    "user": call.user,
                    "state": call.state.lock().expect("call state").0,
                    "called": if call.from_app { "app" } else { "pbx" },
                })
            })
            .collect()
    }

    pub fn exists(&self, id: u64) -> bool {
        self.calls().contains_key(&id)
    }

    /// relayd is stopping: every call ends (`relay-stopped`), both sides are told, and its
    /// flows go. A restarted relayd does not know the calls (their ICE agents are gone),
    /// so media left in the kernel would reach nobody who could end it.
    pub async fn stop(&self) {
        let calls: Vec<Arc<Call>> = self.calls().values().cloned().collect();
        if !calls.is_empty() {
            tracing::info!(
                calls = calls.len(),
                "calls: relayd is stopping; the calls in progress end"
            );
        }
        for call in calls {
            self.end(&call, "relay-stopped", true, true).await;
        }
    }

    /// Ends a call from the operator's side (`relayctl calls hangup`); false if unknown.
    pub async fn hangup_by_operator(&self, id: u64) -> bool {
        let Some(call) = self.calls().get(&id).cloned() else {
            return false;
        };
        self.end(&call, "operator", true, true).await;
        true
    }

    async fn end(&self, call: &Call, reason: &'static str, tell_app: bool, tell_controller: bool) {
        if self.calls().remove(&call.id).is_none() {
            return;
        }
        *self
            .tally
            .lock()
            .expect("calls tally")
            .ended
            .entry(reason)
            .or_default() += 1;
        call.flows
            .lock()
            .expect("call flows")
            .remove_all(&self.table, monotonic_ns());
        if let (Some(turn), Some(channel)) = (
            &self.turn,
            call.local_channel.lock().expect("call channel").take(),
        ) {
            turn.return_channel(&channel);
        }
        let tasks: Vec<JoinHandle<()>> = call.tasks.lock().expect("call tasks").drain(..).collect();
        for task in tasks {
            // Not the task running this (connect ends itself by returning).
            if task.id() != tokio::task::try_id().unwrap_or(task.id()) {
                task.abort();
            }
        }
        if let Ok(leg) = call.leg.try_lock() {
            leg.close().await;
        }
        let ended = event("call.ended", call.id, [("reason", reason.into())]);
        if tell_app {
            self.hub.to_user(&call.tenant, &call.user, &ended);
        }
        if tell_controller {
            self.hub.to_controller(&call.tenant, &ended);
        }
        tracing::info!(
            call = call.id,
            reason,
            "calls: call ended; its flows are removed"
        );
    }

    /// The SDP the app gets: the PBX's, anchored at the ICE port, with the leg's ICE.
    fn toward_app(&self, pbx_sdp: &str, local: LocalIce) -> Result<String, CallError> {
        sdp::toward_app(
            pbx_sdp,
            self.ice.address(),
            &IceOffer {
                ufrag: local.ufrag,
                pwd: local.pwd,
                candidates: local.candidates,
            },
        )
        .map_err(bad_sdp)
    }
}

/// An SDP the relay cannot use: the requester's error.
fn bad_sdp(err: sdp::SdpError) -> CallError {
    (ErrorCode::BadRequest, format!("sdp: {err}"))
}

impl Call {
    /// A call just offered: its LAN ports and ICE leg, nothing connected yet. What each
    /// side has said so far is the creator's to fill in.
    fn offered(
        id: u64,
        tenant: String,
        user: String,
        from_app: bool,
        (lan, sockets): (SocketAddr, LanSockets),
        leg: IceLeg,
    ) -> Call {
        Call {
            id,
            tenant,
            user,
            from_app,
            pbx: Mutex::new(None),
            pbx_rtcp: Mutex::new(None),
            lan,
            pbx_sdp: Mutex::new(String::new()),
            app_sdp: Mutex::new(String::new()),
            app_ice: Mutex::new(None),
            lan_socket: sockets.rtp,
            rtcp_socket: sockets.rtcp,
            remote_candidates: leg.remote_candidates(),
            leg: tokio::sync::Mutex::new(leg),
            state: Mutex::new(("offered", None)),
            flows: Mutex::new(CallFlows::default()),
            local_channel: Mutex::new(None),
            created: std::time::Instant::now(),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Where the PBX wants RTCP when not with its RTP (no rtcp-mux); None: with it.
    fn pbx_rtcp(&self) -> Option<SocketAddr> {
        *self.pbx_rtcp.lock().expect("call pbx")
    }

    /// Takes the PBX's media addresses from its SDP.
    fn set_pbx(&self, endpoint: &sdp::AudioEndpoint) {
        *self.pbx.lock().expect("call pbx") = Some(endpoint.rtp);
        *self.pbx_rtcp.lock().expect("call pbx") = (!endpoint.rtcp_mux).then_some(endpoint.rtcp);
    }

    /// Whether `who` may act on the call: its tenant's controller, or its user.
    fn belongs_to(&self, who: &Identity) -> bool {
        self.tenant == who.tenant
            && match who.role {
                Role::Controller => true,
                Role::Client => who.user.as_deref() == Some(self.user.as_str()),
            }
    }

    /// The PBX's RTP address (set before ICE runs, in both directions; `call.update` from
    /// the controller may move it).
    fn pbx(&self) -> SocketAddr {
        self.pbx
            .lock()
            .expect("call pbx")
            .unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0))
    }
}

fn fields<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

fn event<const N: usize>(name: &str, call: u64, pairs: [(&str, Value); N]) -> Outbound {
    Outbound::Event {
        event: name.to_owned(),
        call,
        fields: fields(pairs),
    }
}
