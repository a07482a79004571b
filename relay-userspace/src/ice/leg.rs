//! One call's ICE leg on the shared ICE port.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, watch};

use crate::session::sdp::IceLines;

pub use super::consent::Credentials;
use super::consent::{HandedConn, Handoff, Handoffs, PortSocket};
use webrtc_ice::{
    agent::{Agent, agent_config::AgentConfig},
    candidate::{Candidate, CandidateType, candidate_base::unmarshal_candidate},
    network_type::NetworkType,
    state::ConnectionState,
    udp_mux::{UDPMux, UDPMuxDefault, UDPMuxParams},
    udp_network::UDPNetwork,
};

/// The relay's ICE port: one UDP socket on the WAN address for every call. Legs that are
/// connecting have their agent on the mux; connected legs are the port's own (`Handoffs`).
pub struct IcePort {
    mux: Arc<UDPMuxDefault>,
    handoffs: Arc<Handoffs>,
    address: SocketAddr,
}

impl IcePort {
    /// Serves ICE on `socket` (bound to the WAN address and the ICE port).
    pub fn new(socket: std::net::UdpSocket) -> anyhow::Result<IcePort> {
        socket.set_nonblocking(true)?;
        IcePort::on(Arc::new(tokio::net::UdpSocket::from_std(socket)?))
    }

    /// Serves ICE on a socket of the runtime's, bound to a specific address: one stream's
    /// own port (an ng side the relay speaks ICE toward). The port reads the socket from
    /// now on; sending on it stays possible.
    pub fn on(socket: Arc<tokio::net::UdpSocket>) -> anyhow::Result<IcePort> {
        let address = socket.local_addr()?;
        if address.ip().is_unspecified() {
            bail!("the ICE port must be bound to a specific address: candidates carry it");
        }
        let handoffs = Handoffs::new(socket.clone())?;
        Ok(IcePort {
            mux: UDPMuxDefault::new(UDPMuxParams::new(PortSocket {
                socket,
                handoffs: handoffs.clone(),
            })),
            handoffs,
            address,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Datagrams the port dropped before any leg or agent saw them, by reason.
    pub fn discards(
        &self,
    ) -> [(super::consent::PortDiscard, u64); super::consent::PortDiscard::ALL.len()] {
        self.handoffs.discards()
    }

    /// Stops reading the socket (its legs closed before): the socket closes with its last
    /// owner.
    pub async fn close(&self) {
        let _ = self.mux.close().await;
    }
}

/// What the app gets in the relay's SDP: credentials and candidates (`a=candidate` values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIce {
    pub ufrag: String,
    pub pwd: String,
    pub candidates: Vec<String>,
}

impl From<LocalIce> for IceLines {
    fn from(local: LocalIce) -> IceLines {
        IceLines {
            ufrag: local.ufrag,
            pwd: local.pwd,
            candidates: local.candidates,
        }
    }
}

/// The pair ICE selected: the relay's address and the app's, with their candidate types
/// (the app's tells how it reaches the relay: host, srflx, prflx through a NAT, relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectedPair {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub local_type: CandidateType,
    pub remote_type: CandidateType,
}

impl SelectedPair {
    fn of(local: &dyn Candidate, remote: &dyn Candidate) -> SelectedPair {
        SelectedPair {
            local: local.addr(),
            remote: remote.addr(),
            local_type: local.candidate_type(),
            remote_type: remote.candidate_type(),
        }
    }
}

/// A connected leg as the state store keeps it: what a restarted relayd hands to the port
/// again, with no agent and no checks (the app notices nothing: its consent checks are
/// answered with the same credentials, on the same pair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedLeg {
    pub credentials: Credentials,
    /// The relay's candidates, as its SDP gave them.
    pub candidates: Vec<String>,
    pub controlling: bool,
    pub priority: u32,
    pub pair: SelectedPair,
}

/// The ICE connection: sends to and receives from the selected pair's remote (media that
/// is not in the kernel yet).
pub type IceConn = Arc<dyn webrtc_util::Conn + Send + Sync>;

