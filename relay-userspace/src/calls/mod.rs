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
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::UdpSocket, task::JoinHandle};

mod bridge;
pub mod config;
mod connect;
pub mod events;
mod flows;
mod media;
mod restore;
pub mod security;
mod steer;
mod streams;
#[cfg(test)]
mod tests;

pub use events::{
    CallError, CallEvent, CallState, EndReason, Notify, Requester, StateChange, Woken,
};
use flows::CallFlows;
pub use flows::{Directions, Traffic};
use media::{LanSockets, remove_flows_of_earlier_calls};
pub use restore::ChangedRecords;
use security::MediaPlan;
use streams::{LanStream, MOST_STREAMS, PbxStream, pbx_streams};

use crate::{
    calls::config::CallsConfig,
    calls::config::{AppMedia, PbxMedia},
    datapath::table::FlowTable,
    ice::leg::{IceLeg, IcePort, LocalIce, RemoteCandidates},
    media::{MediaTotals, dtls::DtlsIdentity},
    session::sdp::{self, Secure},
    state::StateStore,
    time::monotonic_ns,
    turn::driver::{LocalChannel, TurnService},
};

/// One call as `relayctl calls list` shows it.
#[derive(Debug, Clone)]
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
    /// Each leg's media security: `pass-through` (the kernel forwards what the sides
    /// negotiated with each other), or what the relay terminates (`dtls-srtp`,
    /// `sdes-srtp`, `rtp`).
    pub app_security: &'static str,
    pub pbx_security: &'static str,
    /// What the relay carried and refused itself, for a bridged call.
    pub bridged: Option<BridgeInfo>,
    /// The streams anchored besides the audio (a bridged call's video).
    pub streams: Vec<StreamInfo>,
}

/// One of a call's streams besides its audio.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// Its m-line (1 is the first) and media (`video`, `audio`).
    pub line: usize,
    pub media: String,
    pub lan: SocketAddr,
    /// None: the PBX refused it, or has not answered yet.
    pub pbx: Option<SocketAddr>,
}

/// A bridged call's media as the relay carried it.
#[derive(Debug, Clone)]
pub struct BridgeInfo {
    /// connecting, connected, failed (toward a DTLS-SRTP app); `-` for SDES or RTP.
    pub dtls: &'static str,
    /// The same toward a DTLS-SRTP PBX.
    pub pbx_dtls: &'static str,
    /// The SRTP suite toward the app, once keyed.
    pub suite: Option<&'static str>,
    pub totals: MediaTotals,
    /// The flows that steer its media to the AF_XDP workers; none: the call's sockets
    /// carry it.
    pub steered: Vec<u32>,
}

/// A call a (re)connected session may act on, for its `welcome`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resumable {
    pub call: u64,
    pub user: String,
    pub state: &'static str,
    /// Who called: `app` or `pbx`.
    pub called: &'static str,
}

pub struct Calls {
    ice: IcePort,
    lan_ip: IpAddr,
    ports: RangeInclusive<u16>,
    ice_timeout: Duration,
    /// What a DTLS-SRTP app has for its handshake once ICE has connected.
    dtls_timeout: Duration,
    consent_timeout: Duration,
    media_timeout: Duration,
    /// Between `call.stats` events; None: none.
    stats_interval: Option<Duration>,
    table: Arc<FlowTable>,
    /// Where events go: the signalling sessions of both sides.
    notify: Arc<dyn Notify>,
    /// The TURN server in the same relay, for TURN-only apps (see `install`).
    turn: Option<Arc<TurnService>>,
    calls: Mutex<HashMap<u64, Arc<Call>>>,
    next: AtomicU64,
    /// The first id of this relay's calls (0 alone; a cluster node's own base).
    id_base: AtomicU64,
    /// For the metrics: calls ended by reason, and the setup times of connected calls.
    tally: Mutex<Tally>,
    /// The certificate of every DTLS-SRTP leg toward an app.
    identity: Arc<DtlsIdentity>,
    app_media: AppMedia,
    pbx_media: PbxMedia,
    /// Where connected calls are kept across a restart (`restore`), and whether they
    /// changed since the last write.
    store: Option<Arc<StateStore>>,
    dirty: AtomicBool,
    /// Counts the changes to the calls' records (the cluster's copy in Redis follows it).
    generation: AtomicU64,
    /// relayd is stopping and the store holds the calls kept for the next relayd: the
    /// calls leaving or ending now must not overwrite it.
    handed_over: AtomicBool,
    /// The calls the store kept, until `restore` takes them back.
    stored: Mutex<Vec<restore::Stored>>,
}

/// What the metrics count of calls that came and went.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub ended: std::collections::BTreeMap<EndReason, u64>,
    /// `call.create` to ICE connected with the flows in, summed, and how many.
    pub setup_seconds: f64,
    pub connected: u64,
    /// Setups by duration: how many took at most [`SETUP_BUCKETS`]`[i]` seconds (and more
    /// than the bucket before); the last counts those slower than every bound.
    pub setup_buckets: [u64; SETUP_BUCKETS.len() + 1],
    /// What the relay carried and dropped of bridged calls that ended.
    pub bridged: MediaTotals,
    /// What the shared ICE port dropped before any call saw it, by reason (in the order
    /// of `PortDiscard::ALL`).
    pub ice_discards: [u64; crate::ice::consent::PortDiscard::ALL.len()],
}

