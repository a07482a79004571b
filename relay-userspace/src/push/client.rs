//! HTTPS to the push providers: one request per connection (pushes are rare: a call to a
//! sleeping app), HTTP/2 where the server takes it (ALPN; FCM and APNs do) else HTTP/1.1,
//! over rustls with ring, the public roots (webpki-roots) and the operator's
//! `push.ca_file`, everything within `push.timeout_secs`.

use std::{path::Path, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where a provider's requests go: parsed once from its `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
    /// Path and query.
    path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or("must start with https:// (pushes carry who is called)")?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                let port = port
                    .parse()
                    .map_err(|_| format!("port {port:?} is not a number"))?;
                (host, port)
            }
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("no host".into());
        }
        ServerName::try_from(host.to_owned())
            .map_err(|_| format!("host {host:?} is not a name or address"))?;
        if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err("the path has spaces or control characters".into());
        }
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

/// The certificates of a PEM file.
pub fn read_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|err| format!("cannot read it: {err}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("not PEM certificates: {err}"))?;
    if certificates.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certificates)
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    /// `Retry-After` in seconds, when given.
    pub retry_after: Option<Duration>,
    /// At most `MAX_BODY` bytes of it.
    pub body: Vec<u8>,
}

/// The most of an answer's body kept: providers answer with small JSON.
const MAX_BODY: usize = 64 * 1024;

pub struct HttpsClient {
    tls: TlsConnector,
    timeout: Duration,
}

impl HttpsClient {
    pub fn new(ca_file: &str, timeout: Duration) -> Result<HttpsClient, String> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if !ca_file.is_empty() {
            for certificate in read_certificates(ca_file)? {
                roots
                    .add(certificate)
                    .map_err(|err| format!("push.ca_file: {ca_file}: {err}"))?;
            }
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|err| err.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
        // HTTP/2 where the provider takes it (FCM and APNs do), else HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(HttpsClient {
            tls: TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    /// POSTs `body` of `content_type` with `headers` to `endpoint`.
    pub async fn post(
        &self,
        endpoint: &Endpoint,
        content_type: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        tokio::time::timeout(
            self.timeout,
            self.post_now(endpoint, content_type, headers, body),
        )
        .await
        .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    async fn post_now(
        &self,
        endpoint: &Endpoint,
        content_type: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|err| format!("connect: {err}"))?;
        let name = ServerName::try_from(endpoint.host.clone()).map_err(|err| err.to_string())?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|err| format!("TLS: {err}"))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let authority = if endpoint.port == 443 {
            endpoint.host.clone()
        } else {
            format!("{}:{}", endpoint.host, endpoint.port)
        };
        // HTTP/2 takes the scheme and authority from the URI; HTTP/1.1 the path and Host.
        let mut request = if h2 {
            Request::post(format!("https://{authority}{}", endpoint.path))
        } else {
            Request::post(endpoint.path.as_str()).header(hyper::header::HOST, authority)
        }
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(
            hyper::header::USER_AGENT,
            concat!("relayd/", env!("CARGO_PKG_VERSION")),
        );
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| err.to_string())?;
        let io = TokioIo::new(tls);
        let (response, driver) = if h2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|err| format!("HTTP/2: {err}"))?;
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            (sender.send_request(request).await, driver)
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|err| format!("HTTP: {err}"))?;
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            (sender.send_request(request).await, driver)
        };
        let response = response.map_err(|err| format!("HTTP: {err}"))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok())
            .map(Duration::from_secs);
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|body| body.to_bytes().to_vec())
            .unwrap_or_default();
        driver.abort();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_from_https_urls_only() {
        assert_eq!(
            Endpoint::parse("https://push.example.com/relay?x=1"),
            Ok(Endpoint {
                host: "push.example.com".into(),
                port: 443,
                path: "/relay?x=1".into()
            })
        );
        assert_eq!(
            Endpoint::parse("https://127.0.0.1:8444"),
            Ok(Endpoint {
                host: "127.0.0.1".into(),
                port: 8444,
                path: "/".into()
            })
        );
        assert_eq!(Endpoint::parse("https://[::1]:9/p").unwrap().host, "::1");
        assert!(
            Endpoint::parse("http://push.example.com/")
                .unwrap_err()
                .contains("https://")
        );
        assert!(
            Endpoint::parse("https://host:port/")
                .unwrap_err()
                .contains("port")
        );
        assert!(
            Endpoint::parse("https:///x")
                .unwrap_err()
                .contains("no host")
        );
        assert!(Endpoint::parse("https://h/a b").is_err());
    }
}
