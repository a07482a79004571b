//! Calls driven directly, without a network namespace: an ICE port on loopback, a flow
//! table over the in-memory datapath, and a recorder where events go. What happens once
//! ICE connects is the namespace tests' (tests/tests/calls*.rs).

use std::sync::{Arc, Mutex};

use super::*;
use crate::datapath::memory::Memory;

const PBX_OFFER: &str = include_str!("../../../fixtures/sdp/pbx-plain-rtp-offer.sdp");
const APP_OFFER: &str = include_str!("../../../fixtures/sdp/webrtc-client-offer.sdp");

/// Who is online, and every event in the order it was delivered, with where it went
/// (`Some(user)`: that user's apps; `None`: the tenant's controller).
#[derive(Default)]
struct Recorder {
    apps: Vec<(&'static str, &'static str)>,
    controllers: Vec<&'static str>,
    /// Users with devices registered for pushes, and how long a pushed call rings.
    devices: Vec<(&'static str, &'static str)>,
    ring: Option<Duration>,
    /// Every push fails.
    undelivered: bool,
    /// The pushes of calls that ring.
    ringing: Mutex<Vec<tokio::sync::oneshot::Sender<String>>>,
    events: Mutex<Vec<(String, Option<String>, CallEvent)>>,
}

impl Recorder {
    fn events(&self) -> Vec<(String, Option<String>, CallEvent)> {
        self.events.lock().unwrap().clone()
    }
}

impl Notify for Recorder {
    fn is_online(&self, tenant: &str, user: &str) -> bool {
        self.apps.contains(&(tenant, user))
    }

    fn to_app(&self, tenant: &str, user: &str, event: &CallEvent) -> usize {
        if !self.is_online(tenant, user) {
            return 0;
        }
        self.events
            .lock()
            .unwrap()
            .push((tenant.into(), Some(user.into()), event.clone()));
        1
    }

    fn to_controller(&self, tenant: &str, event: &CallEvent) -> bool {
        if !self.controllers.contains(&tenant) {
            return false;
        }
        self.events
            .lock()
            .unwrap()
            .push((tenant.into(), None, event.clone()));
        true
    }

    fn wake(&self, tenant: &str, user: &str, _call: u64, _caller: Option<&str>) -> Option<Woken> {
        if !self.devices.contains(&(tenant, user)) {
            return None;
        }
        let (tx, undelivered) = tokio::sync::oneshot::channel();
        if self.undelivered {
            let _ = tx.send("HTTP 503".to_owned());
        } else {
            // Kept: neither delivered nor failed while the call rings.
            self.ringing.lock().unwrap().push(tx);
        }
        Some(Woken {
            devices: 1,
            undelivered,
        })
    }

    fn ring_time(&self) -> Option<Duration> {
        self.ring
    }
}

/// Calls whose media passes through as each side wrote it, as the namespace tests' lab.
async fn start(recorder: Recorder) -> (Arc<Calls>, Arc<Recorder>) {
    start_with(recorder, config::AppMedia::AsPbx, config::PbxMedia::AsApp).await
}

async fn start_with(
    recorder: Recorder,
    app_media: config::AppMedia,
    pbx_media: config::PbxMedia,
) -> (Arc<Calls>, Arc<Recorder>) {
    let table = Arc::new(FlowTable::new(
        Box::new(Arc::new(Memory::default())),
        60,
        monotonic_ns(),
    ));
    let recorder = Arc::new(recorder);
    let config = config::CallsConfig {
        enabled: true,
        ice_listen: "127.0.0.1:0".into(),
        lan_address: "127.0.0.1".into(),
        port_range: "47000-47999".into(),
        app_media,
        pbx_media,
        ..config::CallsConfig::default()
    };
    let calls = Calls::new(&config, table, recorder.clone(), None, None)
        .await
        .expect("calls on loopback");
    (Arc::new(calls), recorder)
}

