//! The `[calls]` section: the app legs' ICE port, the PBX legs' LAN address and ports, and
//! the timeouts that end a call.

use serde::Deserialize;

/// Calls anchored in the relay: ICE toward the app on one WAN port, plain RTP
/// toward the PBX from LAN ports. Needs the signalling server.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CallsConfig {
    pub enabled: bool,
    /// WAN ADDRESS:PORT of the ICE port every call's app leg shares.
    pub ice_listen: String,
    /// The relay's LAN address the PBX sends RTP to.
    pub lan_address: String,
    /// "FIRST-LAST" LAN ports for the calls' RTP.
    pub port_range: String,
    /// Seconds ICE may take to connect before the call fails.
    pub ice_timeout_secs: u64,
    /// Seconds without an answer to the relay's consent checks (RFC 7675) after which the
    /// call ends; from 5 s without one, media toward the app stops.
    pub consent_timeout_secs: u64,
    /// Seconds without media in either direction (the flows' kernel counters) after which
    /// the call ends.
    pub media_timeout_secs: u64,
    /// Seconds between `call.stats` events to the controller (each call's traffic from the
    /// kernel counters); 0: none.
    pub stats_interval_secs: u64,
    /// Seconds a DTLS-SRTP app has, once ICE has connected, to complete its handshake.
    pub dtls_timeout_secs: u64,
    /// What the relay offers an app the PBX calls.
    pub app_media: AppMedia,
    /// What the relay offers the PBX an app calls.
    pub pbx_media: PbxMedia,
}

/// The app leg's media security when the PBX calls (when the app calls, its offer says).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AppMedia {
    /// WebRTC: `UDP/TLS/RTP/SAVPF`, DTLS-SRTP with the relay's certificate, BUNDLE and
    /// rtcp-mux; the relay transcrypts to what the PBX offered.
    #[default]
    DtlsSrtp,
    /// `RTP/SAVPF` with SDES keys the relay generates; transcrypted likewise.
    SdesSrtp,
    /// The PBX's own profile and keys: the media passes through untouched (in XDP).
    AsPbx,
}

impl AppMedia {
    /// As the configuration writes it.
    pub fn name(self) -> &'static str {
        match self {
            AppMedia::DtlsSrtp => "dtls-srtp",
            AppMedia::SdesSrtp => "sdes-srtp",
            AppMedia::AsPbx => "as-pbx",
        }
    }
}

/// The PBX leg's media security when an app calls (when the PBX calls, its offer says).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PbxMedia {
    /// Plain `RTP/AVP`: what most PBX trunks take.
    #[default]
    Rtp,
    /// `RTP/SAVP` with SDES keys the relay generates.
    SdesSrtp,
    /// `UDP/TLS/RTP/SAVP` with the relay's certificate (`a=setup:actpass`, no BUNDLE): a
    /// PBX that takes only DTLS-SRTP; the PBX's answer gives its certificate and role.
    DtlsSrtp,
    /// The app's own profile and keys: the media passes through untouched (in XDP); the
    /// PBX must speak what the app speaks (DTLS-SRTP, for a WebRTC app).
    AsApp,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            enabled: false,
            ice_listen: String::new(),
            lan_address: String::new(),
            port_range: "40000-40999".to_owned(),
            ice_timeout_secs: 15,
            consent_timeout_secs: 30,
            media_timeout_secs: 60,
            stats_interval_secs: 10,
            dtls_timeout_secs: 10,
            app_media: AppMedia::default(),
            pbx_media: PbxMedia::default(),
        }
    }
}

impl PbxMedia {
    /// As the configuration writes it.
    pub fn name(self) -> &'static str {
        match self {
            PbxMedia::Rtp => "rtp",
            PbxMedia::SdesSrtp => "sdes-srtp",
            PbxMedia::DtlsSrtp => "dtls-srtp",
            PbxMedia::AsApp => "as-app",
        }
    }
}

impl CallsConfig {
    pub fn ports(&self) -> Option<std::ops::RangeInclusive<u16>> {
        crate::datapath::config::port_range(&self.port_range)
    }

    pub fn problems(&self, signalling: bool, problem: &mut impl FnMut(&'static str, String, &str)) {
        if !self.enabled {
            return;
        }
        if !signalling {
            problem(
                "calls.enabled",
                "true".to_owned(),
                "calls are set up through the signalling server: enable [signalling]",
            );
        }
        match self.ice_listen.parse::<std::net::SocketAddr>() {
            Ok(address) if !address.ip().is_unspecified() => {}
            _ => problem(
                "calls.ice_listen",
                format!("{:?}", self.ice_listen),
                "expected the WAN ADDRESS:PORT (a specific address: ICE candidates carry it)",
            ),
        }
        match self.lan_address.parse::<std::net::IpAddr>() {
            Ok(address) if !address.is_unspecified() => {}
            _ => problem(
                "calls.lan_address",
                format!("{:?}", self.lan_address),
                "expected the relay's LAN IP address",
            ),
        }
        if self.ports().is_none() {
            problem(
                "calls.port_range",
                format!("{:?}", self.port_range),
                "expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535",
            );
        }
        if self.ice_timeout_secs == 0 {
            problem(
                "calls.ice_timeout_secs",
                "0".to_owned(),
                "must be at least 1",
            );
        }
        if self.consent_timeout_secs < 6 {
            problem(
                "calls.consent_timeout_secs",
                self.consent_timeout_secs.to_string(),
                "must be at least 6 (media toward the app already stops after 5 s without consent)",
            );
        }
        if self.dtls_timeout_secs == 0 {
            problem(
                "calls.dtls_timeout_secs",
                "0".to_owned(),
                "must be at least 1",
            );
        }
        if self.media_timeout_secs == 0 {
            problem(
                "calls.media_timeout_secs",
                "0".to_owned(),
                "must be at least 1",
            );
        }
    }
}
