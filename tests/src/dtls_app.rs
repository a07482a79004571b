//! The app side of DTLS-SRTP (RFC 5763, 5764) for the tests and benchmarks that play a
//! WebRTC app: the webrtc-rs `dtls` crate as the client on the app's ICE connection, the
//! SRTP keys from its exporter, and the app's SDP answer naming its certificate. A PBX
//! that speaks DTLS-SRTP is the same, as the server on its RTP socket.

use std::{sync::Arc, time::Duration};

use dtls::{
    config::Config, conn::DTLSConn, crypto::Certificate,
    extension::extension_use_srtp::SrtpProtectionProfile,
};
use relay::media::dtls::{Demux, Records, demux, record_queue};
use tokio::sync::mpsc;
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
    let both = handshake_both_ways(media, certificate).await?;
    Ok((both.conn, both.send))
}

/// The app's DTLS-SRTP: the association, the context it sends with and the one it
/// unprotects the relay's packets with (the server write key and salt), and the packets
/// from the relay that are not DTLS.
pub struct DtlsSrtp {
    pub conn: DTLSConn,
    pub send: Context,
    pub receive: Context,
    pub srtp: mpsc::Receiver<Vec<u8>>,
}

/// The app's media connection seen by its DTLS association: only DTLS records (RFC 7983),
/// as the relay's own legs see theirs; a task reading the connection puts the other
/// packets on a queue of their own.
fn demultiplexed(media: Media) -> (Records, mpsc::Receiver<Vec<u8>>) {
    let (records_tx, records) = record_queue();
    let (srtp_tx, srtp) = mpsc::channel(1024);
    let reader = media.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok(n) = reader.recv(&mut buf).await {
            let queue = match demux(&buf[..n]) {
                Demux::Dtls => &records_tx,
                _ => &srtp_tx,
            };
            let _ = queue.try_send(buf[..n].to_vec());
        }
    });
    (Records::new(records, media), srtp)
}

/// The DTLS client on the app's media connection and both SRTP contexts; the connection
/// is read from now on by a task that keeps the relay's SRTP apart for [`talk_srtp`].
pub async fn handshake_both_ways(
    media: Media,
    certificate: Certificate,
) -> Result<DtlsSrtp, String> {
    handshake_as(media, certificate, true).await
}

/// The same as the DTLS client (`client`) or server, and the SRTP contexts the role sends
/// and receives with. As the server it asks for the peer's certificate, as the relay does.
pub async fn handshake_as(
    media: Media,
    certificate: Certificate,
    client: bool,
) -> Result<DtlsSrtp, String> {
    let (records, srtp) = demultiplexed(media);
    let media: Media = Arc::new(records);
    let config = Config {
        certificates: vec![certificate],
        insecure_skip_verify: true,
        client_auth: if client {
            dtls::config::ClientAuthType::NoClientCert
        } else {
            dtls::config::ClientAuthType::RequireAnyClientCert
        },
        srtp_protection_profiles: vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80],
        ..Default::default()
    };
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        DTLSConn::new(media, config, client, None),
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
    let context = |key: &[u8], salt: &[u8]| {
        Context::new(
            key,
            salt,
            ProtectionProfile::Aes128CmHmacSha1_80,
            None,
            None,
        )
        .map_err(|err| err.to_string())
    };
    // client key, server key, client salt, server salt (RFC 5764 section 4.2).
    let client_keys = context(&material[..16], &material[32..46])?;
    let server_keys = context(&material[16..32], &material[46..60])?;
    let (send, receive) = if client {
        (client_keys, server_keys)
    } else {
        (server_keys, client_keys)
    };
    Ok(DtlsSrtp {
        send,
        receive,
        conn,
        srtp,
    })
}

/// A numbered RTP packet (`traffic::numbered`) whose sequence number is the number's low
/// 16 bits: a stream numbered from near 65,535 rolls its sequence numbers over.
fn sequenced(number: u32) -> Vec<u8> {
    let mut packet = crate::traffic::numbered(number);
    packet[2..4].copy_from_slice(&(number as u16).to_be_bytes());
    packet
}

/// Sends `count` numbered packets from `first` as SRTP at 50 per second and counts the
/// echoes that unprotect and carry a number sent, over the exchange and a second after it.
pub async fn talk_srtp(media: &Media, srtp: &mut DtlsSrtp, first: u32, count: u32) -> u32 {
    let mut echoed = vec![false; count as usize];
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let mut next = first;
    let mut grace = None;
    loop {
        let grace_over = async {
            match grace {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = pace.tick(), if grace.is_none() => {
                let protected = srtp.send.encrypt_rtp(&sequenced(next)).expect("SRTP");
                let _ = media.send(&protected).await;
                next += 1;
                if next == first + count {
                    grace = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            received = srtp.srtp.recv() => {
                let Some(packet) = received else { break };
                let Ok(plain) = srtp.receive.decrypt_rtp(&packet) else { continue };
                if let Some(index) = crate::traffic::sequence_of(&plain)
                    .and_then(|number| number.checked_sub(first))
                    .filter(|index| *index < count)
                {
                    echoed[index as usize] = true;
                }
            }
            _ = grace_over => break,
        }
    }
    echoed.iter().filter(|echoed| **echoed).count() as u32
}

/// A PBX that speaks DTLS-SRTP, on its RTP `socket` toward the relay's LAN port `relay`:
/// the handshake as the `client` or the server with `certificate`, then an echo of every
/// SRTP packet it can unprotect, protected again with its own keys and counted in
/// `received`. Returns the relay's certificate fingerprint and the echo's task.
pub async fn dtls_pbx_echo(
    socket: std::net::UdpSocket,
    relay: std::net::SocketAddr,
    certificate: Certificate,
    client: bool,
    received: Arc<std::sync::atomic::AtomicU32>,
) -> Result<(String, tokio::task::JoinHandle<()>), String> {
    socket
        .set_nonblocking(true)
        .map_err(|err| err.to_string())?;
    let socket = Arc::new(tokio::net::UdpSocket::from_std(socket).map_err(|err| err.to_string())?);
    socket.connect(relay).await.map_err(|err| err.to_string())?;
    let DtlsSrtp {
        conn,
        mut send,
        mut receive,
        srtp: mut from_relay,
    } = handshake_as(socket.clone(), certificate, client).await?;
    let state = conn.connection_state().await;
    let relay = fingerprint(state.peer_certificates.first().ok_or("no certificate")?);
    // SRTP goes on the socket itself, beside the association (which stays open).
    let echo = tokio::spawn(async move {
        let _association = conn;
        while let Some(packet) = from_relay.recv().await {
            let Ok(plain) = receive.decrypt_rtp(&packet) else {
                continue;
            };
            received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let protected = send.encrypt_rtp(&plain).expect("SRTP");
            let _ = socket.send(&protected).await;
        }
    });
    Ok((relay, echo))
}