fn acme() -> Recorder {
    Recorder {
        apps: vec![("acme", "alice")],
        controllers: vec!["acme"],
        ..Recorder::default()
    }
}

fn controller(tenant: &str) -> Requester {
    Requester::Controller {
        tenant: tenant.into(),
    }
}

fn app(tenant: &str, user: &str) -> Requester {
    Requester::App {
        tenant: tenant.into(),
        user: user.into(),
    }
}

#[tokio::test]
async fn the_pbx_calls_an_online_app_and_the_app_gets_the_relays_ice() {
    let (calls, recorder) = start(acme()).await;
    let id = calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    let events = recorder.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let (
        tenant,
        to,
        CallEvent::Incoming {
            call, user, sdp, ..
        },
    ) = &events[0]
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        (tenant.as_str(), to.as_deref(), *call, user),
        ("acme", Some("alice"), id, &None)
    );
    let offer = sdp::audio(sdp).unwrap();
    assert!(
        offer.ice_ufrag.is_some() && offer.ice_pwd.is_some(),
        "{sdp}"
    );
    assert!(
        offer
            .candidates
            .iter()
            .any(|c| c.contains(&calls.ice_address().port().to_string())),
        "the relay's ICE port is the candidate: {sdp}"
    );
    assert!(
        !sdp.contains("10.20.0.5"),
        "no PBX address toward the app: {sdp}"
    );
    let list = calls.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, "offered");
    assert_eq!(list[0].pbx, Some("10.20.0.5:16384".parse().unwrap()));
    assert!(list[0].flows.is_empty(), "no media before ICE");
    // Who may see it again after a reconnect: the user and the tenant's controller.
    assert_eq!(calls.resumable(&app("acme", "alice")).len(), 1);
    assert_eq!(calls.resumable(&controller("acme")).len(), 1);
    assert!(calls.resumable(&app("acme", "bob")).is_empty());
    assert!(calls.resumable(&controller("globex")).is_empty());
}

#[tokio::test]
async fn refused_requests_say_why_and_leave_the_call_as_it_was() {
    let (calls, recorder) = start(acme()).await;
    let id = calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    let refusals = [
        (
            calls
                .create(&app("acme", "alice"), "bob", PBX_OFFER, None)
                .await,
            "only controllers create calls",
        ),
        (
            calls
                .create(&controller("acme"), "carol", PBX_OFFER, None)
                .await,
            "user carol has no session connected",
        ),
        (
            calls
                .create(&controller("acme"), "alice", PBX_OFFER, Some("a\nb"))
                .await,
            "caller: 1 to 128 characters",
        ),
        (
            calls
                .create(&controller("acme"), "alice", "v=0\r\nbroken", None)
                .await,
            "sdp: ",
        ),
    ];
    for (result, message) in refusals {
        let err = result.unwrap_err();
        assert!(err.to_string().contains(message), "{err} / {message}");
    }
    let err = calls
        .answer(&controller("acme"), id, PBX_OFFER)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Forbidden(format!("call: {id}: the other side answers this call"))
    );
    let err = calls
        .update(&app("acme", "alice"), id, APP_OFFER)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::BadRequest(format!(
            "call: {id}: not connected yet (offered); update once connected"
        ))
    );
    assert!(matches!(
        calls.candidate(&controller("acme"), id, "1 1 udp 1 192.0.2.1 9 typ host"),
        Err(CallError::Forbidden(_))
    ));
    // Another tenant's controller, another user, a call that never was: no such call.
    for (who, call) in [
        (controller("globex"), id),
        (app("acme", "bob"), id),
        (controller("acme"), id + 100),
    ] {
        assert_eq!(
            calls.hangup(&who, call).await,
            Err(CallError::NoSuchCall(call))
        );
    }
    assert_eq!(calls.len(), 1);
    assert_eq!(calls.list()[0].state, "offered");
    assert_eq!(recorder.events().len(), 1, "only the first call.incoming");
}

