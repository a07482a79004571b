//! A bridged call's media: the relay terminates each leg's security and carries every
//! packet itself. SRTP from the app is unprotected (and protected again with the PBX
//! leg's keys, SDES or DTLS-SRTP, when it has them) and sent to the PBX; the PBX's media
//! goes the other way. DTLS records on a leg's transport go to that leg's handshake
//! (RFC 7983 demultiplexing). The kernel forwards none of it: a transcrypted packet needs
//! the keys.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::mpsc;

use super::{
    Call, Calls, EndReason,
    security::{AppLeg, MediaPlan, PbxLeg},
    streams::Routes,
};
use crate::{
    ice::leg::IceConn,
    media::{
        MediaCounters, SrtpError, SrtpSession,
        dtls::{self, Demux, DtlsError, demux},
        srtp::{MAX_OVERHEAD, RecordError, is_rtcp},
    },
    state::SrtpRecord,
    time::monotonic_ns,
};

/// A DTLS-SRTP leg's handshake, for `relayctl calls show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DtlsState {
    /// The leg is not DTLS.
    None,
    Connecting,
    Connected,
    Failed,
}

pub(super) struct Bridge {
    /// The app leg's SRTP; None while a DTLS handshake runs, and for a plain leg.
    app: Mutex<Option<SrtpSession>>,
    /// Whether the app leg is secured: its packets wait for the keys until then.
    app_secured: bool,
    /// The PBX leg's SRTP; None while its DTLS handshake runs, and for a plain leg.
    pbx: Mutex<Option<SrtpSession>>,
    /// Whether the PBX leg is secured: nothing goes to or comes from it without keys.
    pbx_secured: bool,
    /// Each leg's handshake: the app's, the PBX's.
    dtls: Mutex<[DtlsState; 2]>,
    /// Cleared while the app does not answer consent checks (RFC 7675): nothing is sent
    /// toward it.
    toward_app: AtomicBool,
    pub(super) counters: MediaCounters,
    /// The legs' DTLS associations (app, PBX), kept open for the call (they answer
    /// retransmitted flights and alerts).
    associations: tokio::sync::Mutex<Vec<::dtls::conn::DTLSConn>>,
    /// Told when a leg's keys are in place.
    keyed: tokio::sync::Notify,
    /// The SRTP legs (app, PBX) as last handed to the state store.
    recorded: Mutex<Option<LegRecords>>,
    /// Which of the call's streams a packet from the app goes to.
    pub(super) routes: Routes,
}

/// Each leg's SRTP as the state store keeps it: the app's, the PBX's.
pub(super) type LegRecords = [Option<SrtpRecord>; 2];

/// The largest packet a bridge reads (UDP on an Ethernet path fits well within it).
const PACKET_ROOM: usize = 2048;

/// SRTP from the app held while the relay finishes its side of a DTLS handshake (as DTLS
/// client it derives the app's keys after the app, which may send at once; the PBX's
/// handshake may end after the app's); more are dropped.
const EARLY_SRTP: usize = 32;

/// Which leg: indices of `Bridge::dtls`.
const APP: usize = 0;
const PBX: usize = 1;

impl Bridge {
    /// `secured`: whether each leg (app, PBX) has keys to wait for when it has none yet.
    fn new(
        app: Option<SrtpSession>,
        pbx: Option<SrtpSession>,
        secured: [bool; 2],
        dtls: [DtlsState; 2],
        routes: Routes,
    ) -> Bridge {
        Bridge {
            app: Mutex::new(app),
            app_secured: secured[APP],
            pbx: Mutex::new(pbx),
            pbx_secured: secured[PBX],
            dtls: Mutex::new(dtls),
            toward_app: AtomicBool::new(true),
            counters: MediaCounters::default(),
            associations: tokio::sync::Mutex::new(Vec::new()),
            keyed: tokio::sync::Notify::new(),
            recorded: Mutex::new(None),
            routes,
        }
    }

