//! Which media security each leg of a call gets (docs/calls-design.md, "Media security"),
//! decided from the two sides' SDPs and `[calls]` policy, as rtpengine's
//! `transport-protocol`, `DTLS` and `SDES` options do: sans-IO, one function per step of
//! the offer/answer.

use super::{CallError, config::AppMedia, config::PbxMedia};
use crate::{
    media::{Crypto, Fingerprint, Security, Setup, Suite, dtls::Role},
    session::sdp::{AudioEndpoint, Secure},
};

/// How a call's media is secured, as negotiated so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MediaPlan {
    /// Both legs carry what one side wrote (or nothing): the kernel forwards untouched.
    #[default]
    PassThrough,
    /// The relay terminates each leg's security and carries the media itself. The
    /// profiles are what the relay writes toward each side: an answer's is the offer's
    /// (RFC 3264 section 6).
    Bridged {
        app: AppLeg,
        pbx: PbxLeg,
        app_proto: String,
        pbx_proto: String,
    },
}

/// The app leg of a bridged call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppLeg {
    Plain,
    Sdes {
        own: Crypto,
        /// The app's key, once its SDP gave it.
        peer: Option<Crypto>,
    },
    Dtls {
        /// What the relay's SDP says: `actpass` in an offer, its role in an answer.
        setup: Setup,
        /// The app's certificate fingerprint and the relay's role, once its SDP gave them.
        peer: Option<(Fingerprint, Role)>,
    },
}

/// The PBX leg of a bridged call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PbxLeg {
    Plain,
    Sdes {
        own: Crypto,
        peer: Option<Crypto>,
    },
    /// DTLS-SRTP toward the PBX (it offered it, or `pbx_media` offers it): the relay's
    /// own certificate, one transport per m-line as the PBX writes it (no BUNDLE).
    Dtls {
        /// What the relay's SDP says: `actpass` in an offer, its role in an answer.
        setup: Setup,
        /// The PBX's certificate fingerprint and the relay's role, once its SDP gave them.
        peer: Option<(Fingerprint, Role)>,
    },
}

impl MediaPlan {
    /// The PBX calls: what the relay offers the app, from the PBX's offer and policy.
    pub fn for_pbx_offer(pbx: &AudioEndpoint, policy: AppMedia) -> Result<MediaPlan, CallError> {
        if policy == AppMedia::AsPbx {
            return Ok(MediaPlan::PassThrough);
        }
        let pbx_leg = match pbx.security.clone()? {
            Security::Plain => PbxLeg::Plain,
            Security::Sdes(keys) => {
                let (own, peer) = answer_keys(&keys);
                PbxLeg::Sdes {
                    own,
                    peer: Some(peer),
                }
            }
            // RFC 5763 section 5: the answerer of actpass is active. The relay starts the
            // handshake toward the PBX as soon as the call's media is bridged.
            Security::Dtls { fingerprint, setup } => {
                muxed_dtls(pbx, "offers")?;
                let (setup, role) = match setup {
                    Setup::Active => (Setup::Passive, Role::Server),
                    Setup::Passive | Setup::ActPass => (Setup::Active, Role::Client),
                };
                PbxLeg::Dtls {
                    setup,
                    peer: Some((fingerprint, role)),
                }
            }
        };
        let app = match policy {
            AppMedia::DtlsSrtp => AppLeg::Dtls {
                setup: Setup::ActPass,
                peer: None,
            },
            AppMedia::SdesSrtp => AppLeg::Sdes {
                own: Crypto::generate(1, Suite::AesCm128HmacSha1_80),
                peer: None,
            },
            AppMedia::AsPbx => unreachable!("returned above"),
        };
        let app_proto = match app {
            AppLeg::Dtls { .. } => "UDP/TLS/RTP/SAVPF",
            _ => "RTP/SAVPF",
        };
        Ok(MediaPlan::Bridged {
            app,
            pbx: pbx_leg,
            app_proto: app_proto.to_owned(),
            pbx_proto: pbx.proto.clone(),
        })
    }