#[tokio::test]
async fn a_hangup_tells_the_other_side_and_counts_the_reason() {
    let (calls, recorder) = start(acme()).await;
    let id = calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    calls.hangup(&controller("acme"), id).await.unwrap();
    let events = recorder.events();
    assert_eq!(
        events.last().unwrap(),
        &(
            "acme".to_owned(),
            Some("alice".to_owned()),
            CallEvent::Ended {
                call: id,
                reason: EndReason::Hangup
            }
        ),
        "the app is told; the controller that hung up is not: {events:?}"
    );
    assert_eq!(events.len(), 2);
    assert!(calls.is_empty());
    assert_eq!(calls.tally().ended.get(&EndReason::Hangup), Some(&1));
    assert_eq!(
        calls.hangup(&controller("acme"), id).await,
        Err(CallError::NoSuchCall(id))
    );
}

/// An app's answer to the PBX's plain offer passed through: plain RTP, with ICE.
fn plain_app_answer() -> String {
    PBX_OFFER.replace("10.20.0.5", "192.0.2.7").replace(
        "a=sendrecv",
        "a=sendrecv\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijklmn",
    )
}

#[tokio::test]
async fn the_app_answers_and_the_controller_gets_the_answer_for_the_pbx() {
    let (calls, recorder) = start(acme()).await;
    let id = calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    calls
        .answer(&app("acme", "alice"), id, &plain_app_answer())
        .await
        .unwrap();
    assert_eq!(calls.list()[0].state, "connecting");
    let events = recorder.events();
    let answered = events
        .iter()
        .find_map(|(_, to, event)| match event {
            CallEvent::Answered { call, sdp } if to.is_none() && *call == id => Some(sdp),
            _ => None,
        })
        .expect("call.answered to the controller");
    let pbx_side = sdp::audio(answered).unwrap();
    assert_eq!(
        pbx_side.rtp.ip().to_string(),
        "127.0.0.1",
        "the relay's LAN address"
    );
    assert!(
        pbx_side.ice_ufrag.is_none(),
        "no ICE toward the PBX: {answered}"
    );
    assert_eq!(
        calls
            .answer(&app("acme", "alice"), id, &plain_app_answer())
            .await,
        Err(CallError::BadRequest("the call is already answered".into()))
    );
}

#[tokio::test]
async fn an_app_calls_out_and_the_controller_gets_the_offer_for_the_pbx() {
    let (calls, recorder) = start(acme()).await;
    let id = calls
        .create_from_app(&app("acme", "alice"), APP_OFFER)
        .await
        .unwrap();
    let events = recorder.events();
    let [
        (
            tenant,
            None,
            CallEvent::Incoming {
                call, user, sdp, ..
            },
        ),
    ] = &events[..]
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        (tenant.as_str(), *call, user.as_deref()),
        ("acme", id, Some("alice"))
    );
    let pbx_side = sdp::audio(sdp).unwrap();
    assert_eq!(pbx_side.rtp.ip().to_string(), "127.0.0.1");
    assert!(
        !pbx_side.rtcp_mux,
        "RTCP on its own port toward the PBX: {sdp}"
    );
    // The app's own call: the app does not answer it, its controller does.
    assert!(matches!(
        calls.answer(&app("acme", "alice"), id, APP_OFFER).await,
        Err(CallError::Forbidden(_))
    ));
    // Without ICE credentials, or without a controller online: refused.
    let no_ice: String = APP_OFFER
        .lines()
        .filter(|line| !line.starts_with("a=ice-"))
        .map(|line| format!("{line}\r\n"))
        .collect();
    assert_eq!(
        calls.create_from_app(&app("acme", "alice"), &no_ice).await,
        Err(CallError::BadRequest(
            "sdp: the offer has no ICE credentials (a=ice-ufrag, a=ice-pwd)".into()
        ))
    );
    let (lonely, _) = start(Recorder {
        apps: vec![("acme", "alice")],
        ..Recorder::default()
    })
    .await;
    assert!(matches!(
        lonely
            .create_from_app(&app("acme", "alice"), APP_OFFER)
            .await,
        Err(CallError::Offline(_))
    ));
    assert!(lonely.is_empty());
}

