//! The app side of DTLS-SRTP (RFC 5763, 5764) for the tests and benchmarks that play a
//! WebRTC app: the webrtc-rs `dtls` crate as the client on the app's ICE connection, the
//! SRTP keys from its exporter, and the app's SDP answer naming its certificate.

use std::time::Duration;

use dtls::{
    config::Config, conn::DTLSConn, crypto::Certificate,
    extension::extension_use_srtp::SrtpProtectionProfile,
};
use webrtc_srtp::{context::Context, protection_profile::ProtectionProfile};
use webrtc_util::KeyingMaterialExporter;

use crate::app::Media;

/// The app's answer to the relay's DTLS offer: its own fingerprint, the DTLS client.
pub fn dtls_answer(answer: String, fingerprint: &str) -> String {
    answer
        .split("\r\n")
        .map(|line| {
            if line.starts_with("a=fingerprint:") {
                format!("a=fingerprint:{fingerprint}")
            } else if line.starts_with("a=setup:") {
                "a=setup:active".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// `sha-256 AB:CD:...` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    format!("sha-256 {}", hex.join(":"))
}

/// The DTLS client on the app's media connection, and the SRTP context it sends with
/// (the client write key and salt, RFC 5764 section 4.2).
pub async fn handshake(
    media: Media,
    certificate: Certificate,
) -> Result<(DTLSConn, Context), String> {
    let config = Config {
        certificates: vec![certificate],
        insecure_skip_verify: true,
        srtp_protection_profiles: vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80],
        ..Default::default()
    };
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        DTLSConn::new(media, config, true, None),
    )
    .await
    .map_err(|_| "DTLS handshake timed out".to_owned())?
    .map_err(|err| err.to_string())?;
    let material = conn
        .connection_state()
        .await
        .export_keying_material("EXTRACTOR-dtls_srtp", &[], 60)
        .await
        .map_err(|err| err.to_string())?;
    let context = Context::new(
        &material[..16],
        &material[32..46],
        ProtectionProfile::Aes128CmHmacSha1_80,
        None,
        None,
    )
    .map_err(|err| err.to_string())?;
    Ok((conn, context))
}