    /// The app calls: what the relay offers the PBX and answers the app, from the app's
    /// offer and policy.
    pub fn for_app_offer(app: &AudioEndpoint, policy: PbxMedia) -> Result<MediaPlan, CallError> {
        if policy == PbxMedia::AsApp {
            return Ok(MediaPlan::PassThrough);
        }
        let app_leg = match app.security.clone()? {
            Security::Plain => AppLeg::Plain,
            Security::Sdes(keys) => {
                let (own, peer) = answer_keys(&keys);
                AppLeg::Sdes {
                    own,
                    peer: Some(peer),
                }
            }
            Security::Dtls { fingerprint, setup } => {
                // RFC 5763 section 5: the answerer of actpass should be active, but a
                // relay behind which the app's peer sits is the server where it may be:
                // the app then starts the handshake once ICE has connected.
                let (setup, role) = match setup {
                    Setup::Passive => (Setup::Active, Role::Client),
                    Setup::Active | Setup::ActPass => (Setup::Passive, Role::Server),
                };
                AppLeg::Dtls {
                    setup,
                    peer: Some((fingerprint, role)),
                }
            }
        };
        let (pbx, pbx_proto) = match policy {
            PbxMedia::Rtp => (PbxLeg::Plain, "RTP/AVP"),
            PbxMedia::SdesSrtp => (
                PbxLeg::Sdes {
                    own: Crypto::generate(1, Suite::AesCm128HmacSha1_80),
                    peer: None,
                },
                "RTP/SAVP",
            ),
            PbxMedia::DtlsSrtp => (
                PbxLeg::Dtls {
                    setup: Setup::ActPass,
                    peer: None,
                },
                "UDP/TLS/RTP/SAVP",
            ),
            PbxMedia::AsApp => unreachable!("returned above"),
        };
        if (&app_leg, &pbx) == (&AppLeg::Plain, &PbxLeg::Plain) {
            return Ok(MediaPlan::PassThrough);
        }
        Ok(MediaPlan::Bridged {
            app: app_leg,
            pbx,
            app_proto: app.proto.clone(),
            pbx_proto: pbx_proto.to_owned(),
        })
    }