    /// A bridge a restarted relayd takes back: its legs' SRTP from the state store, the
    /// DTLS association (if any) left with the relayd that made it: the keys it gave are
    /// all the media needs.
    pub(super) fn restored(
        plan: &MediaPlan,
        [app, pbx]: &LegRecords,
        routes: Routes,
    ) -> Result<Bridge, RecordError> {
        let MediaPlan::Bridged {
            app: app_leg,
            pbx: pbx_leg,
            ..
        } = plan
        else {
            return Ok(Bridge::new(
                None,
                None,
                [false; 2],
                [DtlsState::None; 2],
                routes,
            ));
        };
        let session =
            |record: &Option<SrtpRecord>| record.as_ref().map(SrtpSession::from_record).transpose();
        let state = |dtls: bool| {
            if dtls {
                DtlsState::Connected
            } else {
                DtlsState::None
            }
        };
        let bridge = Bridge::new(
            session(app)?,
            session(pbx)?,
            [
                !matches!(app_leg, AppLeg::Plain),
                !matches!(pbx_leg, PbxLeg::Plain),
            ],
            [
                state(matches!(app_leg, AppLeg::Dtls { .. })),
                state(matches!(pbx_leg, PbxLeg::Dtls { .. })),
            ],
            routes,
        );
        *bridge.recorded.lock().expect("bridge records") = Some([app.clone(), pbx.clone()]);
        Ok(bridge)
    }

    /// The legs' SRTP for the state store, remembered as recorded; None while a leg's
    /// keys are not there yet.
    pub(super) fn records(&self) -> Option<LegRecords> {
        if self.waits_for_either() {
            return None;
        }
        let records = [
            self.app
                .lock()
                .expect("bridge app leg")
                .as_ref()
                .map(SrtpSession::record),
            self.pbx
                .lock()
                .expect("bridge pbx leg")
                .as_ref()
                .map(SrtpSession::record),
        ];
        *self.recorded.lock().expect("bridge records") = Some(records.clone());
        Some(records)
    }

    /// Whether the legs' SRTP moved on from what the store holds far enough that a
    /// restart from it could go wrong (`SrtpSession::drifted_from`), or was never recorded.
    pub(super) fn drifted(&self) -> bool {
        let recorded = self.recorded.lock().expect("bridge records");
        let Some([app_record, pbx_record]) = recorded.as_ref() else {
            return !self.waits_for_either();
        };
        let moved = |session: &Mutex<Option<SrtpSession>>, record: &Option<SrtpRecord>| match (
            session.lock().expect("bridge leg").as_ref(),
            record,
        ) {
            (Some(session), Some(record)) => session.drifted_from(record),
            (None, None) => false,
            _ => true,
        };
        moved(&self.app, app_record) || moved(&self.pbx, pbx_record)
    }

    pub(super) fn info(&self) -> super::BridgeInfo {
        let suite = self
            .app
            .lock()
            .expect("bridge app leg")
            .as_ref()
            .map(|srtp| srtp.suite().sdes_name());
        let name = |state: DtlsState| match state {
            DtlsState::None => "-",
            DtlsState::Connecting => "connecting",
            DtlsState::Connected => "connected",
            DtlsState::Failed => "failed",
        };
        let dtls = *self.dtls.lock().expect("bridge dtls");
        super::BridgeInfo {
            dtls: name(dtls[APP]),
            pbx_dtls: name(dtls[PBX]),
            suite,
            totals: self.counters.read(),
            steered: Vec::new(),
        }
    }

    pub(super) fn set_toward_app(&self, on: bool) {
        self.toward_app.store(on, Ordering::Relaxed);
    }

    /// A secured app leg whose keys are not there yet.
    fn waits_for_keys(&self) -> bool {
        self.app_secured && self.app.lock().expect("bridge app leg").is_none()
    }

    /// A secured PBX leg whose keys are not there yet.
    fn pbx_waits_for_keys(&self) -> bool {
        self.pbx_secured && self.pbx.lock().expect("bridge pbx leg").is_none()
    }

    /// Either leg waits for its keys: what the app sends is held.
    pub(super) fn waits_for_either(&self) -> bool {
        self.waits_for_keys() || self.pbx_waits_for_keys()
    }