/// Adds the app's candidates to the leg's agent checking them (trickle ICE, RFC 8838),
/// without the leg: they arrive while the leg is busy connecting. Once the leg is connected
/// no agent checks: a late candidate is parsed and left out.
#[derive(Clone, Default)]
pub struct RemoteCandidates {
    agent: Arc<std::sync::Mutex<Option<Arc<Agent>>>>,
}

impl RemoteCandidates {
    /// An `a=candidate` value (a leading `candidate:` is allowed).
    pub fn add(&self, candidate: &str) -> anyhow::Result<()> {
        let text = candidate.strip_prefix("candidate:").unwrap_or(candidate);
        let parsed = unmarshal_candidate(text)
            .with_context(|| format!("not an ICE candidate: {candidate:?}"))?;
        let parsed: Arc<dyn Candidate + Send + Sync> = Arc::new(parsed);
        let agent = self.agent.lock().expect("ICE candidates").clone();
        match agent {
            Some(agent) => agent.add_remote_candidate(&parsed)?,
            None => tracing::debug!(candidate, "ice: a candidate after the leg connected"),
        }
        Ok(())
    }

    fn check_with(&self, agent: Option<Arc<Agent>>) {
        *self.agent.lock().expect("ICE candidates") = agent;
    }
}

pub struct IceLeg {
    /// The agent while checks run: until the leg connects, and during an ICE restart.
    agent: Option<Arc<Agent>>,
    /// The same agent, for trickled candidates.
    candidates: RemoteCandidates,
    local: LocalIce,
    conn: Option<Arc<HandedConn>>,
    handoffs: Arc<Handoffs>,
    /// The leg's id among the port's connected legs.
    handed: Option<u64>,
    controlling: bool,
    consent_timeout: Duration,
    states_tx: watch::Sender<ConnectionState>,
    states: watch::Receiver<ConnectionState>,
    pairs_tx: watch::Sender<Option<SelectedPair>>,
    pairs: watch::Receiver<Option<SelectedPair>>,
    /// Dropping it cancels the checks in progress (the first connect or a restart).
    _cancel: mpsc::Sender<()>,
    cancel_rx: Option<mpsc::Receiver<()>>,
    restarting: Option<tokio::task::JoinHandle<()>>,
}

/// How long gathering the host candidate on the mux may take.
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);
/// An ICE restart's checks may take as long as consent lasts after media toward the app
/// stopped (what webrtc-ice allowed a restarting agent: disconnected + failed timeouts).
const RESTART_GRACE: Duration = Duration::from_secs(5);

impl IceLeg {
    /// A new agent on `port`, its candidates gathered: one host candidate, the port's.
    /// Once connected, consent is checked by the port: media toward the app stops after
    /// about 5 s without answers, and the leg fails after `consent_timeout`.
    pub async fn new(
        port: &IcePort,
        consent_timeout: Duration,
    ) -> anyhow::Result<(IceLeg, LocalIce)> {
        let agent = new_agent(port, consent_timeout).await?;
        let (pairs_tx, pairs) = watch::channel(None);
        let forward_pairs = pairs_tx.clone();
        agent.on_selected_candidate_pair_change(Box::new(move |local, remote| {
            let _ = forward_pairs.send(Some(SelectedPair::of(&**local, &**remote)));
            Box::pin(async {})
        }));
        let (states_tx, states) = watch::channel(ConnectionState::New);
        let forward_states = states_tx.clone();
        agent.on_connection_state_change(Box::new(move |state| {
            let _ = forward_states.send(state);
            Box::pin(async {})
        }));
        let candidates = gather(&agent, port.address).await?;
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        let (cancel, cancel_rx) = mpsc::channel(1);
        let local = LocalIce {
            ufrag,
            pwd,
            candidates,
        };
        Ok((
            IceLeg {
                candidates: {
                    let candidates = RemoteCandidates::default();
                    candidates.check_with(Some(agent.clone()));
                    candidates
                },
                agent: Some(agent),
                local: local.clone(),
                conn: None,
                handoffs: port.handoffs.clone(),
                handed: None,
                controlling: false,
                consent_timeout,
                states_tx,
                states,
                pairs_tx,
                pairs,
                _cancel: cancel,
                cancel_rx: Some(cancel_rx),
                restarting: None,
            },
            local,
        ))
    }