/// Upper bounds of the call setup time histogram, in seconds: ICE on a direct path takes
/// tens of milliseconds, through a TURN relay up to about 2 s (its pairs wait 2 s).
pub const SETUP_BUCKETS: [f64; 8] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Tally {
    fn connected_after(&mut self, seconds: f64) {
        self.setup_seconds += seconds;
        self.connected += 1;
        let bucket = SETUP_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(SETUP_BUCKETS.len());
        self.setup_buckets[bucket] += 1;
    }
}

struct Call {
    id: u64,
    tenant: String,
    user: String,
    /// Who called: the PBX (the app answers; the relay's ICE is controlling) or the app
    /// (the controller answers for the PBX; the relay's ICE is controlled).
    from_app: bool,
    /// The relay's LAN address for this call.
    lan: SocketAddr,
    lan_socket: Arc<UdpSocket>,
    rtcp_socket: Arc<UdpSocket>,
    /// The streams anchored besides the audio (a bridged call's video), each on LAN ports
    /// of its own.
    streams: Vec<LanStream>,
    /// The PBX's offer, kept until the app answers.
    leg: tokio::sync::Mutex<IceLeg>,
    /// The leg's agent for the app's trickled candidates (the leg is locked while it
    /// connects).
    remote_candidates: RemoteCandidates,
    created: std::time::Instant,
    /// Who calls, as the controller named them (a PBX's call).
    caller: Option<String>,
    /// Everything that changes during the call.
    inner: Mutex<CallInner>,
    /// The calls' generation at the call's last change to its record.
    changed_at: AtomicU64,
}

/// What changes during a call, under one lock (never held across an `.await`).
#[derive(Default)]
struct CallInner {
    state: CallState,
    /// Where the PBX wants its RTP (known from its offer, or from its answer to an app's
    /// call), and its RTCP when not with the RTP (no rtcp-mux).
    pbx: Option<SocketAddr>,
    pbx_rtcp: Option<SocketAddr>,
    /// The same for each of the call's other streams (`Call::streams`).
    pbx_streams: Vec<PbxStream>,
    /// The last SDP of each side as they sent it: what the relay answers an update from
    /// the other side with (`call.update`).
    pbx_sdp: String,
    app_sdp: String,
    /// An app's call: its ICE credentials, until the controller answers.
    app_ice: Option<(String, String)>,
    /// Each leg's media security.
    plan: MediaPlan,
    /// The SDP the relay last sent each side, which their answers are checked against,
    /// and the app's m-lines' mids (BUNDLE).
    sent_to_app: String,
    sent_to_pbx: String,
    app_mids: Vec<String>,
    /// A bridged call's media, once ICE has connected.
    bridge: Option<Arc<bridge::Bridge>>,
    /// Installed flow ids, and what replaced ones carried.
    flows: CallFlows,
    /// A bridged call's flows toward the AF_XDP workers.
    steered: steer::SteeredFlows,
    /// A TURN-only app: the channel of its allocation on this relay that its media comes
    /// in on, which the call's flows carry.
    local_channel: Option<LocalChannel>,
    /// Tasks carrying media in userspace, and the call's watcher.
    tasks: Vec<JoinHandle<()>>,
    /// A call a restarted relayd took back: whether the app's session (0) and the
    /// controller's (1) still have to hear `call.state restored`.
    unannounced: [bool; 2],
    /// A call taken over from this relay of the cluster, which is down: what the
    /// announcement says (`moved` rather than `restored`).
    moved_from: Option<String>,
    /// Offered while no app of the user was connected: their devices were woken (a push),
    /// and each app session that joins while it is offered gets `call.incoming`.
    woken: bool,
}

impl CallInner {
    /// Takes the PBX's media addresses from its SDP.
    fn set_pbx(&mut self, endpoint: &sdp::AudioEndpoint) {
        self.pbx = Some(endpoint.rtp);
        self.pbx_rtcp = (!endpoint.rtcp_mux).then_some(endpoint.rtcp);
    }

    /// The PBX's RTP address (set before ICE runs, in both directions; `call.update` from
    /// the controller may move it).
    fn pbx(&self) -> SocketAddr {
        self.pbx
            .unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0))
    }
}