    /// The packet from the app in `buf[..len]` made what the PBX gets, where it is (`buf`
    /// has room for `MAX_OVERHEAD` more); its length, or None when it is refused (counted)
    /// or waits for keys.
    pub(super) fn app_to_pbx(&self, buf: &mut [u8], len: usize) -> Option<usize> {
        let len = match self.app.lock().expect("bridge app leg").as_mut() {
            Some(srtp) => self.counted(srtp.unprotect_in_place(buf, len))?,
            None if self.app_secured => return None,
            None => len,
        };
        match self.pbx.lock().expect("bridge pbx leg").as_mut() {
            Some(srtp) => self.counted(srtp.protect_in_place(buf, len)),
            None if self.pbx_secured => None,
            None => Some(len),
        }
    }

    /// The packet from the PBX in `buf[..len]` made what the app gets, where it is.
    pub(super) fn pbx_to_app(&self, buf: &mut [u8], len: usize) -> Option<usize> {
        if !self.toward_app.load(Ordering::Relaxed) {
            return None;
        }
        let len = match self.pbx.lock().expect("bridge pbx leg").as_mut() {
            Some(srtp) => self.counted(srtp.unprotect_in_place(buf, len))?,
            None if self.pbx_secured => return None,
            None => len,
        };
        match self.app.lock().expect("bridge app leg").as_mut() {
            Some(srtp) => self.counted(srtp.protect_in_place(buf, len)),
            None if self.app_secured => None,
            None => Some(len),
        }
    }

    fn counted(&self, result: Result<usize, SrtpError>) -> Option<usize> {
        result.map_err(|why| self.counters.refused(why)).ok()
    }
}

impl Calls {
    /// Carries a bridged call's media from now on: the app's DTLS handshake first when its
    /// leg is DTLS-SRTP. An error ends the call.
    pub(super) async fn start_bridge(
        &self,
        call: &Arc<Call>,
        conn: IceConn,
    ) -> Result<(), EndReason> {
        let MediaPlan::Bridged { app, pbx, .. } = call.inner().plan.clone() else {
            return Ok(());
        };
        let session = |own: &crate::media::Crypto, peer: &crate::media::Crypto| {
            SrtpSession::new(
                own.suite,
                (peer.key(), peer.salt()),
                (own.key(), own.salt()),
            )
            .ok_or_else(|| {
                tracing::warn!(
                    call = call.id,
                    suite = own.suite.sdes_name(),
                    "calls: SDES keys of the wrong length for their suite"
                );
                EndReason::MediaSecurityFailed
            })
        };
        let (pbx_srtp, pbx_dtls) = match &pbx {
            PbxLeg::Plain => (None, None),
            PbxLeg::Sdes {
                own,
                peer: Some(peer),
            } => (Some(session(own, peer)?), None),
            PbxLeg::Dtls {
                peer: Some(peer), ..
            } => (None, Some(peer.clone())),
            PbxLeg::Sdes { peer: None, .. } | PbxLeg::Dtls { peer: None, .. } => {
                return Err(EndReason::MediaSecurityFailed);
            }
        };
        let (app_srtp, dtls_peer) = match &app {
            AppLeg::Plain => (None, None),
            AppLeg::Sdes {
                own,
                peer: Some(peer),
            } => (Some(session(own, peer)?), None),
            AppLeg::Dtls {
                peer: Some(peer), ..
            } => (None, Some(peer.clone())),
            AppLeg::Sdes { peer: None, .. } | AppLeg::Dtls { peer: None, .. } => {
                return Err(EndReason::MediaSecurityFailed);
            }
        };
        let state = |dtls: bool| {
            if dtls {
                DtlsState::Connecting
            } else {
                DtlsState::None
            }
        };
        let bridge = Arc::new(Bridge::new(
            app_srtp,
            pbx_srtp,
            [!matches!(app, AppLeg::Plain), !matches!(pbx, PbxLeg::Plain)],
            [state(dtls_peer.is_some()), state(pbx_dtls.is_some())],
            call.routes(),
        ));
        call.inner().bridge = Some(bridge.clone());
        let (app_records, app_queue) = dtls::record_queue();
        let (pbx_records, pbx_queue) = dtls::record_queue();
        self.carry_bridged_media(call, &bridge, conn.clone(), [app_records, pbx_records]);
        let toward_app = async {
            match dtls_peer {
                Some((fingerprint, role)) => {
                    self.dtls_leg(call, &bridge, APP, conn, app_queue, role, &fingerprint)
                        .await
                }
                None => Ok(()),
            }
        };
        let toward_pbx = async {
            match pbx_dtls {
                Some((fingerprint, role)) => {
                    // Toward the PBX's address as its SDP gave it, from the call's LAN port.
                    let conn: IceConn =
                        Arc::new(dtls::Peer::new(call.lan_socket.clone(), call.pbx()));
                    self.dtls_leg(call, &bridge, PBX, conn, pbx_queue, role, &fingerprint)
                        .await
                }
                None => Ok(()),
            }
        };
        tokio::try_join!(toward_app, toward_pbx).map(|_| ())
    }

