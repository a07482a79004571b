//! DTLS-SRTP toward a WebRTC app (RFC 5763, RFC 5764) on the webrtc-rs `dtls` crate: the
//! relay's certificate (its fingerprint goes in the SDP), the handshake over the ICE
//! connection's DTLS records, the peer's certificate checked against the fingerprint its SDP
//! gave, and the SRTP keys from the DTLS exporter.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use dtls::{
    config::{Config, ExtendedMasterSecretType},
    conn::DTLSConn,
    crypto::Certificate,
    extension::extension_use_srtp::SrtpProtectionProfile,
};
use tokio::sync::{Mutex, mpsc};
use webrtc_util::{Conn, KeyingMaterialExporter};

use super::{Fingerprint, SrtpSession, Suite};

/// The RFC 5764 section 4.2 exporter label.
const EXPORTER_LABEL: &str = "EXTRACTOR-dtls_srtp";

/// DTLS records buffered toward the handshake; a flight is a handful.
const RECORD_QUEUE: usize = 64;

/// What the relay presents in every DTLS handshake: one self-signed ECDSA P-256
/// certificate per relayd run (WebRTC trusts the fingerprint in the SDP, not a CA).
pub struct DtlsIdentity {
    certificate: Certificate,
    fingerprint: Fingerprint,
}

impl DtlsIdentity {
    pub fn generate() -> Result<DtlsIdentity, DtlsError> {
        let certificate = Certificate::generate_self_signed(vec!["relay".to_owned()])
            .map_err(|err| DtlsError::Certificate(err.to_string()))?;
        let fingerprint = Fingerprint::sha256(certificate.certificate[0].as_ref());
        Ok(DtlsIdentity {
            certificate,
            fingerprint,
        })
    }

    /// The `a=fingerprint` of the relay's certificate.
    /// The certificate and its private key as PEM (PKCS#8), for the state store.
    pub fn to_pem(&self) -> String {
        self.certificate.serialize_pem()
    }

    pub fn from_pem(pem: &str) -> Result<DtlsIdentity, DtlsError> {
        let certificate =
            Certificate::from_pem(pem).map_err(|err| DtlsError::Certificate(err.to_string()))?;
        let der = certificate
            .certificate
            .first()
            .ok_or_else(|| DtlsError::Certificate("no certificate in the PEM".into()))?;
        let fingerprint = Fingerprint::sha256(der.as_ref());
        Ok(DtlsIdentity {
            certificate,
            fingerprint,
        })
    }

    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

/// The relay's part in the handshake, from the `a=setup` exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DtlsError {
    #[error("DTLS certificate: {0}")]
    Certificate(String),
    #[error("DTLS handshake failed: {0}")]
    Handshake(String),
    #[error("DTLS handshake did not complete within {0:?}")]
    Timeout(Duration),
    #[error("the app's DTLS certificate does not match the fingerprint in its SDP")]
    FingerprintMismatch,
    #[error("the app's SDP fingerprint uses {0}, which the relay cannot check")]
    UnknownHash(String),
    #[error("no SRTP protection profile in common (use_srtp, RFC 5764 section 4.1.2)")]
    NoProfile,
}

/// A handshake done: the association (kept open for the call: it answers retransmitted
/// flights and alerts) and the leg's SRTP.
pub struct DtlsLeg {
    pub conn: DTLSConn,
    pub srtp: SrtpSession,
}