    /// A leg taken back from the state store: handed to the port as connected, consent
    /// checks starting afresh.
    pub fn restored(port: &IcePort, consent_timeout: Duration, leg: ConnectedLeg) -> IceLeg {
        let (pairs_tx, pairs) = watch::channel(Some(leg.pair));
        let (states_tx, states) = watch::channel(ConnectionState::Connected);
        let local = LocalIce {
            ufrag: leg.credentials.local_ufrag.clone(),
            pwd: leg.credentials.local_pwd.clone(),
            candidates: leg.candidates,
        };
        let (id, handed) = port.handoffs.hand_off(Handoff {
            credentials: leg.credentials,
            controlling: leg.controlling,
            priority: leg.priority,
            pair: leg.pair,
            consent_timeout,
            states: states_tx.clone(),
            pairs: pairs_tx.clone(),
        });
        let (cancel, _) = mpsc::channel(1);
        IceLeg {
            agent: None,
            candidates: RemoteCandidates::default(),
            local,
            conn: Some(handed),
            handoffs: port.handoffs.clone(),
            handed: Some(id),
            controlling: leg.controlling,
            consent_timeout,
            states_tx,
            states,
            pairs_tx,
            pairs,
            _cancel: cancel,
            cancel_rx: None,
            restarting: None,
        }
    }

