//! What calls say and hear, typed: who makes a request ([`Requester`]), what happens to a
//! call ([`CallEvent`], [`EndReason`]), why a request is refused ([`CallError`]), and where
//! events go ([`Notify`]). The signalling rendezvous maps them onto its wire messages; calls
//! know nothing of WebSockets or JSON.

use std::net::SocketAddr;

use webrtc_ice::candidate::CandidateType;

use super::flows::Traffic;
use crate::session::sdp::SdpError;

/// Who makes a call request: a tenant's controller (the PBX side), or one of its users'
/// apps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    Controller { tenant: String },
    App { tenant: String, user: String },
}

impl Requester {
    pub fn tenant(&self) -> &str {
        match self {
            Requester::Controller { tenant } | Requester::App { tenant, .. } => tenant,
        }
    }
}

/// Where a call is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallState {
    /// Offered to the other side, not answered yet.
    #[default]
    Offered,
    /// Answered: ICE is checking.
    Connecting,
    /// ICE selected this pair; the media flows follow it.
    Connected(crate::ice::leg::SelectedPair),
}

impl CallState {
    pub fn name(&self) -> &'static str {
        match self {
            CallState::Offered => "offered",
            CallState::Connecting => "connecting",
            CallState::Connected(_) => "connected",
        }
    }

    pub fn pair(&self) -> Option<crate::ice::leg::SelectedPair> {
        match self {
            CallState::Connected(pair) => Some(*pair),
            CallState::Offered | CallState::Connecting => None,
        }
    }
}

/// The devices woken for a call: how many, and word if none of the pushes was delivered
/// (the last failure's reason); the sender dropped without a word: one was.
pub struct Woken {
    pub devices: usize,
    pub undelivered: tokio::sync::oneshot::Receiver<String>,
}

/// Why a call ended; the names are what `call.ended` and the metrics say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndReason {
    /// One side hung up.
    Hangup,
    /// `relayctl calls hangup`.
    Operator,
    IceFailed,
    IceTimeout,
    /// No answers to the relay's consent checks (RFC 7675) for `calls.consent_timeout_secs`.
    ConsentLost,
    /// No media either way for `calls.media_timeout_secs`.
    MediaTimeout,
    /// relayd stopped.
    RelayStopped,
    /// The DTLS handshake with the app failed (or its certificate did not match its SDP).
    DtlsFailed,
    /// The app's DTLS handshake did not complete in time.
    DtlsTimeout,
    /// The SDES keys the sides gave could not key SRTP.
    MediaSecurityFailed,
    /// A call the state store kept could not be taken back by the restarted relayd (its
    /// LAN port was taken meanwhile, its record no longer made sense).
    RestoreFailed,
    /// The user's devices were woken for the call (no app was connected) and none
    /// answered within `push.ring_secs`.
    NoAnswer,
    /// No app of the user was connected and no push reached any of their devices.
    Offline,
}

impl EndReason {
    pub const ALL: [EndReason; 13] = [
        EndReason::Hangup,
        EndReason::Operator,
        EndReason::IceFailed,
        EndReason::IceTimeout,
        EndReason::ConsentLost,
        EndReason::MediaTimeout,
        EndReason::RelayStopped,
        EndReason::DtlsFailed,
        EndReason::DtlsTimeout,
        EndReason::MediaSecurityFailed,
        EndReason::RestoreFailed,
        EndReason::NoAnswer,
        EndReason::Offline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EndReason::Hangup => "hangup",
            EndReason::Operator => "operator",
            EndReason::IceFailed => "ice-failed",
            EndReason::IceTimeout => "ice-timeout",
            EndReason::ConsentLost => "consent-lost",
            EndReason::MediaTimeout => "media-timeout",
            EndReason::RelayStopped => "relay-stopped",
            EndReason::DtlsFailed => "dtls-failed",
            EndReason::DtlsTimeout => "dtls-timeout",
            EndReason::MediaSecurityFailed => "media-security-failed",
            EndReason::RestoreFailed => "restore-failed",
            EndReason::NoAnswer => "no-answer",
            EndReason::Offline => "offline",
        }
    }
}