    /// One leg's DTLS handshake (`leg`: APP or PBX) on `conn` with the records `queue`
    /// gets; its keys go to the bridge. A failure ends the call.
    #[allow(clippy::too_many_arguments)]
    async fn dtls_leg(
        &self,
        call: &Call,
        bridge: &Bridge,
        leg: usize,
        conn: IceConn,
        queue: mpsc::Receiver<Vec<u8>>,
        role: dtls::Role,
        fingerprint: &crate::media::Fingerprint,
    ) -> Result<(), EndReason> {
        let side = if leg == APP { "app" } else { "PBX" };
        match dtls::handshake(
            &self.identity,
            conn,
            queue,
            role,
            fingerprint,
            self.dtls_timeout,
        )
        .await
        {
            Ok(done) => {
                tracing::info!(
                    call = call.id,
                    ?role,
                    suite = done.srtp.suite().sdes_name(),
                    "calls: DTLS-SRTP with the {side} established"
                );
                if leg == APP {
                    *bridge.app.lock().expect("bridge app leg") = Some(done.srtp);
                } else {
                    *bridge.pbx.lock().expect("bridge pbx leg") = Some(done.srtp);
                }
                bridge.keyed.notify_one();
                bridge.dtls.lock().expect("bridge dtls")[leg] = DtlsState::Connected;
                bridge.associations.lock().await.push(done.conn);
                Ok(())
            }
            Err(err) => {
                bridge.dtls.lock().expect("bridge dtls")[leg] = DtlsState::Failed;
                tracing::info!(call = call.id, %err, "calls: DTLS with the {side} failed; the call ends");
                Err(match err {
                    DtlsError::Timeout(_) => EndReason::DtlsTimeout,
                    _ => EndReason::DtlsFailed,
                })
            }
        }
    }