    /// The leg as the port keeps it once connected (None before, or while an ICE restart
    /// runs: its outcome is not known yet).
    pub fn connected(&self) -> Option<ConnectedLeg> {
        if self
            .restarting
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            return None;
        }
        let (credentials, controlling, priority, pair) = self.handoffs.leg(self.handed?)?;
        Some(ConnectedLeg {
            credentials,
            candidates: self.local.candidates.clone(),
            controlling,
            priority,
            pair,
        })
    }

    /// The relay's credentials and candidates for this leg.
    pub fn local(&self) -> LocalIce {
        self.local.clone()
    }

    /// A candidate of the app (an `a=candidate` value, or trickled).
    pub fn add_remote_candidate(&self, candidate: &str) -> anyhow::Result<()> {
        self.candidates.add(candidate)
    }

    /// Where the app's trickled candidates go, usable while the leg is connecting.
    pub fn remote_candidates(&self) -> RemoteCandidates {
        self.candidates.clone()
    }

    /// Runs the checks with the app's credentials until a pair is selected; `controlling`
    /// when the relay made the offer. Then the agent is closed and the port keeps the leg's
    /// consent. Returns the selected pair.
    pub async fn connect(
        &mut self,
        controlling: bool,
        remote_ufrag: String,
        remote_pwd: String,
    ) -> anyhow::Result<SelectedPair> {
        let cancel = self
            .cancel_rx
            .take()
            .context("this leg has already connected")?;
        let agent = self.agent.clone().context("this leg is closed")?;
        let conn: IceConn = if controlling {
            agent
                .dial(cancel, remote_ufrag.clone(), remote_pwd.clone())
                .await?
        } else {
            agent
                .accept(cancel, remote_ufrag.clone(), remote_pwd.clone())
                .await?
        };
        let selected = agent
            .get_selected_candidate_pair()
            .context("connected without a selected pair")?;
        let pair = SelectedPair::of(&*selected.local, &*selected.remote);
        self.controlling = controlling;
        let (id, handed) = self.handoffs.hand_off(Handoff {
            credentials: Credentials {
                local_ufrag: self.local.ufrag.clone(),
                local_pwd: self.local.pwd.clone(),
                remote_ufrag,
                remote_pwd,
            },
            controlling,
            priority: selected.local.priority(),
            pair,
            consent_timeout: self.consent_timeout,
            states: self.states_tx.clone(),
            pairs: self.pairs_tx.clone(),
        });
        self.handed = Some(id);
        self.candidates.check_with(None);
        retire(&agent, &conn, &handed).await;
        self.agent = None;
        self.conn = Some(handed);
        Ok(pair)
    }

    /// An ICE restart (RFC 8445 section 9; the app moved to another network): a new agent
    /// with new local credentials and candidates runs the checks with the app's new ones,
    /// in the leg's role. The connection stays the same; the new selected pair comes
    /// through `pairs`, and a restart that does not complete fails the leg.
    pub async fn restart(
        &mut self,
        port: &IcePort,
        remote_ufrag: String,
        remote_pwd: String,
        remote_candidates: &[String],
    ) -> anyhow::Result<LocalIce> {
        let (Some(id), Some(conn)) = (self.handed, self.conn.clone()) else {
            bail!("the leg has not connected: nothing to restart");
        };
        let agent = new_agent(port, self.consent_timeout).await?;
        let candidates = gather(&agent, port.address).await?;
        let restarting = RemoteCandidates::default();
        restarting.check_with(Some(agent.clone()));
        for candidate in remote_candidates {
            if let Err(err) = restarting.add(candidate) {
                tracing::debug!(%err, "ice: an app candidate skipped");
            }
        }
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        let restart = self
            .handoffs
            .restart(id)
            .context("the leg's consent has expired")?;
        self.stop_checks().await;
        let (cancel, cancel_rx) = mpsc::channel(1);
        self._cancel = cancel;
        self.agent = Some(agent.clone());
        self.candidates.check_with(Some(agent.clone()));
        let candidates_of_leg = self.candidates.clone();
        let credentials = Credentials {
            local_ufrag: ufrag.clone(),
            local_pwd: pwd.clone(),
            remote_ufrag: remote_ufrag.clone(),
            remote_pwd: remote_pwd.clone(),
        };
        let (handoffs, controlling) = (self.handoffs.clone(), self.controlling);
        let limit = RESTART_GRACE + self.consent_timeout;
        self.restarting = Some(tokio::spawn(async move {
            let checks = async {
                let conn: IceConn = if controlling {
                    agent.dial(cancel_rx, remote_ufrag, remote_pwd).await?
                } else {
                    agent.accept(cancel_rx, remote_ufrag, remote_pwd).await?
                };
                Ok::<_, webrtc_ice::Error>(conn)
            };
            let selected = match tokio::time::timeout(limit, checks).await {
                Ok(Ok(checked)) => agent
                    .get_selected_candidate_pair()
                    .map(|selected| (checked, selected)),
                _ => None,
            };
            // Whatever the outcome, no agent checks the leg's candidates any more.
            candidates_of_leg.check_with(None);
            match selected {
                Some((checked, selected)) => {
                    let pair = SelectedPair::of(&*selected.local, &*selected.remote);
                    handoffs.restarted(id, restart, credentials, selected.local.priority(), pair);
                    retire(&agent, &checked, &conn).await;
                }
                None => {
                    handoffs.restart_failed(id, restart);
                    let _ = agent.close().await;
                }
            }
        }));
        self.local = LocalIce {
            ufrag,
            pwd,
            candidates,
        };
        Ok(self.local.clone())
    }

    /// The connection once connected.
    pub fn conn(&self) -> Option<IceConn> {
        self.conn.clone().map(|conn| conn as IceConn)
    }

    /// The connection state as it changes (Disconnected/Failed: consent lost, RFC 7675).
    pub fn states(&self) -> watch::Receiver<ConnectionState> {
        self.states.clone()
    }

    /// The selected pair as it changes (the app moved to another network, a better route).
    pub fn pairs(&self) -> watch::Receiver<Option<SelectedPair>> {
        self.pairs.clone()
    }

    pub async fn close(&mut self) {
        self.stop_checks().await;
        if let Some(id) = self.handed.take() {
            self.handoffs.remove(id);
        }
    }

    /// Stops the checks in progress (an agent, a restart's task), telling nobody.
    async fn stop_checks(&mut self) {
        if let Some(task) = self.restarting.take() {
            task.abort();
        }
        self.candidates.check_with(None);
        if let Some(agent) = self.agent.take() {
            detach(&agent);
            let _ = agent.close().await;
        }
    }
}

