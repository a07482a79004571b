//! Calls anchored in the relay (issue 4; docs/calls-design.md): the PBX side (a controller)
//! offers a call to a user's app through signalling; the relay answers the PBX for the app
//! and offers itself to the app, with its ICE leg. Once ICE has selected a pair, the media
//! is two flows in the flow table (XDP); until then, and for what the kernel passes up,
//! two tasks carry it between the ICE connection and the call's LAN socket.

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
use webrtc_ice::{candidate::CandidateType, state::ConnectionState};

mod flows;

use flows::CallFlows;
pub use flows::{Directions, Traffic};

use crate::{
    config::CallsSettings,
    datapath::{FlowSpec, flow::ChannelOp, table::FlowTable},
    ice::leg::{IceConn, IceLeg, IcePort, LocalIce, SelectedPair},
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
        let call = Arc::new(Call {
            id,
            tenant: controller.tenant.clone(),
            user: user.to_owned(),
            from_app: false,
            pbx: Mutex::new(Some(pbx)),
            pbx_rtcp: Mutex::new((!pbx_endpoint.rtcp_mux).then_some(pbx_endpoint.rtcp)),
            lan,
            pbx_sdp: Mutex::new(pbx_offer.to_owned()),
            app_sdp: Mutex::new(String::new()),
            app_ice: Mutex::new(None),
            lan_socket: lan_sockets.rtp,
            rtcp_socket: lan_sockets.rtcp,
            leg: tokio::sync::Mutex::new(leg),
            state: Mutex::new(("offered", None)),
            flows: Mutex::new(CallFlows::default()),
            local_channel: Mutex::new(None),
            created: std::time::Instant::now(),
            tasks: Mutex::new(Vec::new()),
        });
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
        let call = Arc::new(Call {
            id,
            tenant: app.tenant.clone(),
            user: user.clone(),
            from_app: true,
            pbx: Mutex::new(None),
            pbx_rtcp: Mutex::new(None),
            lan,
            pbx_sdp: Mutex::new(String::new()),
            app_sdp: Mutex::new(app_offer.to_owned()),
            app_ice: Mutex::new(Some((ufrag, pwd))),
            lan_socket: lan_sockets.rtp,
            rtcp_socket: lan_sockets.rtcp,
            leg: tokio::sync::Mutex::new(leg),
            state: Mutex::new(("offered", None)),
            flows: Mutex::new(CallFlows::default()),
            local_channel: Mutex::new(None),
            created: std::time::Instant::now(),
            tasks: Mutex::new(Vec::new()),
        });
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

    /// Runs ICE, then puts the media on the selected pair and follows its changes.
    async fn connect(
        self: Arc<Self>,
        call: Arc<Call>,
        controlling: bool,
        ufrag: String,
        pwd: String,
    ) {
        self.hub.to_controller(
            &call.tenant,
            &event("call.state", call.id, [("state", "checking".into())]),
        );
        let connected = {
            let mut leg = call.leg.lock().await;
            tokio::time::timeout(self.ice_timeout, leg.connect(controlling, ufrag, pwd)).await
        };
        let pair = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(err)) => {
                tracing::info!(call = call.id, %err, "calls: ICE failed");
                return self.end(&call, "ice-failed", true, true).await;
            }
            Err(_) => {
                tracing::info!(call = call.id, "calls: ICE did not connect in time");
                return self.end(&call, "ice-timeout", true, true).await;
            }
        };
        let (conn, mut pairs, mut states) = {
            let leg = call.leg.lock().await;
            (leg.conn(), leg.pairs(), leg.states())
        };
        let Some(conn) = conn else {
            return self.end(&call, "ice-failed", true, true).await;
        };
        self.start_userspace_media(&call, conn);
        self.install(&call, pair);
        {
            let mut tally = self.tally.lock().expect("calls tally");
            tally.setup_seconds += call.created.elapsed().as_secs_f64();
            tally.connected += 1;
        }
        let state = event(
            "call.state",
            call.id,
            [
                ("state", "connected".into()),
                ("local", pair.local.to_string().into()),
                ("remote", pair.remote.to_string().into()),
                ("local_type", pair.local_type.to_string().into()),
                ("remote_type", pair.remote_type.to_string().into()),
            ],
        );
        self.hub.to_controller(&call.tenant, &state);
        self.hub.to_user(&call.tenant, &call.user, &state);
        let mut current = pair;
        let mut consent = true;
        let mut media_check = tokio::time::interval(Duration::from_secs(1));
        let mut stats = self
            .stats_interval
            .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
        loop {
            tokio::select! {
                _ = async { stats.as_mut().expect("guarded").tick().await }, if stats.is_some() => {
                    self.hub.to_controller(&call.tenant, &self.stats_event(&call));
                }
                _ = media_check.tick() => {
                    if consent {
                        self.follow_local_channel(&call, current);
                    }
                    if self.media_idle(&call) > self.media_timeout {
                        tracing::info!(call = call.id, timeout = ?self.media_timeout, "calls: no media in either direction; the call ends");
                        return self.end(&call, "media-timeout", true, true).await;
                    }
                }
                changed = pairs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let Some(pair) = *pairs.borrow_and_update() else { continue };
                    if pair != current {
                        tracing::info!(call = call.id, from = %current.remote, to = %pair.remote, "calls: ICE switched pairs; flows replaced");
                        self.install(&call, pair);
                        current = pair;
                        let changed = event("call.state", call.id, [
                            ("state", "route-changed".into()),
                            ("remote", pair.remote.to_string().into()),
                            ("remote_type", pair.remote_type.to_string().into()),
                        ]);
                        self.hub.to_controller(&call.tenant, &changed);
                        self.hub.to_user(&call.tenant, &call.user, &changed);
                    }
                }
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = *states.borrow_and_update();
                    match state {
                        // RFC 7675: no answers to the consent checks. Stop sending toward
                        // the app at once; end the call when consent has expired.
                        ConnectionState::Disconnected if consent => {
                            consent = false;
                            tracing::info!(call = call.id, "calls: no consent from the app; media toward it stopped");
                            self.stop_toward_app(&call);
                            self.hub.to_controller(&call.tenant, &event("call.state", call.id, [("state", "consent-lost".into())]));
                        }
                        ConnectionState::Connected if !consent => {
                            consent = true;
                            tracing::info!(call = call.id, "calls: the app answers consent checks again; media toward it resumes");
                            self.install(&call, current);
                        }
                        ConnectionState::Failed | ConnectionState::Closed => {
                            tracing::info!(call = call.id, "calls: ICE consent expired; the call ends");
                            return self.end(&call, "consent-lost", true, true).await;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// A TURN-only app's channel can be bound after ICE selected its relayed address (the
    /// app's TURN client binds it once data flows), and can go with its allocation: the
    /// flows follow, checked every second.
    fn follow_local_channel(&self, call: &Call, pair: SelectedPair) {
        let Some(turn) = &self.turn else { return };
        if pair.remote_type != CandidateType::Relay {
            return;
        }
        let lent = *call.local_channel.lock().expect("call channel");
        let changed = match lent {
            None => turn.find_channel(pair.remote, pair.local).is_some(),
            Some(channel) => !turn.is_bound(&channel),
        };
        if changed {
            tracing::info!(call = call.id, app = %pair.remote, "calls: the app's TURN channel changed; flows replaced");
            self.install(call, pair);
        }
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

    /// `call.stats`: the call's traffic each way from the kernel counters, and how long
    /// since the last packet.
    fn stats_event(&self, call: &Call) -> Outbound {
        let now = monotonic_ns();
        let traffic = call
            .flows
            .lock()
            .expect("call flows")
            .traffic(&self.table, now);
        event(
            "call.stats",
            call.id,
            [
                ("duration_secs", call.created.elapsed().as_secs().into()),
                (
                    "to_pbx",
                    serde_json::to_value(traffic.to_pbx).unwrap_or_default(),
                ),
                (
                    "to_app",
                    serde_json::to_value(traffic.to_app).unwrap_or_default(),
                ),
                ("idle_ms", (self.media_idle(call).as_millis() as u64).into()),
            ],
        )
    }

    /// How long since media last went through the call's flows (the kernel counters' last
    /// seen, the later of the two); zero before they exist.
    fn media_idle(&self, call: &Call) -> Duration {
        let now = monotonic_ns();
        let last = call
            .flows
            .lock()
            .expect("call flows")
            .last_seen_ns(&self.table, now);
        match last {
            Some(last) => Duration::from_nanos(now.saturating_sub(last)),
            None => Duration::ZERO,
        }
    }

    /// Removes the flow toward the app (consent lost), keeping the one toward the PBX.
    fn stop_toward_app(&self, call: &Call) {
        call.flows
            .lock()
            .expect("call flows")
            .remove_to_app(&self.table, monotonic_ns());
    }

    /// The two flows of the selected pair, replacing the call's previous ones.
    ///
    /// A TURN-only app's pair has its relayed address on this relay's TURN server as the
    /// remote: its media reaches the ICE port from the relay socket, a hairpin through the
    /// stack the kernel path never sees. The flows then start at the app's TURN channel
    /// instead: ChannelData from the app is stripped and sent on to the PBX, and the PBX's
    /// RTP gets the header and goes to the app from the TURN port, one flow pair in XDP.
    fn install(&self, call: &Call, pair: SelectedPair) {
        *call.state.lock().expect("call state") = ("connected", Some(pair));
        let mut flows = call.flows.lock().expect("call flows");
        flows.remove_all(&self.table, monotonic_ns());
        let previous = call.local_channel.lock().expect("call channel").take();
        let local = match (&self.turn, pair.remote_type) {
            (Some(turn), CandidateType::Relay) => turn.lend_channel(pair.remote, pair.local),
            _ => None,
        };
        if let (Some(turn), Some(previous)) = (&self.turn, previous)
            && Some(previous) != local
        {
            turn.return_channel(&previous);
        }
        *call.local_channel.lock().expect("call channel") = local;
        let to_pbx = match local {
            Some(channel) => FlowSpec {
                src: channel.client,
                dst: channel.server,
                new_src: call.lan,
                new_dst: call.pbx(),
                channel: Some(ChannelOp::Strip(channel.number)),
                rtcp_to_userspace: call.pbx_rtcp().is_some(),
            },
            None => FlowSpec {
                src: pair.remote,
                dst: pair.local,
                new_src: call.lan,
                new_dst: call.pbx(),
                channel: None,
                rtcp_to_userspace: call.pbx_rtcp().is_some(),
            },
        };
        // The ICE and LAN sockets are the call's own: the kernel-only kind of flow.
        match self
            .table
            .offload(&[to_pbx, to_pbx.reverse()], monotonic_ns())
        {
            Ok(ids) => {
                tracing::info!(call = call.id, app = %pair.remote, pbx = %call.pbx(), ?ids, "calls: media flows installed");
                flows.install(&self.table, ids[0], ids[1], monotonic_ns());
            }
            Err(err) => {
                tracing::warn!(call = call.id, %err, "calls: media stays in userspace");
            }
        }
    }

    /// Media between the ICE connection and the LAN sockets, for what the kernel does not
    /// forward (the first packets, the userspace datapath, RTCP for a PBX without
    /// rtcp-mux: the app multiplexes it, the PBX wants it from and on the ports above RTP).
    fn start_userspace_media(&self, call: &Arc<Call>, conn: IceConn) {
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
        call.tasks
            .lock()
            .expect("call tasks")
            .extend([to_pbx, to_app, rtcp_to_app]);
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

    /// A free LAN port: the first even one in the range that binds (RTP takes even ports,
    /// RTCP the odd one above).
    async fn bind_lan_port(&self) -> Result<(LanSockets, SocketAddr), CallError> {
        for port in self.ports.clone().filter(|port| port.is_multiple_of(2)) {
            let address = SocketAddr::new(self.lan_ip, port);
            let rtcp = SocketAddr::new(self.lan_ip, port.saturating_add(1));
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
        Err((
            ErrorCode::Busy,
            "no free LAN port left in calls.port_range".into(),
        ))
    }
}

/// Flows of calls a relayd left in the pinned table without ending them (killed, not
/// stopped): the table adopted them and bound their relay addresses, which are the ICE port
/// and the calls' LAN ports this relayd needs. Nobody could end those calls now; removed.
fn remove_flows_of_earlier_calls(
    table: &FlowTable,
    ice: SocketAddr,
    lan_ip: IpAddr,
    ports: &RangeInclusive<u16>,
) -> bool {
    let ours = |address: SocketAddr| {
        address == ice || (address.ip() == lan_ip && ports.contains(&address.port()))
    };
    let now = monotonic_ns();
    let stale: Vec<u32> = table
        .list(now)
        .into_iter()
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

/// A call's LAN side: its RTP port (even) and the RTCP port above it, for PBXs that keep
/// RTCP on its own port.
struct LanSockets {
    rtp: Arc<UdpSocket>,
    rtcp: Arc<UdpSocket>,
}

/// An SDP the relay cannot use: the requester's error.
fn bad_sdp(err: sdp::SdpError) -> CallError {
    (ErrorCode::BadRequest, format!("sdp: {err}"))
}

/// RTCP among RTP on one port (RFC 5761 section 4): version 2, packet type 192..=223.
fn is_rtcp(packet: &[u8]) -> bool {
    packet.len() >= 2 && packet[0] >> 6 == 2 && (192..=223).contains(&packet[1])
}

impl Call {
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
