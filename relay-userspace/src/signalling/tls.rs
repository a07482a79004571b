//! The signalling server's TLS: the certificate and key from the configuration, or a
//! self-signed pair made on the first start and kept in the state directory, so that apps
//! can pin its fingerprint (logged at every start) and it survives restarts.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::config::SignallingConfig;

/// File names of the self-signed pair in the state directory.
pub const SELF_SIGNED_CERTIFICATE: &str = "signalling-certificate.pem";
pub const SELF_SIGNED_KEY: &str = "signalling-key.pem";

pub struct ServerCertificate {
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate, as `AB:CD:...`.
    pub fingerprint: String,
    /// Where the certificate came from, for the log.
    pub source: String,
}

/// The TLS identity: configured, or self-signed in `state_dir` (made when missing; without
/// a state directory, a new one at every start).
pub fn certificate(
    settings: &SignallingConfig,
    state_dir: Option<&Path>,
) -> anyhow::Result<ServerCertificate> {
    let (certificate, key, source) = if !settings.certificate.is_empty() {
        (
            PathBuf::from(&settings.certificate),
            PathBuf::from(&settings.private_key),
            format!("configured ({})", settings.certificate),
        )
    } else if let Some(dir) = state_dir {
        let certificate = dir.join(SELF_SIGNED_CERTIFICATE);
        let key = dir.join(SELF_SIGNED_KEY);
        if !certificate.exists() || !key.exists() {
            make_self_signed(&certificate, &key)?;
            tracing::info!(path = %certificate.display(), "signalling: made a self-signed certificate (set signalling.certificate and private_key to use your own)");
        }
        (
            certificate.clone(),
            key,
            format!("self-signed ({})", certificate.display()),
        )
    } else {
        let dir = std::env::temp_dir().join(format!("relay-signalling-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let (certificate, key) = (dir.join(SELF_SIGNED_CERTIFICATE), dir.join(SELF_SIGNED_KEY));
        make_self_signed(&certificate, &key)?;
        let loaded = load(&certificate, &key);
        let _ = fs::remove_dir_all(&dir);
        let (chain, key) = loaded?;
        return build(
            chain,
            key,
            "self-signed, new at every start (no state directory)".to_owned(),
        );
    };
    let (chain, key) = load(&certificate, &key)?;
    build(chain, key, source)
}

fn load(
    certificate: &Path,
    key: &Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(certificate)
        .with_context(|| format!("signalling.certificate: {}", certificate.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("signalling.certificate: {}: not PEM", certificate.display()))?;
    if chain.is_empty() {
        bail!(
            "signalling.certificate: {}: no certificate in it",
            certificate.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("signalling.private_key: {}", key.display()))?;
    Ok((chain, key))
}

fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    source: String,
) -> anyhow::Result<ServerCertificate> {
    let fingerprint = fingerprint(&chain[0]);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("signalling: the certificate and the private key do not go together")?;
    Ok(ServerCertificate {
        config: Arc::new(config),
        fingerprint,
        source,
    })
}

/// SHA-256 of a DER certificate, as the colon-separated upper-case hex browsers show.
pub fn fingerprint(certificate: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, certificate)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn make_self_signed(certificate: &Path, key: &Path) -> anyhow::Result<()> {
    let hostname = fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned());
    let generated = rcgen::generate_simple_self_signed(vec![hostname])
        .context("signalling: generating a self-signed certificate")?;
    fs::write(certificate, generated.cert.pem())
        .with_context(|| format!("writing {}", certificate.display()))?;
    write_private(key, generated.signing_key.serialize_pem().as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    Ok(())
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}