impl Calls {
    pub async fn new(
        settings: &CallsConfig,
        table: Arc<FlowTable>,
        notify: Arc<dyn Notify>,
        turn: Option<Arc<TurnService>>,
        store: Option<Arc<StateStore>>,
    ) -> anyhow::Result<Calls> {
        let ice_address: SocketAddr = settings.ice_listen.parse()?;
        let lan_ip: IpAddr = settings.lan_address.parse()?;
        let ports = settings
            .ports()
            .ok_or_else(|| anyhow::anyhow!("calls.port_range"))?;
        let records = match &store {
            Some(store) => store.load_calls().unwrap_or_else(|err| {
                tracing::error!(%err, "calls: cannot read the state store; the calls it kept end");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let stored = restore::take_back_flows(&table, records);
        let kept: std::collections::HashSet<u32> =
            stored.iter().flat_map(|call| call.flow_ids()).collect();
        let removed = remove_flows_of_earlier_calls(&table, ice_address, lan_ip, &ports, &kept);
        // The removed and taken-back flows' slow-path sockets close as their tasks end: a
        // moment.
        let mut attempts = if removed || !kept.is_empty() { 40 } else { 1 };
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
        // One socket carries every call's ICE, and a bridged call's media from the app.
        crate::datapath::userspace::enlarge_socket_buffers(&socket);
        let ice = IcePort::new(socket)?;
        let identity = dtls_identity(store.as_deref())?;
        tracing::info!(fingerprint = %identity.fingerprint(), kept = store.is_some(), "calls: the DTLS certificate toward apps");
        tracing::info!(ice = %ice_address, lan = %settings.lan_address, ports = %settings.port_range, "calls: ready");
        Ok(Calls {
            ice,
            lan_ip,
            ports,
            ice_timeout: Duration::from_secs(settings.ice_timeout_secs),
            dtls_timeout: Duration::from_secs(settings.dtls_timeout_secs),
            consent_timeout: Duration::from_secs(settings.consent_timeout_secs),
            media_timeout: Duration::from_secs(settings.media_timeout_secs),
            stats_interval: (settings.stats_interval_secs > 0)
                .then(|| Duration::from_secs(settings.stats_interval_secs)),
            table,
            notify,
            turn,
            calls: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            id_base: AtomicU64::new(0),
            tally: Mutex::new(Tally::default()),
            identity: Arc::new(identity),
            app_media: settings.app_media,
            pbx_media: settings.pbx_media,
            store,
            dirty: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            handed_over: AtomicBool::new(false),
            stored: Mutex::new(stored),
        })
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Call>>> {
        self.calls.lock().expect("calls poisoned")
    }

    /// The calls `who` may act on, taken out of the lock.
    fn calls_of(&self, who: &Requester) -> Vec<Arc<Call>> {
        self.calls()
            .values()
            .filter(|call| call.belongs_to(who))
            .cloned()
            .collect()
    }

    /// Ended calls by reason and setup times, for the metrics; `bridged` also counts the
    /// calls in progress.
    pub fn tally(&self) -> Tally {
        let mut tally = self.tally.lock().expect("calls tally").clone();
        let bridges: Vec<Arc<bridge::Bridge>> = self
            .calls()
            .values()
            .filter_map(|call| call.inner().bridge.clone())
            .collect();
        for bridge in bridges {
            tally.bridged.add(&bridge.counters.read());
        }
        tally.ice_discards = self.ice.discards().map(|(_, count)| count);
        tally
    }

    /// The ICE port every call's app leg shares.
    pub fn ice_address(&self) -> SocketAddr {
        self.ice.address()
    }

    /// What the relay offers each side (`calls.app_media`, `calls.pbx_media`), and the
    /// fingerprint of its DTLS certificate toward apps.
    pub fn media_policy(&self) -> (&'static str, &'static str, String) {
        (
            self.app_media.name(),
            self.pbx_media.name(),
            self.identity.fingerprint().to_string(),
        )
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
        self: &Arc<Self>,
        controller: &Requester,
        user: &str,
        pbx_offer: &str,
        caller: Option<&str>,
    ) -> Result<u64, CallError> {
        self.create_call(controller, user, pbx_offer, caller, false)
            .await
    }

    /// [`Calls::create`] for an app connected to another relay of the cluster, which
    /// placed the call here: its events reach the app through the cluster.
    pub async fn create_placed(
        self: &Arc<Self>,
        controller: &Requester,
        user: &str,
        pbx_offer: &str,
        caller: Option<&str>,
    ) -> Result<u64, CallError> {
        self.create_call(controller, user, pbx_offer, caller, true)
            .await
    }

    /// Numbers the calls from `base` on: a cluster node's own ids.
    pub fn number_from(&self, base: u64) {
        self.id_base.store(base, Ordering::Relaxed);
        self.next.fetch_max(base.max(1), Ordering::Relaxed);
    }

    async fn create_call(
        self: &Arc<Self>,
        controller: &Requester,
        user: &str,
        pbx_offer: &str,
        caller: Option<&str>,
        app_elsewhere: bool,
    ) -> Result<u64, CallError> {
        let Requester::Controller { tenant } = controller else {
            return Err(CallError::Forbidden("only controllers create calls".into()));
        };
        if let Some(caller) = caller
            && (caller.is_empty()
                || caller.chars().count() > 128
                || caller.chars().any(char::is_control))
        {
            return Err(CallError::BadRequest(
                "caller: 1 to 128 characters, no control characters".into(),
            ));
        }
        let pbx_endpoint = sdp::audio(pbx_offer)?;
        let pbx = pbx_endpoint.rtp;
        let plan = MediaPlan::for_pbx_offer(&pbx_endpoint, self.app_media)?;
        let online = app_elsewhere || self.notify.is_online(tenant, user);
        let ring_time = self.notify.ring_time();
        if !online && ring_time.is_none() {
            return Err(CallError::Offline(format!(
                "user {user} has no session connected"
            )));
        }
        let (lan_sockets, lan) = self.bind_lan_port().await?;
        let others = self.other_streams(&plan, pbx_offer)?;
        let streams = self.bind_streams(&others).await?;
        let (leg, local) = IceLeg::new(&self.ice, self.consent_timeout)
            .await
            .map_err(ice_busy)?;
        let mids = sdp::mids(pbx_offer)?;
        let app_offer = self.toward_app(
            pbx_offer,
            local,
            plan.toward_app(self.identity.fingerprint(), &mids),
            &streams,
        )?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut call = Call::offered(
            id,
            tenant.clone(),
            user.to_owned(),
            false,
            (lan, lan_sockets),
            leg,
        );
        call.caller = caller.map(str::to_owned);
        call.streams = streams;
        {
            let mut inner = call.inner();
            inner.set_pbx(&pbx_endpoint);
            inner.pbx_streams = pbx_streams(&call.streams, &others);
            inner.pbx_sdp = pbx_offer.to_owned();
            inner.sent_to_app = app_offer.clone();
            inner.plan = plan;
        }
        let call = Arc::new(call);
        self.calls().insert(id, call.clone());
        if let (false, Some(ring_time)) = (online, ring_time) {
            return self.wake(call, ring_time).await;
        }
        let delivered = self.notify.to_app(
            &call.tenant,
            user,
            &CallEvent::Incoming {
                call: id,
                user: None,
                caller: call.caller.clone(),
                sdp: app_offer,
            },
        );
        tracing::info!(call = id, tenant = %call.tenant, user, %pbx, %lan, delivered, "calls: call offered to the app");
        Ok(id)
    }

    /// A call offered while no app of its user is connected: their devices are woken (a
    /// push each), the controller hears `call.state ringing`, and the call waits
    /// `ring_time` for an app to connect and answer, then ends `no-answer`. With no device
    /// registered, the call goes and the user is offline.
    async fn wake(
        self: &Arc<Self>,
        call: Arc<Call>,
        ring_time: Duration,
    ) -> Result<u64, CallError> {
        call.inner().woken = true;
        let woken = self
            .notify
            .wake(&call.tenant, &call.user, call.id, call.caller.as_deref());
        let Some(Woken {
            devices,
            undelivered,
        }) = woken
        else {
            self.calls().remove(&call.id);
            call.leg.lock().await.close().await;
            return Err(CallError::Offline(format!(
                "user {} has no session connected and no device registered for pushes",
                call.user
            )));
        };
        self.notify.to_controller(
            &call.tenant,
            &CallEvent::State {
                call: call.id,
                change: StateChange::Ringing { devices },
            },
        );
        let ringing = {
            let (calls, call) = (Arc::downgrade(self), call.clone());
            tokio::spawn(async move {
                let reason = tokio::select! {
                    _ = tokio::time::sleep(ring_time) => EndReason::NoAnswer,
                    Ok(why) = undelivered => {
                        tracing::warn!(call = call.id, user = %call.user, %why, "calls: no push reached the user's devices; the call ends offline");
                        EndReason::Offline
                    }
                };
                let Some(calls) = calls.upgrade() else { return };
                if call.inner().state == CallState::Offered {
                    if reason == EndReason::NoAnswer {
                        tracing::info!(
                            call = call.id,
                            ?ring_time,
                            "calls: no app answered the pushed call in time"
                        );
                    }
                    calls.end(&call, reason, true, true).await;
                }
            })
        };
        call.inner().tasks.push(ringing);
        tracing::info!(call = call.id, tenant = %call.tenant, user = %call.user, devices, ?ring_time, "calls: no app of the user connected; their devices were woken");
        Ok(call.id)
    }

    /// A session of `who` has joined: the `call.incoming` of each call its devices were
    /// woken for that is still offered, for that session (every device that wakes gets it;
    /// the first to answer takes the call).
    pub fn woken_offers(&self, who: &Requester) -> Vec<CallEvent> {
        let Requester::App { .. } = who else {
            return Vec::new();
        };
        let calls = self.calls_of(who);
        calls
            .into_iter()
            .filter_map(|call| {
                let inner = call.inner();
                (inner.woken && inner.state == CallState::Offered).then(|| CallEvent::Incoming {
                    call: call.id,
                    user: None,
                    caller: call.caller.clone(),
                    sdp: inner.sent_to_app.clone(),
                })
            })
            .collect()
    }

    /// `call.create` from an app: it calls out with its SDP offer (with ICE). The
    /// controller gets a `call.incoming` with the offer for the PBX and answers it.
    pub async fn create_from_app(
        &self,
        app: &Requester,
        app_offer: &str,
    ) -> Result<u64, CallError> {
        let Requester::App { tenant, user } = app else {
            return Err(CallError::Forbidden(
                "call.create: a controller names the user to call".into(),
            ));
        };
        let endpoint = sdp::audio(app_offer)?;
        let (Some(ufrag), Some(pwd)) = (endpoint.ice_ufrag.clone(), endpoint.ice_pwd.clone())
        else {
            return Err(no_ice_credentials("offer"));
        };
        let plan = MediaPlan::for_app_offer(&endpoint, self.pbx_media)?;
        let mids = sdp::mids(app_offer)?;
        let (lan_sockets, lan) = self.bind_lan_port().await?;
        let others = self.other_streams(&plan, app_offer)?;
        let streams = self.bind_streams(&others).await?;
        // RTCP on its own port toward the PBX: what every PBX trunk takes; multiplexed
        // toward a DTLS PBX, whose one handshake then keys both (see MediaPlan::dtls_pbx).
        let pbx_offer = sdp::toward_pbx(
            app_offer,
            lan,
            plan.dtls_pbx(),
            plan.toward_pbx(self.identity.fingerprint()),
            &lan_streams(&streams),
        )?;
        let (leg, _) = IceLeg::new(&self.ice, self.consent_timeout)
            .await
            .map_err(ice_busy)?;
        for candidate in &endpoint.candidates {
            if let Err(err) = leg.add_remote_candidate(candidate) {
                tracing::debug!(%err, "calls: an app candidate skipped");
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let incoming = CallEvent::Incoming {
            call: id,
            user: Some(user.clone()),
            caller: None,
            sdp: pbx_offer.clone(),
        };
        if !self.notify.to_controller(tenant, &incoming) {
            return Err(CallError::Offline(format!(
                "the controller of tenant {tenant} is not connected"
            )));
        }
        let mut call = Call::offered(
            id,
            tenant.clone(),
            user.clone(),
            true,
            (lan, lan_sockets),
            leg,
        );
        call.streams = streams;
        {
            let mut inner = call.inner();
            inner.pbx_streams = vec![None; call.streams.len()];
            inner.app_sdp = app_offer.to_owned();
            inner.app_ice = Some((ufrag, pwd));
            inner.sent_to_pbx = pbx_offer;
            inner.app_mids = mids;
            inner.plan = plan;
        }
        let call = Arc::new(call);
        self.calls().insert(id, call);
        tracing::info!(call = id, %tenant, user, %lan, "calls: the app calls out; offered to the controller");
        Ok(id)
    }

    /// `call.answer`: from the app to a PBX's call, or from the controller to an app's.
    pub async fn answer(
        self: &Arc<Self>,
        who: &Requester,
        id: u64,
        sdp_answer: &str,
    ) -> Result<(), CallError> {
        let call = self.owned(who, id)?;
        match (call.from_app, who) {
            (false, Requester::App { .. }) => self.app_answers(call, sdp_answer).await,
            (true, Requester::Controller { .. }) => self.controller_answers(call, sdp_answer).await,
            _ => Err(CallError::Forbidden(format!(
                "call: {id}: the other side answers this call"
            ))),
        }
    }

    /// The PBX's answer to an app's call: the app gets its answer, and ICE runs with the
    /// relay controlled (the app offered).
    async fn controller_answers(
        self: &Arc<Self>,
        call: Arc<Call>,
        pbx_answer: &str,
    ) -> Result<(), CallError> {
        let pbx_endpoint = sdp::audio(pbx_answer)?;
        let (ufrag, pwd, plan, mids) = {
            let mut inner = call.inner();
            if inner.app_ice.is_none() {
                return Err(CallError::BadRequest("the call is already answered".into()));
            }
            sdp::check_answer(&sdp::audio(&inner.sent_to_pbx)?, &pbx_endpoint)?;
            let mut plan = inner.plan.clone();
            plan.pbx_answered(&pbx_endpoint)?;
            let (ufrag, pwd) = inner.app_ice.take().expect("checked above");
            inner.set_pbx(&pbx_endpoint);
            inner.pbx_streams = pbx_streams(&call.streams, &sdp::other_streams(pbx_answer)?);
            inner.pbx_sdp = pbx_answer.to_owned();
            inner.plan = plan.clone();
            (ufrag, pwd, plan, inner.app_mids.clone())
        };
        let local = {
            let leg = call.leg.lock().await;
            leg.local()
        };
        let app_answer = self.toward_app(
            pbx_answer,
            local,
            plan.toward_app(self.identity.fingerprint(), &mids),
            &call.streams,
        )?;
        self.notify.to_app(
            &call.tenant,
            &call.user,
            &CallEvent::Answered {
                call: call.id,
                sdp: app_answer,
            },
        );
        call.inner().state = CallState::Connecting;
        let id = call.id;
        let calls = self.clone();
        let connecting = tokio::spawn(async move { calls.connect(call, false, ufrag, pwd).await });
        if let Some(call) = self.calls().get(&id) {
            call.inner().tasks.push(connecting);
        }
        Ok(())
    }

    /// The app's answer to a PBX's call: the PBX gets its answer, and ICE runs.
    async fn app_answers(
        self: &Arc<Self>,
        call: Arc<Call>,
        app_answer: &str,
    ) -> Result<(), CallError> {
        let id = call.id;
        let endpoint = sdp::audio(app_answer)?;
        let (Some(ufrag), Some(pwd)) = (endpoint.ice_ufrag.clone(), endpoint.ice_pwd.clone())
        else {
            return Err(no_ice_credentials("answer"));
        };
        let pbx_answer = {
            let mut inner = call.inner();
            if inner.state != CallState::Offered {
                return Err(CallError::BadRequest("the call is already answered".into()));
            }
            sdp::check_answer(&sdp::audio(&inner.sent_to_app)?, &endpoint)?;
            let mut plan = inner.plan.clone();
            plan.app_answered(&endpoint)?;
            let answer = sdp::toward_pbx(
                app_answer,
                call.lan,
                inner.pbx_rtcp.is_none(),
                plan.toward_pbx(self.identity.fingerprint()),
                &lan_streams(&call.streams),
            )?;
            // A stream the app refused is refused toward the PBX too: nothing to carry.
            let accepted = sdp::other_streams(app_answer)?;
            for (stream, pbx) in call.streams.iter().zip(inner.pbx_streams.iter_mut()) {
                if !accepted.iter().any(|e| e.line == stream.index + 1) {
                    *pbx = None;
                }
            }
            inner.plan = plan;
            inner.sent_to_pbx = answer.clone();
            inner.app_sdp = app_answer.to_owned();
            inner.state = CallState::Connecting;
            answer
        };
        {
            let leg = call.leg.lock().await;
            for candidate in &endpoint.candidates {
                if let Err(err) = leg.add_remote_candidate(candidate) {
                    tracing::debug!(call = id, %err, "calls: an app candidate skipped");
                }
            }
        }
        self.notify.to_controller(
            &call.tenant,
            &CallEvent::Answered {
                call: id,
                sdp: pbx_answer,
            },
        );
        let calls = self.clone();
        let connecting = tokio::spawn(async move { calls.connect(call, true, ufrag, pwd).await });
        if let Some(call) = self.calls().get(&id) {
            call.inner().tasks.push(connecting);
        }
        Ok(())
    }

    /// `call.update`: a new offer from one side during the call, answered by the relay
    /// itself (the other side's media does not change). From the app: an ICE restart (new
    /// credentials: it moved to another network), answered with the relay's new ICE
    /// credentials; the new selected pair replaces the flows. From the controller: the PBX's
    /// RTP moved (a re-INVITE), answered with the relay's LAN address; the flows follow.
    pub async fn update(&self, who: &Requester, id: u64, offer: &str) -> Result<String, CallError> {
        let call = self.owned(who, id)?;
        let pair = {
            let state = call.inner().state;
            state.pair().ok_or_else(|| {
                CallError::BadRequest(format!(
                    "call: {id}: not connected yet ({}); update once connected",
                    state.name()
                ))
            })?
        };
        let endpoint = sdp::audio(offer)?;
        let answer = match who {
            Requester::App { .. } => {
                let (Some(ufrag), Some(pwd)) =
                    (endpoint.ice_ufrag.clone(), endpoint.ice_pwd.clone())
                else {
                    return Err(no_ice_credentials("offer"));
                };
                let local = {
                    let mut leg = call.leg.lock().await;
                    leg.restart(&self.ice, ufrag, pwd, &endpoint.candidates)
                        .await
                        .map_err(ice_busy)?
                };
                let (pbx_sdp, plan) = {
                    let inner = call.inner();
                    (inner.pbx_sdp.clone(), inner.plan.clone())
                };
                let mids = sdp::mids(offer)?;
                let answer = self.toward_app(
                    &pbx_sdp,
                    local,
                    plan.toward_app(self.identity.fingerprint(), &mids),
                    &call.streams,
                )?;
                call.inner().app_sdp = offer.to_owned();
                self.changed(&call);
                tracing::info!(call = id, from = %pair.remote, "calls: the app restarts ICE");
                self.notify.to_controller(
                    &call.tenant,
                    &CallEvent::State {
                        call: id,
                        change: StateChange::IceRestart,
                    },
                );
                answer
            }
            Requester::Controller { .. } => {
                let moved = {
                    let mut inner = call.inner();
                    let answer = sdp::toward_pbx(
                        &inner.app_sdp,
                        call.lan,
                        endpoint.rtcp_mux,
                        inner.plan.toward_pbx(self.identity.fingerprint()),
                        &lan_streams(&call.streams),
                    )?;
                    let streams = pbx_streams(&call.streams, &sdp::other_streams(offer)?);
                    let old = (inner.pbx, inner.pbx_rtcp, inner.pbx_streams.clone());
                    inner.set_pbx(&endpoint);
                    inner.pbx_streams = streams;
                    inner.pbx_sdp = offer.to_owned();
                    (
                        answer,
                        old != (inner.pbx, inner.pbx_rtcp, inner.pbx_streams.clone()),
                    )
                };
                let (answer, moved) = moved;
                self.changed(&call);
                if moved {
                    tracing::info!(call = id, to = %endpoint.rtp, "calls: the PBX's media moved; flows replaced");
                    self.install(&call, pair);
                }
                answer
            }
        };
        Ok(answer)
    }

    /// `call.candidate` from the app: a trickled candidate for the call's ICE leg (RFC 8838),
    /// taken at any time, also while ICE is checking.
    pub fn candidate(&self, who: &Requester, id: u64, candidate: &str) -> Result<(), CallError> {
        let call = self.owned(who, id)?;
        if !matches!(who, Requester::App { .. }) {
            return Err(CallError::Forbidden(
                "ICE candidates are the app's: the PBX leg has no ICE".into(),
            ));
        }
        call.remote_candidates
            .add(candidate)
            .map_err(|err| CallError::BadRequest(format!("{err:#}")))?;
        tracing::debug!(call = id, candidate, "calls: the app trickled a candidate");
        Ok(())
    }

    /// `call.hangup` from either side.
    pub async fn hangup(&self, who: &Requester, id: u64) -> Result<(), CallError> {
        let call = self.owned(who, id)?;
        let (to_app, to_controller) = match who {
            Requester::Controller { .. } => (true, false),
            Requester::App { .. } => (false, true),
        };
        self.end(&call, EndReason::Hangup, to_app, to_controller)
            .await;
        Ok(())
    }

    /// The call `id`, if `who` may act on it: its tenant's controller, or its user. Another
    /// tenant's call is "no such call", as if it did not exist.
    fn owned(&self, who: &Requester, id: u64) -> Result<Arc<Call>, CallError> {
        self.calls()
            .get(&id)
            .filter(|call| call.belongs_to(who))
            .cloned()
            .ok_or(CallError::NoSuchCall(id))
    }

    /// The calls in progress, for `relayctl calls list`.
    pub fn list(&self) -> Vec<CallInfo> {
        let calls: Vec<Arc<Call>> = self.calls().values().cloned().collect();
        let now = monotonic_ns();
        let mut list: Vec<CallInfo> = calls
            .iter()
            .map(|call| {
                let traffic = self.traffic(call, now);
                let inner = call.inner();
                let pair = inner.state.pair();
                let flows = inner.flows.ids();
                let (app_security, pbx_security) = inner.plan.names();
                let bridged = inner.bridge.as_ref().map(|bridge| BridgeInfo {
                    steered: inner.steered.ids(),
                    ..bridge.info()
                });
                let streams = call
                    .streams
                    .iter()
                    .zip(&inner.pbx_streams)
                    .map(|(stream, pbx)| StreamInfo {
                        line: stream.index + 1,
                        media: stream.media.clone(),
                        lan: stream.lan,
                        pbx: pbx.map(|(rtp, _)| rtp),
                    })
                    .collect();
                CallInfo {
                    call: call.id,
                    tenant: call.tenant.clone(),
                    user: call.user.clone(),
                    state: inner.state.name().to_owned(),
                    app: pair.map(|p| p.remote),
                    ice: pair.map(|p| p.local),
                    lan: call.lan,
                    pbx: inner.pbx,
                    flows,
                    app_candidate: pair.map(|p| p.remote_type.to_string()),
                    since_secs: call.created.elapsed().as_secs(),
                    packets: traffic.total().packets,
                    bytes: traffic.total().bytes,
                    to_pbx: traffic.to_pbx,
                    to_app: traffic.to_app,
                    app_security,
                    pbx_security,
                    bridged,
                    streams,
                }
            })
            .collect();
        list.sort_by_key(|call| call.call);
        list
    }

    /// The calls `who` may act on, for its `welcome`.
    pub fn resumable(&self, who: &Requester) -> Vec<Resumable> {
        let mut calls = self.calls_of(who);
        calls.sort_by_key(|call| call.id);
        calls
            .iter()
            .map(|call| Resumable {
                call: call.id,
                user: call.user.clone(),
                state: call.inner().state.name(),
                called: if call.from_app { "app" } else { "pbx" },
            })
            .collect()
    }

    pub fn exists(&self, id: u64) -> bool {
        self.calls().contains_key(&id)
    }

    /// relayd is stopping. With a state store, the calls it could record stay as they are
    /// for the next relayd (their flows forward in the kernel meanwhile, nobody is told);
    /// every other call ends (`relay-stopped`), both sides are told, and its flows go: a
    /// restarted relayd would not know it, so media left in the kernel would reach nobody
    /// who could end it.
    pub async fn stop(&self) {
        let kept = self.keep_for_next_relayd().unwrap_or_default();
        let calls: Vec<Arc<Call>> = self.calls().values().cloned().collect();
        for call in &calls {
            if kept.contains(&call.id) {
                self.leave(call).await;
            }
        }
        let ending: Vec<&Arc<Call>> = calls.iter().filter(|c| !kept.contains(&c.id)).collect();
        if !kept.is_empty() {
            tracing::info!(
                calls = kept.len(),
                "calls: relayd is stopping; the connected calls are kept in the state store for the next relayd, their media stays in the kernel"
            );
        }
        if !ending.is_empty() {
            tracing::info!(
                calls = ending.len(),
                "calls: relayd is stopping; the calls in progress that cannot be kept end"
            );
        }
        for call in ending {
            self.end(call, EndReason::RelayStopped, true, true).await;
        }
    }

    /// A kept call leaves this relayd: its tasks stop, its flows stay (but for those to
    /// its workers, which stop with it: the next relayd steers the call again).
    async fn leave(&self, call: &Call) {
        self.calls().remove(&call.id);
        let tasks = {
            let mut inner = call.inner();
            self.unsteer(&mut inner);
            std::mem::take(&mut inner.tasks)
        };
        for task in tasks {
            task.abort();
        }
        if let Ok(mut leg) = call.leg.try_lock() {
            leg.close().await;
        }
    }

    /// Ends a call from the operator's side (`relayctl calls hangup`); false if unknown.
    pub async fn hangup_by_operator(&self, id: u64) -> bool {
        let Some(call) = self.calls().get(&id).cloned() else {
            return false;
        };
        self.end(&call, EndReason::Operator, true, true).await;
        true
    }

    async fn end(&self, call: &Call, reason: EndReason, tell_app: bool, tell_controller: bool) {
        if self.calls().remove(&call.id).is_none() {
            return;
        }
        self.changed(call);
        *self
            .tally
            .lock()
            .expect("calls tally")
            .ended
            .entry(reason)
            .or_default() += 1;
        let (channel, tasks) = {
            let mut inner = call.inner();
            inner.flows.remove_all(&self.table, monotonic_ns());
            self.unsteer(&mut inner);
            if let Some(bridge) = inner.bridge.take() {
                let mut tally = self.tally.lock().expect("calls tally");
                tally.bridged.add(&bridge.counters.read());
            }
            (inner.local_channel.take(), std::mem::take(&mut inner.tasks))
        };
        if let (Some(turn), Some(channel)) = (&self.turn, channel) {
            turn.return_channel(&channel);
        }
        for task in tasks {
            // Not the task running this (connect ends itself by returning).
            if task.id() != tokio::task::try_id().unwrap_or(task.id()) {
                task.abort();
            }
        }
        if let Ok(mut leg) = call.leg.try_lock() {
            leg.close().await;
        }
        let ended = CallEvent::Ended {
            call: call.id,
            reason,
        };
        if tell_app {
            self.notify.to_app(&call.tenant, &call.user, &ended);
        }
        if tell_controller {
            self.notify.to_controller(&call.tenant, &ended);
        }
        tracing::info!(
            call = call.id,
            reason = reason.name(),
            "calls: call ended; its flows are removed"
        );
    }

    /// The SDP the app gets: the PBX's, anchored at the ICE port, with the leg's ICE; the
    /// call's other `streams` on the same transport.
    fn toward_app(
        &self,
        pbx_sdp: &str,
        local: LocalIce,
        secure: Secure,
        streams: &[LanStream],
    ) -> Result<String, CallError> {
        let extra: Vec<usize> = streams.iter().map(|stream| stream.index).collect();
        sdp::toward_app(pbx_sdp, self.ice.address(), &local.into(), secure, &extra)
            .map_err(CallError::from)
    }

    /// The streams of an offer the relay anchors besides its audio: with a bridged call
    /// that bundles them toward the app (MediaPlan::bundles_streams), the first
    /// MOST_STREAMS of its other audio and video streams; else none (they are refused).
    fn other_streams(
        &self,
        plan: &MediaPlan,
        offer: &str,
    ) -> Result<Vec<sdp::AudioEndpoint>, CallError> {
        if !plan.bundles_streams() {
            return Ok(Vec::new());
        }
        let mut others = sdp::other_streams(offer)?;
        others.truncate(MOST_STREAMS);
        Ok(others)
    }

    /// LAN ports for each of `others`.
    async fn bind_streams(
        &self,
        others: &[sdp::AudioEndpoint],
    ) -> Result<Vec<LanStream>, CallError> {
        let mut streams = Vec::with_capacity(others.len());
        for other in others {
            let (sockets, lan) = self.bind_lan_port().await?;
            streams.push(LanStream {
                index: other.line - 1,
                media: other.media.clone(),
                lan,
                rtp: sockets.rtp,
                rtcp: sockets.rtcp,
            });
        }
        Ok(streams)
    }
}

/// The relay's DTLS certificate toward apps: with a state store the one it keeps (so a
/// restored call's later answers carry the fingerprint its app has), else a new one.
fn dtls_identity(store: Option<&StateStore>) -> anyhow::Result<DtlsIdentity> {
    let Some(store) = store else {
        return Ok(DtlsIdentity::generate()?);
    };
    let pem = store.kept(
        "dtls-certificate",
        |pem| {
            std::str::from_utf8(pem)
                .ok()
                .is_some_and(|pem| DtlsIdentity::from_pem(pem).is_ok())
        },
        || {
            DtlsIdentity::generate()
                .map(|identity| identity.to_pem().into_bytes())
                .map_err(|err| err.to_string())
        },
    )?;
    let pem = String::from_utf8(pem)
        .map_err(|_| anyhow::anyhow!("state store: the DTLS certificate is not PEM"))?;
    Ok(DtlsIdentity::from_pem(&pem)?)
}

/// Each of `streams`' m-line and LAN address, as the SDP toward the PBX names them.
fn lan_streams(streams: &[LanStream]) -> Vec<(usize, SocketAddr)> {
    streams
        .iter()
        .map(|stream| (stream.index, stream.lan))
        .collect()
}

/// An SDP without the ICE credentials the relay's leg needs.
fn no_ice_credentials(kind: &str) -> CallError {
    CallError::BadRequest(format!(
        "sdp: the {kind} has no ICE credentials (a=ice-ufrag, a=ice-pwd)"
    ))
}

/// The ICE leg could not be set up (agent, gathering): try again.
fn ice_busy(err: anyhow::Error) -> CallError {
    CallError::Busy(format!("ICE: {err:#}"))
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
            lan,
            lan_socket: sockets.rtp,
            rtcp_socket: sockets.rtcp,
            streams: Vec::new(),
            remote_candidates: leg.remote_candidates(),
            leg: tokio::sync::Mutex::new(leg),
            created: std::time::Instant::now(),
            caller: None,
            inner: Mutex::new(CallInner::default()),
            changed_at: AtomicU64::new(0),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, CallInner> {
        self.inner.lock().expect("call poisoned")
    }

    /// Where the PBX wants RTCP when not with its RTP (no rtcp-mux); None: with it.
    fn pbx_rtcp(&self) -> Option<SocketAddr> {
        self.inner().pbx_rtcp
    }

    /// Whether `who` may act on the call: its tenant's controller, or its user.
    fn belongs_to(&self, who: &Requester) -> bool {
        match who {
            Requester::Controller { tenant } => *tenant == self.tenant,
            Requester::App { tenant, user } => *tenant == self.tenant && *user == self.user,
        }
    }

    /// The PBX's RTP address, for the media tasks.
    fn pbx(&self) -> SocketAddr {
        self.inner().pbx()
    }
}