/// A change of a call's media path, for `call.state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// ICE checks started.
    Checking,
    /// ICE connected on this pair and the media flows are in (or, for a bridged call,
    /// each leg's security is set up and the relay carries the media).
    Connected {
        local: SocketAddr,
        remote: SocketAddr,
        local_type: CandidateType,
        remote_type: CandidateType,
        /// Each leg's media security (`pass-through`, `dtls-srtp`, `sdes-srtp`, `rtp`).
        app_security: &'static str,
        pbx_security: &'static str,
    },
    /// The app moved (ICE restart) or ICE switched pairs: the flows follow.
    RouteChanged {
        remote: SocketAddr,
        remote_type: CandidateType,
    },
    /// The app restarts ICE (to the controller, before the new route).
    IceRestart,
    /// The app stopped answering consent checks: media toward it stopped.
    ConsentLost,
    /// A restarted relayd took the call back from the state store: its media went on
    /// in the kernel meanwhile, on this route.
    Restored {
        remote: SocketAddr,
        remote_type: CandidateType,
    },
    /// This relay took the call over from `from`, a relay of the cluster that is down
    /// (it shares that relay's addresses): the media goes on on this route.
    Moved {
        remote: SocketAddr,
        remote_type: CandidateType,
        from: String,
    },
    /// No app of the user was connected: a push went to each of their `devices`, and the
    /// call waits for one to connect (to the controller).
    Ringing { devices: usize },
}

impl StateChange {
    pub fn name(&self) -> &'static str {
        match self {
            StateChange::Checking => "checking",
            StateChange::Connected { .. } => "connected",
            StateChange::RouteChanged { .. } => "route-changed",
            StateChange::IceRestart => "ice-restart",
            StateChange::ConsentLost => "consent-lost",
            StateChange::Restored { .. } => "restored",
            StateChange::Moved { .. } => "moved",
            StateChange::Ringing { .. } => "ringing",
        }
    }
}

/// Something that happened to a call, for one side of it.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// A call for this side to answer: the app gets the PBX's offer anchored at the relay;
    /// the controller gets the app's offer for the PBX, with the calling user.
    Incoming {
        call: u64,
        user: Option<String>,
        /// Who calls, as the controller named them (a PBX's call to an app).
        caller: Option<String>,
        sdp: String,
    },
    /// The other side answered; the SDP is the one for this side.
    Answered {
        call: u64,
        sdp: String,
    },
    State {
        call: u64,
        change: StateChange,
    },
    /// The call's traffic so far (to the controller, every `calls.stats_interval_secs`).
    Stats {
        call: u64,
        duration_secs: u64,
        to_pbx: Traffic,
        to_app: Traffic,
        idle_ms: u64,
    },
    Ended {
        call: u64,
        reason: EndReason,
    },
}

/// Why a call request was refused: what the requester is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The requester's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Nobody on the other side is connected.
    #[error("{0}")]
    Offline(String),
    #[error("call: {0}: no such call")]
    NoSuchCall(u64),
    #[error("sdp: {0}")]
    Sdp(#[from] SdpError),
    #[error("{0}")]
    BadRequest(String),
    /// No resources for it now (ICE agent, LAN port): try again.
    #[error("{0}")]
    Busy(String),
}

/// Where calls' events go: the sessions of a tenant's controller and of its users' apps.
pub trait Notify: Send + Sync {
    /// Whether `user` of `tenant` has a session connected.
    fn is_online(&self, tenant: &str, user: &str) -> bool;
    /// Delivers to every session of the user; how many took it.
    fn to_app(&self, tenant: &str, user: &str, event: &CallEvent) -> usize;
    /// Delivers to the tenant's controller; whether it took it.
    fn to_controller(&self, tenant: &str, event: &CallEvent) -> bool;
    /// Wakes the user's registered devices for `call` (a push each); None when the user
    /// has none.
    fn wake(&self, _tenant: &str, _user: &str, _call: u64, _caller: Option<&str>) -> Option<Woken> {
        None
    }
    /// How long a call whose user was woken waits for an app; None: nobody is woken.
    fn ring_time(&self) -> Option<std::time::Duration> {
        None
    }
}