#[tokio::test]
async fn a_stopping_relay_ends_every_call_for_both_sides() {
    let (calls, recorder) = start(acme()).await;
    let first = calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    let second = calls
        .create_from_app(&app("acme", "alice"), APP_OFFER)
        .await
        .unwrap();
    calls.stop().await;
    assert!(calls.is_empty());
    let ended: Vec<(Option<String>, u64)> = recorder
        .events()
        .into_iter()
        .filter_map(|(_, to, event)| match event {
            CallEvent::Ended {
                call,
                reason: EndReason::RelayStopped,
            } => Some((to, call)),
            _ => None,
        })
        .collect();
    for call in [first, second] {
        assert!(ended.contains(&(None, call)), "{ended:?}");
        assert!(ended.contains(&(Some("alice".into()), call)), "{ended:?}");
    }
    assert_eq!(calls.tally().ended.get(&EndReason::RelayStopped), Some(&2));
}

/// The SDP of the last offer or answer to the controller, or to the app.
fn sdp_of(recorder: &Recorder, to_controller: bool) -> String {
    recorder
        .events()
        .into_iter()
        .rev()
        .find_map(|(_, to, event)| match event {
            CallEvent::Incoming { sdp, .. } | CallEvent::Answered { sdp, .. }
                if to.is_none() == to_controller =>
            {
                Some(sdp)
            }
            _ => None,
        })
        .expect("an SDP")
}

#[tokio::test]
async fn a_webrtc_app_called_by_a_plain_pbx_gets_dtls_srtp_and_a_plain_answer_is_refused() {
    let (calls, recorder) =
        start_with(acme(), config::AppMedia::DtlsSrtp, config::PbxMedia::Rtp).await;
    let id = calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    let offer = sdp_of(&recorder, false);
    let endpoint = sdp::audio(&offer).unwrap();
    assert_eq!(endpoint.proto, "UDP/TLS/RTP/SAVPF", "{offer}");
    assert_eq!(
        endpoint.security,
        Ok(crate::media::Security::Dtls {
            fingerprint: calls.identity.fingerprint().clone(),
            setup: crate::media::Setup::ActPass,
        })
    );
    assert!(offer.contains("a=group:BUNDLE 0\r\n"), "{offer}");
    // A plain answer to a DTLS offer would carry nothing: refused, the call still offered.
    let err = calls
        .answer(&app("acme", "alice"), id, &plain_app_answer())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("m=audio (m-line 1): the answer is RTP/AVP (rtp)"),
        "{err}"
    );
    assert_eq!(calls.list()[0].state, "offered");
    // The browser's answer: DTLS, active. The PBX gets plain RTP from the relay.
    let browser_answer = APP_OFFER.replace("a=setup:actpass", "a=setup:active");
    calls
        .answer(&app("acme", "alice"), id, &browser_answer)
        .await
        .unwrap();
    let toward_pbx = sdp_of(&recorder, true);
    let pbx_side = sdp::audio(&toward_pbx).unwrap();
    assert_eq!(pbx_side.proto, "RTP/AVP", "{toward_pbx}");
    assert_eq!(pbx_side.security, Ok(crate::media::Security::Plain));
    assert!(!toward_pbx.contains("a=fingerprint"), "{toward_pbx}");
    let listed = &calls.list()[0];
    assert_eq!(
        (listed.app_security, listed.pbx_security),
        ("dtls-srtp", "rtp")
    );
}