    /// The app's answer to the relay's offer: its key or its certificate and role.
    pub fn app_answered(&mut self, answer: &AudioEndpoint) -> Result<(), CallError> {
        let MediaPlan::Bridged { app, .. } = self else {
            return Ok(());
        };
        match (app, answer.security.clone()?) {
            (AppLeg::Sdes { own, peer }, Security::Sdes(keys)) => {
                *peer = Some(matching_key(own, &keys, answer)?);
            }
            (AppLeg::Dtls { peer, setup: own }, Security::Dtls { fingerprint, setup }) => {
                (*own, *peer) = dtls_answered(fingerprint, setup, answer)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The PBX's answer to the relay's offer: its key or its certificate and role.
    pub fn pbx_answered(&mut self, answer: &AudioEndpoint) -> Result<(), CallError> {
        let MediaPlan::Bridged { pbx, .. } = self else {
            return Ok(());
        };
        match (pbx, answer.security.clone()?) {
            (PbxLeg::Sdes { own, peer }, Security::Sdes(keys)) => {
                *peer = Some(matching_key(own, &keys, answer)?);
            }
            (PbxLeg::Dtls { peer, setup: own }, Security::Dtls { fingerprint, setup }) => {
                muxed_dtls(answer, "answers")?;
                (*own, *peer) = dtls_answered(fingerprint, setup, answer)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether the call anchors its other streams (video) besides the audio: bridged,
    /// with one BUNDLE transport toward a DTLS-SRTP app (its keys cover every stream) and
    /// plain RTP toward the PBX (each stream needs only its own ports there). With SDES or
    /// DTLS toward the PBX every stream would need keys of its own: those calls carry
    /// their audio only.
    pub fn bundles_streams(&self) -> bool {
        matches!(
            self,
            MediaPlan::Bridged {
                app: AppLeg::Dtls { .. },
                pbx: PbxLeg::Plain,
                ..
            }
        )
    }

    /// Whether the PBX leg is DTLS-SRTP: its RTCP is multiplexed.
    pub fn dtls_pbx(&self) -> bool {
        matches!(
            self,
            MediaPlan::Bridged {
                pbx: PbxLeg::Dtls { .. },
                ..
            }
        )
    }

    /// What the relay writes toward the app; `mids` are the m-lines' (the app's offer's,
    /// when answering it).
    pub fn toward_app<'a>(
        &'a self,
        fingerprint: &'a Fingerprint,
        mids: &'a [String],
    ) -> Secure<'a> {
        match self {
            MediaPlan::PassThrough => Secure::AsIs,
            MediaPlan::Bridged { app, app_proto, .. } => match app {
                AppLeg::Plain => Secure::Plain { proto: app_proto },
                AppLeg::Sdes { own, .. } => Secure::Sdes {
                    proto: app_proto,
                    crypto: own,
                },
                AppLeg::Dtls { setup, .. } => Secure::Dtls {
                    proto: app_proto,
                    fingerprint,
                    setup: *setup,
                    mids,
                    bundle: true,
                },
            },
        }
    }

    /// What the relay writes toward the PBX (`fingerprint`: the relay's certificate's,
    /// for a DTLS PBX).
    pub fn toward_pbx<'a>(&'a self, fingerprint: &'a Fingerprint) -> Secure<'a> {
        match self {
            MediaPlan::PassThrough => Secure::AsIs,
            MediaPlan::Bridged { pbx, pbx_proto, .. } => match pbx {
                PbxLeg::Plain => Secure::Plain { proto: pbx_proto },
                PbxLeg::Sdes { own, .. } => Secure::Sdes {
                    proto: pbx_proto,
                    crypto: own,
                },
                PbxLeg::Dtls { setup, .. } => Secure::Dtls {
                    proto: pbx_proto,
                    fingerprint,
                    setup: *setup,
                    mids: &[],
                    bundle: false,
                },
            },
        }
    }

    /// Each leg's security as `call.state connected` and `relayctl calls` name it.
    pub fn names(&self) -> (&'static str, &'static str) {
        match self {
            MediaPlan::PassThrough => ("pass-through", "pass-through"),
            MediaPlan::Bridged { app, pbx, .. } => (
                match app {
                    AppLeg::Plain => "rtp",
                    AppLeg::Sdes { .. } => "sdes-srtp",
                    AppLeg::Dtls { .. } => "dtls-srtp",
                },
                match pbx {
                    PbxLeg::Plain => "rtp",
                    PbxLeg::Sdes { .. } => "sdes-srtp",
                    PbxLeg::Dtls { .. } => "dtls-srtp",
                },
            ),
        }
    }
}

/// The relay's answer to offered SDES keys: the first one it implements (they are in the
/// offerer's order of preference), and a fresh key of the same suite under the same tag
/// (RFC 4568 section 7.1.2): the relay's, the offerer's.
fn answer_keys(offered: &[Crypto]) -> (Crypto, Crypto) {
    let peer = offered[0].clone();
    (Crypto::generate(peer.tag, peer.suite), peer)
}

/// The relay runs one DTLS handshake toward a PBX, on its RTP port: RTCP must share it
/// (without rtcp-mux, RFC 5764 section 4.1 wants a second association on the RTCP port).
fn muxed_dtls(pbx: &AudioEndpoint, says: &str) -> Result<(), CallError> {
    if pbx.rtcp_mux {
        return Ok(());
    }
    Err(CallError::BadRequest(format!(
        "sdp: m=audio (m-line {}): the PBX {says} DTLS-SRTP without a=rtcp-mux; the relay runs DTLS on the RTP port only: enable rtcp-mux on the PBX (Asterisk: rtcp_mux = yes)",
        pbx.line
    )))
}

/// A side's DTLS answer to the relay's `actpass`: what the relay's later answers (to the
/// side's re-offers) say, and the side's certificate with the relay's role.
fn dtls_answered(
    fingerprint: Fingerprint,
    setup: Setup,
    answer: &AudioEndpoint,
) -> Result<(Setup, Option<(Fingerprint, Role)>), CallError> {
    let (role, relay_setup) = match setup {
        Setup::Active => (Role::Server, Setup::Passive),
        Setup::Passive => (Role::Client, Setup::Active),
        Setup::ActPass => {
            return Err(crate::session::sdp::SdpError::BadSetup { line: answer.line }.into());
        }
    };
    Ok((relay_setup, Some((fingerprint, role))))
}

/// The answer's key for the relay's offered one: same tag and suite.
fn matching_key(
    own: &Crypto,
    keys: &[Crypto],
    answer: &AudioEndpoint,
) -> Result<Crypto, CallError> {
    keys.iter()
        .find(|key| key.tag == own.tag && key.suite == own.suite)
        .cloned()
        .ok_or_else(|| {
            CallError::BadRequest(format!(
                "sdp: m=audio (m-line {}): the answer has no a=crypto line for the offered tag {} ({})",
                answer.line,
                own.tag,
                own.suite.sdes_name()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::sdp;

    const PBX_OFFER: &str = include_str!("../../../fixtures/sdp/pbx-plain-rtp-offer.sdp");
    const APP_OFFER: &str = include_str!("../../../fixtures/sdp/webrtc-client-offer.sdp");

    fn setup_toward_app(plan: &MediaPlan) -> Option<Setup> {
        let fingerprint = Fingerprint::sha256(b"relay");
        match plan.toward_app(&fingerprint, &[]) {
            Secure::Dtls { setup, .. } => Some(setup),
            _ => None,
        }
    }

    #[test]
    fn the_relays_dtls_role_follows_the_offer_answer() {
        // The PBX calls: the relay offers actpass; the browser answers active, so the
        // relay is the server and says passive from then on (answers to re-offers).
        let pbx = sdp::audio(PBX_OFFER).unwrap();
        let mut plan = MediaPlan::for_pbx_offer(&pbx, AppMedia::DtlsSrtp).unwrap();
        assert_eq!(setup_toward_app(&plan), Some(Setup::ActPass));
        let answer = sdp::audio(&APP_OFFER.replace("a=setup:actpass", "a=setup:active")).unwrap();
        plan.app_answered(&answer).unwrap();
        assert_eq!(setup_toward_app(&plan), Some(Setup::Passive));
        let MediaPlan::Bridged {
            app:
                AppLeg::Dtls {
                    peer: Some((_, role)),
                    ..
                },
            pbx_proto,
            ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((*role, pbx_proto.as_str()), (Role::Server, "RTP/AVP"));

        // The app calls with actpass: the relay answers passive (server); an app that
        // insists on passive gets an active relay (client).
        let app = sdp::audio(APP_OFFER).unwrap();
        let plan = MediaPlan::for_app_offer(&app, PbxMedia::Rtp).unwrap();
        assert_eq!(setup_toward_app(&plan), Some(Setup::Passive));
        assert_eq!(plan.names(), ("dtls-srtp", "rtp"));
        let passive = sdp::audio(&APP_OFFER.replace("a=setup:actpass", "a=setup:passive")).unwrap();
        let plan = MediaPlan::for_app_offer(&passive, PbxMedia::Rtp).unwrap();
        assert_eq!(setup_toward_app(&plan), Some(Setup::Active));
    }

    #[test]
    fn a_dtls_pbx_gets_the_relays_certificate_and_an_active_relay() {
        let fingerprint = Fingerprint::sha256(b"relay");
        // The PBX offers actpass: the relay answers active (the client), its own
        // certificate, no BUNDLE toward the PBX; the app leg is what policy says.
        let dtls_pbx = sdp::audio(APP_OFFER).unwrap();
        let plan = MediaPlan::for_pbx_offer(&dtls_pbx, AppMedia::DtlsSrtp).unwrap();
        assert_eq!(plan.names(), ("dtls-srtp", "dtls-srtp"));
        let Secure::Dtls {
            proto,
            setup,
            bundle,
            fingerprint: written,
            ..
        } = plan.toward_pbx(&fingerprint)
        else {
            panic!("{plan:?}")
        };
        assert_eq!(
            (proto, setup, bundle, written),
            (dtls_pbx.proto.as_str(), Setup::Active, false, &fingerprint)
        );
        let MediaPlan::Bridged {
            pbx:
                PbxLeg::Dtls {
                    peer: Some((theirs, role)),
                    ..
                },
            ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        let Ok(Security::Dtls {
            fingerprint: offered,
            ..
        }) = dtls_pbx.security.clone()
        else {
            panic!("{dtls_pbx:?}")
        };
        assert_eq!((theirs, *role), (&offered, Role::Client));
        // A PBX that insists on being active gets a passive relay (the server).
        let active = sdp::audio(&APP_OFFER.replace("a=setup:actpass", "a=setup:active")).unwrap();
        let plan = MediaPlan::for_pbx_offer(&active, AppMedia::SdesSrtp).unwrap();
        assert_eq!(plan.names(), ("sdes-srtp", "dtls-srtp"));
        assert!(matches!(
            plan.toward_pbx(&fingerprint),
            Secure::Dtls {
                setup: Setup::Passive,
                ..
            }
        ));
    }

    #[test]
    fn an_app_calling_a_dtls_only_pbx_offers_actpass_and_follows_the_answer() {
        let fingerprint = Fingerprint::sha256(b"relay");
        let app = sdp::audio(APP_OFFER).unwrap();
        let mut plan = MediaPlan::for_app_offer(&app, PbxMedia::DtlsSrtp).unwrap();
        assert_eq!(plan.names(), ("dtls-srtp", "dtls-srtp"));
        let pbx_setup = |plan: &MediaPlan| match plan.toward_pbx(&fingerprint) {
            Secure::Dtls {
                proto,
                setup,
                bundle: false,
                ..
            } => Some((proto.to_owned(), setup)),
            _ => None,
        };
        assert_eq!(
            pbx_setup(&plan),
            Some(("UDP/TLS/RTP/SAVP".to_owned(), Setup::ActPass))
        );
        // The PBX answers active: the relay is its server and says passive from then on.
        let active = sdp::audio(&APP_OFFER.replace("a=setup:actpass", "a=setup:active")).unwrap();
        plan.pbx_answered(&active).unwrap();
        assert_eq!(
            pbx_setup(&plan),
            Some(("UDP/TLS/RTP/SAVP".to_owned(), Setup::Passive))
        );
        assert!(matches!(
            &plan,
            MediaPlan::Bridged {
                pbx: PbxLeg::Dtls {
                    peer: Some((_, Role::Server)),
                    ..
                },
                ..
            }
        ));
        // An answer that leaves the choice open is refused naming the m-line, and so is
        // one whose RTCP would need a second handshake.
        let mut plan = MediaPlan::for_app_offer(&app, PbxMedia::DtlsSrtp).unwrap();
        assert!(plan.dtls_pbx());
        let err = plan.pbx_answered(&app).unwrap_err();
        assert!(err.to_string().contains("setup"), "{err}");
        let unmuxed = sdp::audio(
            &APP_OFFER
                .replace("a=setup:actpass", "a=setup:active")
                .replace("a=rtcp-mux\r\n", ""),
        )
        .unwrap();
        let err = plan.pbx_answered(&unmuxed).unwrap_err();
        assert!(err.to_string().contains("without a=rtcp-mux"), "{err}");
        let err = MediaPlan::for_pbx_offer(&unmuxed, AppMedia::DtlsSrtp).unwrap_err();
        assert!(
            err.to_string()
                .contains("offers DTLS-SRTP without a=rtcp-mux"),
            "{err}"
        );
    }

    #[test]
    fn pass_through_and_refusals() {
        let pbx = sdp::audio(PBX_OFFER).unwrap();
        assert_eq!(
            MediaPlan::for_pbx_offer(&pbx, AppMedia::AsPbx).unwrap(),
            MediaPlan::PassThrough
        );
        // A plain app and a plain PBX need nothing of the relay.
        assert_eq!(
            MediaPlan::for_app_offer(&pbx, PbxMedia::Rtp).unwrap(),
            MediaPlan::PassThrough
        );
        // An SDES answer must answer the relay's tag and suite.
        let mut plan = MediaPlan::for_pbx_offer(&pbx, AppMedia::SdesSrtp).unwrap();
        let wrong_tag = Crypto::generate(7, Suite::AesCm128HmacSha1_80);
        let answer = sdp::audio(
            &PBX_OFFER
                .replace("RTP/AVP", "RTP/SAVPF")
                .replace("a=sendrecv", &format!("a=sendrecv\r\na=crypto:{wrong_tag}")),
        )
        .unwrap();
        let err = plan.app_answered(&answer).unwrap_err();
        assert!(
            err.to_string()
                .contains("no a=crypto line for the offered tag 1"),
            "{err}"
        );
    }
}
