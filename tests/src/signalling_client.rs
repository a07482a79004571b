//! A signalling client for the tests: WebSocket over TLS from a namespace, pinning the
//! relay's certificate by its SHA-256 fingerprint (as an app does with a self-signed relay),
//! JSON messages in and out.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};

use crate::netns::NetNs;

pub type Socket = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Accepts exactly the certificate with this fingerprint.
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if relay::signalling::tls::fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "certificate fingerprint mismatch".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects from `ns` to `address`, trusting only the certificate with `fingerprint`.
pub async fn connect(ns: &NetNs, address: SocketAddr, fingerprint: &str) -> Socket {
    let tcp = ns.enter(move || tcp_connect(address));
    handshake(tcp, address, fingerprint).await
}

/// Connects from the namespace the calling thread is in.
pub async fn connect_here(address: SocketAddr, fingerprint: &str) -> Socket {
    handshake(tcp_connect(address), address, fingerprint).await
}

fn tcp_connect(address: SocketAddr) -> std::net::TcpStream {
    let tcp = std::net::TcpStream::connect(address)
        .unwrap_or_else(|err| panic!("connect {address}: {err}"));
    tcp.set_nonblocking(true).unwrap();
    tcp
}

async fn handshake(tcp: std::net::TcpStream, address: SocketAddr, fingerprint: &str) -> Socket {
    let tcp = TcpStream::from_std(tcp).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            fingerprint: fingerprint.to_owned(),
            provider,
        }))
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("relay").unwrap(), tcp)
        .await
        .expect("TLS handshake with the relay");
    let (socket, _) = tokio_tungstenite::client_async(format!("wss://{address}/"), tls)
        .await
        .expect("WebSocket handshake");
    socket
}

/// A controller of `tenant`, connected from `ns` and past its `hello`.
pub async fn controller(
    ns: &NetNs,
    address: SocketAddr,
    fingerprint: &str,
    tenant: &str,
    api_key: &str,
) -> Socket {
    let mut socket = connect(ns, address, fingerprint).await;
    let welcome = call(
        &mut socket,
        serde_json::json!({"type": "hello", "v": 1, "role": "controller", "tenant": tenant, "api_key": api_key}),
    )
    .await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    socket
}

pub async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .expect("send");
}

/// Sends a text frame as is (for bad input).
pub async fn send_raw(socket: &mut Socket, text: &str) {
    socket.send(Message::text(text)).await.expect("send");
}

/// A text frame whose payload is not UTF-8 (tungstenite checks its own text messages, so
/// the frame is built by hand).
pub async fn send_invalid_utf8(socket: &mut Socket) {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    socket.send(Message::Frame(frame)).await.expect("send");
}

/// The next JSON message (pings skipped), or what ended the connection: Err(close code).
pub async fn receive(socket: &mut Socket) -> Result<Value, Option<CloseCode>> {
    receive_within(socket, Duration::from_secs(5)).await
}

/// [`receive`], waiting up to `limit`.
pub async fn receive_within(
    socket: &mut Socket,
    limit: Duration,
) -> Result<Value, Option<CloseCode>> {
    loop {
        let next = tokio::time::timeout(limit, socket.next())
            .await
            .unwrap_or_else(|_| panic!("an answer within {limit:?}"));
        match next {
            Some(Ok(Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).expect("the relay sends JSON"));
            }
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// A request and its answer, skipping the call events that arrive meanwhile (a call in
/// progress sends `call.state` and `call.stats` at any time).
pub async fn request(socket: &mut Socket, message: Value) -> Value {
    send(socket, message).await;
    loop {
        let message = receive(socket).await.expect("the relay keeps the session");
        if message["type"] != "event" {
            return message;
        }
    }
}

/// Messages on `socket` until one is `wanted`, skipping at most `skip` others (the events
/// of a call in progress), each within `within`; panics naming `what` when none comes.
pub async fn until_message(
    socket: &mut Socket,
    within: Duration,
    skip: usize,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..skip {
        let message = receive_within(socket, within)
            .await
            .expect("the session stays");
        if wanted(&message) {
            return message;
        }
    }
    panic!("no {what}");
}

/// A token the controller mints for `user`'s app, valid for `ttl_secs`.
pub async fn mint_token(controller: &mut Socket, user: &str, ttl_secs: u64) -> String {
    let minted = request(
        controller,
        serde_json::json!({"type": "token.mint", "id": 0, "user": user, "ttl_secs": ttl_secs}),
    )
    .await;
    minted["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token minted: {minted}"))
        .to_owned()
}

/// Sends a request and returns the answer.
pub async fn call(socket: &mut Socket, message: Value) -> Value {
    send(socket, message).await;
    receive(socket).await.expect("an answer")
}

/// The next `call.state` event with `state` (skipping others), within 20 s.
pub async fn until_call_state(socket: &mut Socket, state: &str) -> Value {
    until_message(socket, Duration::from_secs(20), 20, state, |event| {
        event["event"] == "call.state" && event["state"] == state
    })
    .await
}