#[tokio::test]
async fn a_webrtc_app_calling_a_plain_pbx_is_answered_with_the_relays_dtls() {
    let (calls, recorder) =
        start_with(acme(), config::AppMedia::DtlsSrtp, config::PbxMedia::Rtp).await;
    let id = calls
        .create_from_app(&app("acme", "alice"), APP_OFFER)
        .await
        .unwrap();
    let toward_pbx = sdp_of(&recorder, true);
    assert!(toward_pbx.contains("m=audio "), "{toward_pbx}");
    assert_eq!(sdp::audio(&toward_pbx).unwrap().proto, "RTP/AVP");
    // The PBX answers with a profile the relay did not offer: refused, naming the line.
    let sdes_answer = PBX_OFFER.replace("RTP/AVP", "RTP/SAVP");
    let err = calls
        .answer(&controller("acme"), id, &sdes_answer)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the answer is RTP/SAVP (sdes-srtp), the offer was RTP/AVP (rtp)"),
        "{err}"
    );
    calls
        .answer(&controller("acme"), id, PBX_OFFER)
        .await
        .unwrap();
    let toward_app = sdp_of(&recorder, false);
    let endpoint = sdp::audio(&toward_app).unwrap();
    assert_eq!(
        endpoint.security,
        Ok(crate::media::Security::Dtls {
            fingerprint: calls.identity.fingerprint().clone(),
            setup: crate::media::Setup::Passive,
        }),
        "the relay is the DTLS server: {toward_app}"
    );
    assert!(toward_app.contains("a=mid:0\r\n"), "{toward_app}");
    assert!(toward_app.contains("a=group:BUNDLE 0\r\n"), "{toward_app}");
    assert_eq!(calls.list()[0].state, "connecting");
}

/// A call for a user with no app connected: with a device registered, the controller hears
/// `ringing` and the call waits the ring time, then ends `no-answer`; without one the user
/// is offline and nothing of the call stays.
#[tokio::test]
async fn a_call_for_a_sleeping_app_rings_its_devices_then_ends_unanswered() {
    let (calls, recorder) = start(Recorder {
        apps: vec![],
        controllers: vec!["acme"],
        devices: vec![("acme", "alice")],
        ring: Some(Duration::from_millis(300)),
        ..Recorder::default()
    })
    .await;
    let id = calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    assert_eq!(calls.len(), 1);
    assert!(
        matches!(
            recorder.events().as_slice(),
            [(_, None, CallEvent::State { change: StateChange::Ringing { devices: 1 }, call })] if *call == id
        ),
        "{:?}",
        recorder.events()
    );
    let refused = calls
        .create(&controller("acme"), "carol", PBX_OFFER, None)
        .await;
    assert!(
        matches!(&refused, Err(CallError::Offline(message)) if message.contains("no device registered")),
        "{refused:?}"
    );
    assert_eq!(calls.len(), 1, "nothing of carol's call stays");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(calls.len(), 0);
    assert!(
        recorder.events().iter().any(|(_, to, event)| to.is_none()
            && matches!(
                event,
                CallEvent::Ended {
                    reason: EndReason::NoAnswer,
                    ..
                }
            )),
        "{:?}",
        recorder.events()
    );
}

/// Pushes that reach none of the user's devices end the call `offline` at once.
#[tokio::test]
async fn a_call_whose_pushes_all_fail_ends_offline() {
    let (calls, recorder) = start(Recorder {
        controllers: vec!["acme"],
        devices: vec![("acme", "alice")],
        ring: Some(Duration::from_secs(30)),
        undelivered: true,
        ..Recorder::default()
    })
    .await;
    calls
        .create(&controller("acme"), "alice", PBX_OFFER, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls.len(), 0);
    assert!(
        recorder.events().iter().any(|(_, to, event)| to.is_none()
            && matches!(
                event,
                CallEvent::Ended {
                    reason: EndReason::Offline,
                    ..
                }
            )),
        "{:?}",
        recorder.events()
    );
}