impl Drop for IceLeg {
    fn drop(&mut self) {
        if let Some(task) = self.restarting.take() {
            task.abort();
        }
        if let Some(id) = self.handed.take() {
            self.handoffs.remove(id);
        }
    }
}

/// A leg's agent on the port's mux.
async fn new_agent(port: &IcePort, consent_timeout: Duration) -> anyhow::Result<Arc<Agent>> {
    let ip = port.address.ip();
    let agent = Agent::new(AgentConfig {
        network_types: vec![if ip.is_ipv4() {
            NetworkType::Udp4
        } else {
            NetworkType::Udp6
        }],
        candidate_types: vec![CandidateType::Host],
        udp_network: UDPNetwork::Muxed(port.mux.clone()),
        // The mux's address only: not every address of the host.
        ip_filter: Arc::new(Some(Box::new(move |candidate: IpAddr| candidate == ip))),
        // An ICE port on loopback (a trial on one machine) is a candidate too;
        // webrtc-ice leaves loopback out unless told.
        include_loopback: ip.is_loopback(),
        failed_timeout: Some(consent_timeout),
        // Apps reach the relay from the Internet: their working address is
        // reflexive (a NAT's). Waiting for a better one only delays the media
        // (1 s by default for prflx, measured on route changes); a TURN-relayed
        // remote still waits its default 2 s, so direct routes win.
        srflx_acceptance_min_wait: Some(Duration::ZERO),
        // RFC 8445's pacing (Ta) is 50 ms; webrtc-ice's 200 ms default made every
        // call setup and route change wait about 200 ms more (bench calls).
        check_interval: Duration::from_millis(50),
        prflx_acceptance_min_wait: Some(Duration::ZERO),
        ..Default::default()
    })
    .await
    .context("ICE agent")?;
    Ok(Arc::new(agent))
}

/// The agent's handlers replaced by nothing: closing it says nothing to the leg.
fn detach(agent: &Agent) {
    agent.on_connection_state_change(Box::new(|_| Box::pin(async {})));
    agent.on_selected_candidate_pair_change(Box::new(|_, _| Box::pin(async {})));
}

/// Closes an agent whose leg the port has taken over; what the agent had received and
/// nobody had read yet (a DTLS ClientHello right after the nomination) goes to the leg.
async fn retire(agent: &Agent, checked: &IceConn, leg: &HandedConn) {
    detach(agent);
    let mut buf = vec![0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::ZERO, checked.recv(&mut buf)).await {
        leg.queue(buf[..n].to_vec());
    }
    let _ = agent.close().await;
}

/// Gathers the agent's candidates on the ICE port (one host candidate: the port's).
async fn gather(agent: &Agent, address: SocketAddr) -> anyhow::Result<Vec<String>> {
    let (gathered_tx, mut gathered) = mpsc::unbounded_channel();
    agent.on_candidate(Box::new(move |candidate| {
        let _ = gathered_tx.send(candidate.map(|c| c.marshal()));
        Box::pin(async {})
    }));
    agent
        .gather_candidates()
        .context("gathering ICE candidates")?;
    let mut candidates = Vec::new();
    loop {
        match tokio::time::timeout(GATHER_TIMEOUT, gathered.recv()).await {
            Ok(Some(Some(candidate))) => candidates.push(candidate),
            // None: gathering is complete.
            Ok(Some(None)) | Ok(None) => break,
            Err(_) => bail!("ICE candidate gathering did not finish in {GATHER_TIMEOUT:?}"),
        }
    }
    if candidates.is_empty() {
        bail!("no ICE candidate on {address}");
    }
    Ok(candidates)
}
