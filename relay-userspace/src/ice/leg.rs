//! One call's ICE leg on the shared ICE port.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, watch};
use webrtc_ice::{
    agent::{Agent, agent_config::AgentConfig},
    candidate::{Candidate, CandidateType, candidate_base::unmarshal_candidate},
    network_type::NetworkType,
    state::ConnectionState,
    udp_mux::{UDPMuxDefault, UDPMuxParams},
    udp_network::UDPNetwork,
};

/// The relay's ICE port: one UDP socket on the WAN address for every call.
pub struct IcePort {
    mux: Arc<UDPMuxDefault>,
    address: SocketAddr,
}

impl IcePort {
    /// Serves ICE on `socket` (bound to the WAN address and the ICE port).
    pub fn new(socket: std::net::UdpSocket) -> anyhow::Result<IcePort> {
        socket.set_nonblocking(true)?;
        let address = socket.local_addr()?;
        if address.ip().is_unspecified() {
            bail!("the ICE port must be bound to a specific address: candidates carry it");
        }
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        Ok(IcePort {
            mux: UDPMuxDefault::new(UDPMuxParams::new(socket)),
            address,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

/// What the app gets in the relay's SDP: credentials and candidates (`a=candidate` values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIce {
    pub ufrag: String,
    pub pwd: String,
    pub candidates: Vec<String>,
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

/// The ICE connection: sends to and receives from the selected pair's remote (media that
/// is not in the kernel yet).
pub type IceConn = Arc<dyn webrtc_util::Conn + Send + Sync>;

/// Adds the app's candidates to a leg's agent (trickle ICE, RFC 8838), without the leg:
/// they arrive while the leg is busy connecting.
#[derive(Clone)]
pub struct RemoteCandidates {
    agent: Arc<Agent>,
}

impl RemoteCandidates {
    /// An `a=candidate` value (a leading `candidate:` is allowed).
    pub fn add(&self, candidate: &str) -> anyhow::Result<()> {
        let text = candidate.strip_prefix("candidate:").unwrap_or(candidate);
        let parsed = unmarshal_candidate(text)
            .with_context(|| format!("not an ICE candidate: {candidate:?}"))?;
        let parsed: Arc<dyn Candidate + Send + Sync> = Arc::new(parsed);
        self.agent.add_remote_candidate(&parsed)?;
        Ok(())
    }
}

pub struct IceLeg {
    agent: Arc<Agent>,
    local: LocalIce,
    conn: Option<IceConn>,
    states: watch::Receiver<ConnectionState>,
    /// Dropping it cancels a connect in progress.
    _cancel: mpsc::Sender<()>,
    cancel_rx: Option<mpsc::Receiver<()>>,
    pairs: watch::Receiver<Option<SelectedPair>>,
}

/// How long gathering the host candidate on the mux may take.
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);

impl IceLeg {
    /// A new agent on `port`, its candidates gathered: one host candidate, the port's.
    /// Without answers to its consent checks the agent is Disconnected after 5 s and Failed
    /// after `consent_timeout`.
    pub async fn new(
        port: &IcePort,
        consent_timeout: Duration,
    ) -> anyhow::Result<(IceLeg, LocalIce)> {
        let ip = port.address.ip();
        let agent = Arc::new(
            Agent::new(AgentConfig {
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
            .context("ICE agent")?,
        );
        let (pairs_tx, pairs) = watch::channel(None);
        agent.on_selected_candidate_pair_change(Box::new(move |local, remote| {
            let _ = pairs_tx.send(Some(SelectedPair::of(&**local, &**remote)));
            Box::pin(async {})
        }));
        let (states_tx, states) = watch::channel(ConnectionState::New);
        agent.on_connection_state_change(Box::new(move |state| {
            let _ = states_tx.send(state);
            Box::pin(async {})
        }));
        let candidates = gather(&agent, port.address).await?;
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        let (cancel, cancel_rx) = mpsc::channel(1);
        Ok((
            IceLeg {
                agent,
                local: LocalIce {
                    ufrag: ufrag.clone(),
                    pwd: pwd.clone(),
                    candidates: candidates.clone(),
                },
                conn: None,
                states,
                _cancel: cancel,
                cancel_rx: Some(cancel_rx),
                pairs,
            },
            LocalIce {
                ufrag,
                pwd,
                candidates,
            },
        ))
    }

    /// The relay's credentials and candidates for this leg.
    pub fn local(&self) -> LocalIce {
        self.local.clone()
    }

    /// A candidate of the app (an `a=candidate` value, or trickled).
    pub fn add_remote_candidate(&self, candidate: &str) -> anyhow::Result<()> {
        self.remote_candidates().add(candidate)
    }

    /// Where the app's trickled candidates go, usable while the leg is connecting.
    pub fn remote_candidates(&self) -> RemoteCandidates {
        RemoteCandidates {
            agent: self.agent.clone(),
        }
    }

    /// Runs the checks with the app's credentials until a pair is selected; `controlling`
    /// when the relay made the offer. Returns the selected pair.
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
        let conn: IceConn = if controlling {
            self.agent.dial(cancel, remote_ufrag, remote_pwd).await?
        } else {
            self.agent.accept(cancel, remote_ufrag, remote_pwd).await?
        };
        self.conn = Some(conn);
        let pair = self
            .agent
            .get_selected_candidate_pair()
            .context("connected without a selected pair")?;
        Ok(SelectedPair::of(&*pair.local, &*pair.remote))
    }

    /// An ICE restart (RFC 8445 section 9; the app moved to another network): new local
    /// credentials and candidates, the app's new ones, checks again from the start. The
    /// connection stays the same; the new selected pair comes through `pairs`.
    pub async fn restart(
        &mut self,
        port: &IcePort,
        remote_ufrag: String,
        remote_pwd: String,
        remote_candidates: &[String],
    ) -> anyhow::Result<LocalIce> {
        // Empty: the agent draws new credentials.
        self.agent
            .restart(String::new(), String::new())
            .await
            .context("ICE restart")?;
        let candidates = gather(&self.agent, port.address).await?;
        self.agent
            .set_remote_credentials(remote_ufrag, remote_pwd)
            .await
            .context("the app's ICE credentials")?;
        for candidate in remote_candidates {
            if let Err(err) = self.add_remote_candidate(candidate) {
                tracing::debug!(%err, "ice: an app candidate skipped");
            }
        }
        let (ufrag, pwd) = self.agent.get_local_user_credentials().await;
        self.local = LocalIce {
            ufrag,
            pwd,
            candidates,
        };
        Ok(self.local.clone())
    }

    /// The connection once connected.
    pub fn conn(&self) -> Option<IceConn> {
        self.conn.clone()
    }

    /// The connection state as it changes (Disconnected/Failed: consent lost, RFC 7675).
    pub fn states(&self) -> watch::Receiver<ConnectionState> {
        self.states.clone()
    }

    /// The selected pair as it changes (the app moved to another network, a better route).
    pub fn pairs(&self) -> watch::Receiver<Option<SelectedPair>> {
        self.pairs.clone()
    }

    pub async fn close(&self) {
        let _ = self.agent.close().await;
    }
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