    /// The tasks that carry a bridged call's packets both ways; DTLS records from the app
    /// and (when its leg is DTLS) from the PBX go to `records`, the app's and the PBX's.
    pub(super) fn carry_bridged_media(
        &self,
        call: &Arc<Call>,
        bridge: &Arc<Bridge>,
        conn: IceConn,
        [records, pbx_records]: [mpsc::Sender<Vec<u8>>; 2],
    ) {
        let from_app = {
            let (conn, call, bridge) = (conn.clone(), call.clone(), bridge.clone());
            tokio::spawn(async move {
                // Room after what is read for what protection adds.
                let mut buf = vec![0u8; PACKET_ROOM + MAX_OVERHEAD];
                let mut early: Vec<(Vec<u8>, usize)> = Vec::new();
                loop {
                    let n = tokio::select! {
                        received = conn.recv(&mut buf[..PACKET_ROOM]) => match received {
                            Ok(n) => n,
                            Err(_) => return,
                        },
                        _ = bridge.keyed.notified(), if !early.is_empty() => {
                            if bridge.waits_for_either() {
                                continue;
                            }
                            for (mut packet, len) in std::mem::take(&mut early) {
                                to_pbx(&call, &bridge, &mut packet, len).await;
                            }
                            continue;
                        }
                    };
                    match demux(&buf[..n]) {
                        Demux::Dtls => {
                            // A full queue means a handshake that is not reading: dropped,
                            // as the network might (DTLS retransmits).
                            let _ = records.try_send(buf[..n].to_vec());
                        }
                        Demux::Rtp if bridge.waits_for_either() => {
                            if early.len() < EARLY_SRTP {
                                early.push((buf[..n + MAX_OVERHEAD].to_vec(), n));
                            }
                        }
                        Demux::Rtp => {
                            // Keys that came between two packets: what waited goes first.
                            for (mut packet, len) in std::mem::take(&mut early) {
                                to_pbx(&call, &bridge, &mut packet, len).await;
                            }
                            to_pbx(&call, &bridge, &mut buf, n).await;
                        }
                        Demux::Other => bridge.counters.refused(SrtpError::Malformed),
                    }
                }
            })
        };
        let pbx_dtls = bridge.dtls.lock().expect("bridge dtls")[PBX] != DtlsState::None;
        // `stream`: 0 for the audio, k + 1 for the call's kth other stream.
        let from_pbx = |socket: Arc<tokio::net::UdpSocket>, stream: usize, rtcp: bool| {
            let (conn, call, bridge) = (conn.clone(), call.clone(), bridge.clone());
            let pbx_records = pbx_records.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; PACKET_ROOM + MAX_OVERHEAD];
                while let Ok((n, from)) = socket.recv_from(&mut buf[..PACKET_ROOM]).await {
                    // Strict source: only the PBX's RTP (or RTCP) address of the stream.
                    if Some(from) != call.pbx_address(stream, rtcp) {
                        continue;
                    }
                    if pbx_dtls && demux(&buf[..n]) == Demux::Dtls {
                        // As from the app: a handshake that is not reading drops it.
                        let _ = pbx_records.try_send(buf[..n].to_vec());
                        continue;
                    }
                    if !rtcp {
                        bridge.routes.learn_pbx(&buf[..n], stream);
                    }
                    let Some(len) = bridge.pbx_to_app(&mut buf, n) else {
                        continue;
                    };
                    if conn.send(&buf[..len]).await.is_ok() {
                        bridge.counters.to_app(len, monotonic_ns());
                    }
                }
            })
        };
        let mut tasks = vec![
            from_app,
            from_pbx(call.lan_socket.clone(), 0, false),
            from_pbx(call.rtcp_socket.clone(), 0, true),
        ];
        for (k, stream) in call.streams.iter().enumerate() {
            tasks.push(from_pbx(stream.rtp.clone(), k + 1, false));
            tasks.push(from_pbx(stream.rtcp.clone(), k + 1, true));
        }
        call.inner().tasks.extend(tasks);
    }
}

/// An app packet (`buf[..len]`) to the PBX, unprotected (and protected again) as the legs
/// need, where it is, on its stream's ports; RTCP to the PBX's RTCP port when it keeps one.
async fn to_pbx(call: &Call, bridge: &Bridge, buf: &mut [u8], len: usize) {
    let Some(len) = bridge.app_to_pbx(buf, len) else {
        return;
    };
    let out = &buf[..len];
    let rtcp = is_rtcp(out);
    // A call with other streams has plain RTP toward the PBX (MediaPlan::bundles_streams):
    // what is read here is the packet as the app sent it.
    let stream = bridge.routes.app_stream(out, rtcp);
    let (rtp_socket, rtcp_socket) = match stream.checked_sub(1) {
        None => (&call.lan_socket, &call.rtcp_socket),
        Some(k) => match call.streams.get(k) {
            Some(other) => (&other.rtp, &other.rtcp),
            None => return,
        },
    };
    let sent = match (
        call.pbx_address(stream, true),
        call.pbx_address(stream, false),
    ) {
        (Some(to), _) if rtcp => rtcp_socket.send_to(out, to).await,
        (_, Some(to)) => rtp_socket.send_to(out, to).await,
        // A stream the PBX refused: nothing to send it to.
        (_, None) => return,
    };
    if sent.is_ok() {
        bridge.counters.to_pbx(len, monotonic_ns());
    }
}