/// Runs the handshake on `records` (the DTLS packets the ICE connection received, RFC 7983
/// demultiplexing) and `conn` (where the relay's go), then checks the app's certificate.
pub async fn handshake(
    identity: &DtlsIdentity,
    conn: Arc<dyn Conn + Send + Sync>,
    records: mpsc::Receiver<Vec<u8>>,
    role: Role,
    expected: &Fingerprint,
    timeout: Duration,
) -> Result<DtlsLeg, DtlsError> {
    let config = Config {
        certificates: vec![identity.certificate.clone()],
        srtp_protection_profiles: vec![
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32,
        ],
        // The peer's certificate is self-signed: it is checked against the SDP below.
        client_auth: dtls::config::ClientAuthType::RequireAnyClientCert,
        insecure_skip_verify: true,
        extended_master_secret: ExtendedMasterSecretType::Request,
        ..Default::default()
    };
    let transport = Arc::new(Records::new(records, conn));
    let dtls = tokio::time::timeout(
        timeout,
        DTLSConn::new(transport, config, role == Role::Client, None),
    )
    .await
    .map_err(|_| DtlsError::Timeout(timeout))?
    .map_err(|err| DtlsError::Handshake(err.to_string()))?;
    let state = dtls.connection_state().await;
    let certificate = state
        .peer_certificates
        .first()
        .ok_or(DtlsError::FingerprintMismatch)?;
    if digest(&expected.hash, certificate)? != expected.digest {
        let _ = dtls.close().await;
        return Err(DtlsError::FingerprintMismatch);
    }
    let suite = match dtls.selected_srtpprotection_profile() {
        SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => Suite::AeadAes128Gcm,
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => Suite::AesCm128HmacSha1_80,
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32 => Suite::AesCm128HmacSha1_32,
        _ => return Err(DtlsError::NoProfile),
    };
    let (key, salt) = (suite.key_len(), suite.salt_len());
    let material = state
        .export_keying_material(EXPORTER_LABEL, &[], 2 * (key + salt))
        .await
        .map_err(|err| DtlsError::Handshake(err.to_string()))?;
    // client key, server key, client salt, server salt (RFC 5764 section 4.2).
    let client = (&material[..key], &material[2 * key..2 * key + salt]);
    let server = (&material[key..2 * key], &material[2 * key + salt..]);
    let (peer, own) = match role {
        Role::Client => (server, client),
        Role::Server => (client, server),
    };
    let srtp = SrtpSession::new(suite, peer, own).ok_or(DtlsError::NoProfile)?;
    Ok(DtlsLeg { conn: dtls, srtp })
}

/// The digest of a DER certificate with the hash an SDP fingerprint names (RFC 8122
/// section 5 allows the TLS hash functions; WebRTC uses sha-256).
fn digest(hash: &str, der: &[u8]) -> Result<Vec<u8>, DtlsError> {
    use ring::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, SHA384, SHA512};
    let algorithm = match hash {
        "sha-1" => &SHA1_FOR_LEGACY_USE_ONLY,
        "sha-256" => &SHA256,
        "sha-384" => &SHA384,
        "sha-512" => &SHA512,
        other => return Err(DtlsError::UnknownHash(other.to_owned())),
    };
    Ok(ring::digest::digest(algorithm, der).as_ref().to_vec())
}

/// The DTLS side of an ICE connection: receives the records the call's demultiplexer
/// queued, sends on the connection. The tests' DTLS apps use it too.
pub struct Records {
    records: Mutex<mpsc::Receiver<Vec<u8>>>,
    conn: Arc<dyn Conn + Send + Sync>,
}

impl Records {
    /// `records` from a [`record_queue`] whose sender the demultiplexer has.
    pub fn new(records: mpsc::Receiver<Vec<u8>>, conn: Arc<dyn Conn + Send + Sync>) -> Records {
        Records {
            records: Mutex::new(records),
            conn,
        }
    }
}

#[async_trait]
impl Conn for Records {
    async fn connect(&self, _: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other("already connected".into()))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let record = self
            .records
            .lock()
            .await
            .recv()
            .await
            .ok_or(webrtc_util::Error::ErrClosedListener)?;
        let n = record.len().min(buf.len());
        buf[..n].copy_from_slice(&record[..n]);
        Ok(n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        let from = self
            .conn
            .remote_addr()
            .ok_or(webrtc_util::Error::ErrClosedListener)?;
        Ok((n, from))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.conn.send(buf).await
    }

