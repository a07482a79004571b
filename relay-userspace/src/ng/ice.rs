//! The relay as an ICE agent toward one side of an ng stream (`ICE=force`): a webrtc-ice
//! agent on the side's own RTP port (the candidate the relay's SDP gives), run until a pair
//! is selected; then the port answers and sends consent checks (RFC 7675) and the stream's
//! flows go between the selected pair's remote and the other side. ICE checks component 1:
//! RTP, and RTCP when the side multiplexes it; RTCP on its own port stays plain UDP.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::UdpSocket;

use super::media::Peer;
use crate::{
    ice::leg::{IceLeg, IcePort, SelectedPair},
    session::{sdp::IceLines, streams::StreamEndpoint},
};

/// How long the first checks may take once both sides' credentials are known.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How far the relay's ICE toward a side has come, for `relayctl calls list`. Ordered from
/// the worst: a call shows the worst of its sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IceProgress {
    /// No working pair in time, or consent lost: no media to or from the side.
    Failed,
    /// The side's SDP has not given its credentials yet.
    Waiting,
    Checking,
    Connected,
}

impl IceProgress {
    pub fn as_str(self) -> &'static str {
        match self {
            IceProgress::Failed => "failed",
            IceProgress::Waiting => "waiting",
            IceProgress::Checking => "checking",
            IceProgress::Connected => "connected",
        }
    }
}

pub struct IceSide {
    pub port: IcePort,
    pub leg: tokio::sync::Mutex<IceLeg>,
    /// The relay's credentials and candidate: new ones after an ICE restart.
    local: Mutex<IceLines>,
    /// The relay's ICE went out in an offer: it is the controlling agent (RFC 8445 6.1.1).
    pub controlling: bool,
    state: Mutex<State>,
}

struct State {
    progress: IceProgress,
    /// The side's endpoint as its SDP said (its RTCP port and whether it multiplexes).
    sdp: Option<Peer>,
    /// The side's credentials and candidates, from its SDP.
    remote: Option<IceLines>,
    /// The checks were started.
    started: bool,
    /// The selected pair's remote: where the side's media comes from and goes to.
    selected: Option<SocketAddr>,
}

impl IceSide {
    /// An agent on `socket` (the side's RTP port), its host candidate gathered; consent
    /// lasts `consent_timeout` without answers (`ng.ice_consent_timeout_secs`).
    pub async fn new(
        socket: Arc<UdpSocket>,
        controlling: bool,
        consent_timeout: Duration,
    ) -> anyhow::Result<IceSide> {
        let port = IcePort::on(socket)?;
        let (leg, local) = IceLeg::new(&port, consent_timeout).await?;
        Ok(IceSide {
            port,
            leg: tokio::sync::Mutex::new(leg),
            local: Mutex::new(local.into()),
            controlling,
            state: Mutex::new(State {
                progress: IceProgress::Waiting,
                sdp: None,
                remote: None,
                started: false,
                selected: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("ng ICE side poisoned")
    }

    /// The side's SDP endpoint (None: it refused the stream).
    pub fn set_sdp(&self, peer: Option<Peer>) {
        self.state().sdp = peer;
    }

    pub fn sdp(&self) -> Option<Peer> {
        self.state().sdp
    }

    pub fn local(&self) -> IceLines {
        self.local.lock().expect("ng ICE side poisoned").clone()
    }

    /// The side offered new credentials (RFC 8445 section 9: it restarts ICE, having moved
    /// to another network): the leg runs new checks with them, in its role, and the relay's
    /// answer carries its new credentials. Only a connected side restarts; the others keep
    /// their checks.
    pub async fn restart(&self, remote: &IceLines) -> anyhow::Result<bool> {
        {
            let mut state = self.state();
            let same = state
                .remote
                .as_ref()
                .is_some_and(|known| (&known.ufrag, &known.pwd) == (&remote.ufrag, &remote.pwd));
            if same || state.progress != IceProgress::Connected {
                return Ok(false);
            }
            state.remote = Some(remote.clone());
            state.progress = IceProgress::Checking;
        }
        let mut leg = self.leg.lock().await;
        let local = leg
            .restart(
                &self.port,
                remote.ufrag.clone(),
                remote.pwd.clone(),
                &remote.candidates,
            )
            .await?;
        *self.local.lock().expect("ng ICE side poisoned") = local.into();
        Ok(true)
    }

    /// The side's ICE from its latest SDP; the credentials to check with when they are new
    /// and the checks have not started yet.
    pub fn set_remote(&self, remote: Option<IceLines>) -> Option<IceLines> {
        let mut state = self.state();
        if remote.is_some() {
            state.remote = remote;
        }
        if state.started || state.remote.is_none() {
            return None;
        }
        state.started = true;
        state.progress = IceProgress::Checking;
        state.remote.clone()
    }

    /// The pair ICE selected, or None when consent was lost.
    pub fn select(&self, pair: Option<SelectedPair>) {
        let mut state = self.state();
        state.selected = pair.map(|pair| pair.remote);
        state.progress = if pair.is_some() {
            IceProgress::Connected
        } else {
            IceProgress::Failed
        };
    }

    /// The checks found no working pair.
    pub fn failed(&self) {
        self.state().progress = IceProgress::Failed;
    }

    pub fn progress(&self) -> IceProgress {
        self.state().progress
    }

    pub fn has_remote(&self) -> bool {
        self.state().remote.is_some()
    }

    /// The side as the relay forwards to it: at the selected pair's remote, with the RTCP
    /// its SDP asked for; None until a pair is selected.
    pub fn peer(&self) -> Option<Peer> {
        let state = self.state();
        let (sdp, selected) = (state.sdp?, state.selected?);
        Some(Peer {
            endpoint: StreamEndpoint {
                rtp: selected,
                rtcp: if sdp.endpoint.rtcp_mux {
                    selected
                } else {
                    sdp.endpoint.rtcp
                },
                rtcp_mux: sdp.endpoint.rtcp_mux,
                rtcp_apart: sdp.endpoint.rtcp_apart,
            },
            advertised: sdp.advertised,
            // ICE checked the address: nothing to learn.
            learn: false,
            learned: selected != sdp.advertised.rtp,
        })
    }
}
