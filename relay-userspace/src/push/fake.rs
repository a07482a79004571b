//! A push provider's stand-in for the unit tests: HTTP/2 only over TLS on loopback, with a
//! certificate of its own that the client trusts through `push.ca_file`; each request goes
//! to the test's `answer`, with the fake's address.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::PrivateKeyDer;

pub struct Fake {
    pub address: SocketAddr,
    /// A PEM file of the fake's certificate, for `push.ca_file`.
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

pub async fn serve<F, Fut>(answer: F) -> Fake
where
    F: Fn(Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let certificate = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, certificate.cert.pem()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![certificate.cert.der().clone()],
        PrivateKeyDer::try_from(certificate.signing_key.serialize_der()).unwrap(),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request| {
                    let answer = answer.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(request, address).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Fake {
        address,
        ca_file,
        _dir: dir,
    }
}

/// A JSON answer with `status`.
pub fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The push service of `config`, which must be a valid configuration.
pub fn push_from(config: &super::PushConfig) -> Arc<super::Push> {
    let mut problems = Vec::new();
    config.problems(true, &mut |key, _, reason: &str| {
        problems.push((key, reason.to_owned()))
    });
    assert_eq!(problems, []);
    Arc::new(super::Push::new(config, None).unwrap())
}