    async fn send_to(&self, buf: &[u8], _: SocketAddr) -> webrtc_util::Result<usize> {
        self.conn.send(buf).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        self.conn.local_addr()
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        self.conn.remote_addr()
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.records.lock().await.close();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Where a leg without ICE (a PBX) gets the relay's DTLS records: `peer` from a socket
/// of the relay's. What the peer sends is read by the call's demultiplexer, which queues
/// its DTLS records for [`Records`]: nothing reads here.
pub struct Peer {
    socket: Arc<tokio::net::UdpSocket>,
    peer: SocketAddr,
}

impl Peer {
    pub fn new(socket: Arc<tokio::net::UdpSocket>, peer: SocketAddr) -> Peer {
        Peer { socket, peer }
    }
}

#[async_trait]
impl Conn for Peer {
    async fn connect(&self, _: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other("already connected".into()))
    }

    async fn recv(&self, _: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "read by the call's demultiplexer".into(),
        ))
    }

    async fn recv_from(&self, _: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Err(webrtc_util::Error::Other(
            "read by the call's demultiplexer".into(),
        ))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, self.peer).await?)
    }

    async fn send_to(&self, buf: &[u8], _: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// A new queue for a leg's DTLS records: the sender goes to the demultiplexer.
pub fn record_queue() -> (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>) {
    mpsc::channel(RECORD_QUEUE)
}

/// What a packet on the app's transport is, by its first byte (RFC 7983 section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demux {
    Dtls,
    Rtp,
    Other,
}

pub fn demux(packet: &[u8]) -> Demux {
    match packet.first() {
        Some(20..=63) => Demux::Dtls,
        Some(128..=191) => Demux::Rtp,
        _ => Demux::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two relays' handshake code against each other over a loopback socket pair: keys
    /// agree both ways, and a wrong expected fingerprint is refused.
    #[tokio::test]
    async fn a_handshake_over_loopback_gives_matching_srtp_keys() {
        let (a, b) = (
            DtlsIdentity::generate().unwrap(),
            DtlsIdentity::generate().unwrap(),
        );
        let (sa, sb) = udp_conns().await;
        let (qa, ra) = record_queue();
        let (qb, rb) = record_queue();
        pump(sa.clone(), qa);
        pump(sb.clone(), qb);
        let (fa, fb) = (a.fingerprint().clone(), b.fingerprint().clone());
        let timeout = Duration::from_secs(10);
        let (left, right) = tokio::join!(
            handshake(&a, sa, ra, Role::Client, &fb, timeout),
            handshake(&b, sb, rb, Role::Server, &fa, timeout),
        );
        let (mut left, mut right) = (left.unwrap(), right.unwrap());
        let rtp = [0x80, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9, 1, 2, 3, 4];
        let protected = left.srtp.protect(&rtp).unwrap();
        assert_eq!(&right.srtp.unprotect(&protected).unwrap()[..], &rtp);
        let protected = right.srtp.protect(&rtp).unwrap();
        assert_eq!(&left.srtp.unprotect(&protected).unwrap()[..], &rtp);

        let (sa, sb) = udp_conns().await;
        let (qa, ra) = record_queue();
        let (qb, rb) = record_queue();
        pump(sa.clone(), qa);
        pump(sb.clone(), qb);
        let wrong = Fingerprint::sha256(b"someone else");
        let (left, _right) = tokio::join!(
            handshake(&a, sa, ra, Role::Client, &wrong, timeout),
            handshake(&b, sb, rb, Role::Server, &fa, Duration::from_secs(2)),
        );
        assert_eq!(left.err(), Some(DtlsError::FingerprintMismatch));
    }

    async fn udp_conns() -> (Arc<dyn Conn + Send + Sync>, Arc<dyn Conn + Send + Sync>) {
        let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        a.connect(b.local_addr().unwrap()).await.unwrap();
        b.connect(a.local_addr().unwrap()).await.unwrap();
        (Arc::new(a), Arc::new(b))
    }

    /// The demultiplexer's part: every received DTLS record into the queue.
    fn pump(conn: Arc<dyn Conn + Send + Sync>, queue: mpsc::Sender<Vec<u8>>) {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok(n) = conn.recv(&mut buf).await {
                if demux(&buf[..n]) == Demux::Dtls && queue.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
    }
}
