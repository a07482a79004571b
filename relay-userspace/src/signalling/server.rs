//! The accept loop and one task per connection: TLS, the WebSocket handshake, `hello`
//! (authentication) within a few seconds, then requests in, routed messages out, and a ping
//! every `ping_interval_secs`. Bad input gets an error reply and the session goes on;
//! a bad credential, an oversized message or silence closes this connection only.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
    },
};

use super::{
    auth::{Tokens, same_secret, valid_name},
    call_requests,
    calls::{event_message, fields, requester},
    config::SignallingConfig,
    hub::{Hub, Identity, RouteError, SessionId},
    prefixed::Prefixed,
    protocol::{ErrorCode, Inbound, Outbound, PROTOCOL_VERSION, Role, Sender, Target, parse},
    tls,
};
use crate::{
    admission::{Admission, Admitted, Listener},
    calls::CallEvent,
    cluster::{Forwarded, Recipient},
    time::unix_now,
};

/// TLS and WebSocket handshakes, and the `hello`, must each finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection's WebSocket read buffer; longer messages grow it as they arrive.
const READ_BUFFER_BYTES: usize = 4096;

/// How long relayd's exit waits for the connections to flush and close.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// Close codes of our own (4000-4999 are the application's, RFC 6455 7.4.2).
pub const CLOSE_NO_HELLO: u16 = 4000;
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
pub const CLOSE_REPLACED: u16 = 4002;

pub(super) struct Shared {
    pub(super) hub: Arc<Hub>,
    /// Calls, when enabled.
    pub(super) calls: Option<Arc<crate::calls::Calls>>,
    pub(super) cluster: Option<Arc<crate::cluster::Cluster>>,
    tokens: Tokens,
    pub(super) settings: SignallingConfig,
    /// The TURN server, when it takes TURN over TLS on this port (`turn.tcp`), and this
    /// port's address (the server side of those clients' 5-tuples).
    turn: Option<Arc<crate::turn::driver::TurnService>>,
    address: SocketAddr,
}

type Socket = WebSocketStream<Prefixed<tokio_rustls::server::TlsStream<TcpStream>>>;

/// Binds `signalling.listen` and serves until `stopped` changes.
/// The rendezvous as `relayctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignallingStatus {
    pub listening: SocketAddr,
    /// The SHA-256 fingerprint of the certificate (what apps pin when it is self-signed).
    pub certificate_sha256: String,
    pub tenants: usize,
    /// Sessions connected now.
    pub controllers: usize,
    pub clients: usize,
    /// Whether TURN over TLS (`turns:`) is taken on the same port.
    pub turn_over_tls: bool,
}

/// A started rendezvous: where it listens, and its sessions.
pub struct Listening {
    pub address: SocketAddr,
    pub fingerprint: String,
    pub tenants: usize,
    pub turn_over_tls: bool,
    pub hub: Arc<Hub>,
}

impl Listening {
    pub fn status(&self) -> SignallingStatus {
        let (controllers, clients) = self.hub.counts();
        SignallingStatus {
            listening: self.address,
            certificate_sha256: self.fingerprint.clone(),
            tenants: self.tenants,
            controllers,
            clients,
            turn_over_tls: self.turn_over_tls,
        }
    }
}

/// What the rendezvous serves its sessions with, besides the hub.
pub struct Backends {
    pub hub: Arc<Hub>,
    /// Calls, when enabled.
    pub calls: Option<Arc<crate::calls::Calls>>,
    /// The cluster, when this node is in one: messages for sessions on other nodes.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The TURN server, when it takes TURN over TLS on this port (`turn.tcp`).
    pub turn: Option<Arc<crate::turn::driver::TurnService>>,
}

pub async fn start(
    settings: &SignallingConfig,
    state_dir: Option<&Path>,
    backends: Backends,
    admission: Arc<Admission>,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<(Listening, JoinHandle<()>)> {
    let Backends {
        hub,
        calls,
        cluster,
        turn,
    } = backends;
    let certificate = tls::certificate(settings, state_dir)?;
    let address: SocketAddr = settings.listen.parse().context("signalling.listen")?;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("signalling.listen: {address}: cannot listen"))?;
    tracing::info!(
        %address,
        certificate = %certificate.source,
        sha256 = %certificate.fingerprint,
        "signalling: listening for WebSocket over TLS"
    );
    let listening = Listening {
        address,
        fingerprint: certificate.fingerprint.clone(),
        tenants: settings.tenants.len(),
        turn_over_tls: turn.is_some(),
        hub: hub.clone(),
    };
    let mut listener = Listener::new(listener, "signalling", admission);
    let acceptor = TlsAcceptor::from(certificate.config);
    let context = Arc::new(Shared {
        hub,
        calls,
        cluster,
        tokens: Tokens::new(&settings.token_secret),
        settings: settings.clone(),
        turn,
        address,
    });
    // Call requests of sessions on the cluster's other relays, served here as if theirs
    // were local sessions.
    if let Some(cluster) = &context.cluster {
        let shared = Arc::downgrade(&context);
        cluster.serve_requests(Box::new(move |from, text| {
            let shared = shared.clone();
            Box::pin(async move {
                let reply = match shared.upgrade() {
                    Some(context) => call_requests::serve_remote(&context, from, &text).await,
                    None => Outbound::Error {
                        id: None,
                        code: ErrorCode::Forbidden,
                        message: "the relay is shutting down".to_owned(),
                    },
                };
                serde_json::to_value(reply).expect("outbound messages serialize")
            })
        }));
    }
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                (tcp, peer, admitted) = listener.accept() => {
                    connections.spawn(connection(tcp, peer, admitted, acceptor.clone(), context.clone(), stopped.clone()));
                }
                // Reap the connections that ended.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = stopped.changed() => break,
            }
        }
        // Each connection sends what is queued for it (the calls the shutdown ended) and
        // closes; relayd waits for that, briefly, before it exits.
        let closing = async { while connections.join_next().await.is_some() {} };
        if timeout(SHUTDOWN_FLUSH, closing).await.is_err() {
            tracing::warn!("signalling: connections still closing at exit");
        }
    });
    Ok((listening, task))
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    // Counted in while the connection lasts.
    _admitted: Admitted,
    acceptor: TlsAcceptor,
    context: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tls = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "signalling: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    // Both protocols wait for the client: a WebSocket starts with its HTTP request, TURN
    // over TLS (RFC 8656, `turns:` on 443 for networks that let nothing else out) with a
    // STUN message (first byte 0..=3, RFC 7983).
    let mut first = vec![0u8; 4096];
    let n = match timeout(HANDSHAKE_TIMEOUT, tls.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return,
    };
    first.truncate(n);
    if first[0] < 4 {
        match &context.turn {
            Some(turn) => {
                tracing::debug!(%peer, "signalling: TURN over TLS on the signalling port");
                turn.clone()
                    .stream_client(tls, first, peer, context.address, "tls")
                    .await;
            }
            None => {
                tracing::debug!(%peer, "signalling: STUN over TLS, but no TURN over TLS here (turn.enabled, turn.tcp)")
            }
        }
        return;
    }
    let tls = Prefixed::new(first, tls);
    let max = context.settings.max_message_bytes;
    // Signalling frames are small and most connections idle (apps waiting for calls):
    // tungstenite's default 128 KiB read buffer, zeroed up to its size before every read,
    // cost 128 KiB per connection and a large memset per ping and pong.
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(READ_BUFFER_BYTES);
    let mut socket = match timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_async_with_config(tls, Some(config)),
    )
    .await
    {
        Ok(Ok(socket)) => socket,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "signalling: WebSocket handshake failed");
            return;
        }
        Err(_) => return,
    };
    let identity = match hello(&mut socket, &context).await {
        Ok(identity) => identity,
        Err((code, close_code, reason)) => {
            tracing::info!(%peer, %reason, "signalling: connection refused");
            let _ = send(
                &mut socket,
                &Outbound::Error {
                    id: None,
                    code,
                    message: reason.clone(),
                },
            )
            .await;
            close(&mut socket, CloseCode::Library(close_code), &reason).await;
            return;
        }
    };
    let (session, mut queue) = context.hub.join(identity.clone());
    tracing::info!(%peer, session, tenant = %identity.tenant, role = ?identity.role, user = identity.user.as_deref().unwrap_or(""), "signalling: session started");
    let welcome = Outbound::Welcome {
        v: PROTOCOL_VERSION,
        role: identity.role,
        tenant: identity.tenant.clone(),
        user: identity.user.clone(),
        session,
        calls: context
            .calls
            .as_ref()
            .map(|calls| {
                calls
                    .resumable(&requester(&identity))
                    .iter()
                    .map(|call| serde_json::to_value(call).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let ended = if send(&mut socket, &welcome).await.is_ok() {
        // After the welcome, through the session's queue like every event.
        if let Some(calls) = &context.calls {
            calls.announce_restored(&requester(&identity));
            for incoming in calls.woken_offers(&requester(&identity)) {
                if let CallEvent::Incoming { call, .. } = &incoming {
                    tracing::info!(call, session, tenant = %identity.tenant, "calls: a woken app connected; call offered to it");
                }
                context.hub.to_session(session, &event_message(&incoming));
            }
        }
        serve(
            &mut socket,
            &context,
            session,
            &identity,
            &mut queue,
            &mut stopped,
        )
        .await
    } else {
        "the welcome could not be sent".to_owned()
    };
    context.hub.leave(session);
    tracing::info!(%peer, session, reason = %ended, "signalling: session ended");
}

/// Requests in, routed messages out, pings; returns why the session ended.
async fn serve(
    socket: &mut Socket,
    context: &Shared,
    session: SessionId,
    identity: &Identity,
    queue: &mut tokio::sync::mpsc::Receiver<Outbound>,
    stopped: &mut watch::Receiver<bool>,
) -> String {
    let interval = Duration::from_secs(context.settings.ping_interval_secs);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            incoming = socket.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    last_heard = Instant::now();
                    let reply = handle(context, session, identity, text.as_str()).await;
                    if send(socket, &reply).await.is_err() {
                        return "the peer stopped reading".to_owned();
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    last_heard = Instant::now();
                    let reply = Outbound::Error {
                        id: None,
                        code: ErrorCode::BadRequest,
                        message: "messages are JSON text frames".to_owned(),
                    };
                    if send(socket, &reply).await.is_err() {
                        return "the peer stopped reading".to_owned();
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    last_heard = Instant::now();
                }
                Some(Ok(Message::Close(_))) | None => return "closed by the peer".to_owned(),
                Some(Err(tungstenite::Error::Capacity(err))) => {
                    let reason = format!("message too big: {err} (signalling.max_message_bytes)");
                    close(socket, CloseCode::Size, &reason).await;
                    return reason;
                }
                Some(Err(tungstenite::Error::Utf8(err))) => {
                    let reason = format!("a text message that is not UTF-8: {err}");
                    close(socket, CloseCode::Invalid, &reason).await;
                    return reason;
                }
                Some(Err(err)) => return format!("connection error: {err}"),
            },
            outgoing = queue.recv() => match outgoing {
                Some(message) => {
                    if send_queued(socket, &message, queue).await.is_err() {
                        return "the peer stopped reading".to_owned();
                    }
                }
                None => {
                    let reason = "replaced by a newer connection of this controller";
                    close(socket, CloseCode::Library(CLOSE_REPLACED), reason).await;
                    return reason.to_owned();
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > 3 * interval {
                    let reason = "no answer to three pings";
                    close(socket, CloseCode::Away, reason).await;
                    return reason.to_owned();
                }
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return "the peer stopped reading".to_owned();
                }
            }
            _ = stopped.changed() => {
                // What is queued goes out first (calls ended by the shutdown).
                while let Ok(message) = queue.try_recv() {
                    if send(socket, &message).await.is_err() {
                        break;
                    }
                }
                close(socket, CloseCode::Away, "the relay is shutting down").await;
                return "the relay is shutting down".to_owned();
            }
        }
    }
}

/// The first message: who is connecting. Errors carry the error code, the close code and
/// the reason.
async fn hello(
    socket: &mut Socket,
    context: &Shared,
) -> Result<Identity, (ErrorCode, u16, String)> {
    let first = match timeout(HANDSHAKE_TIMEOUT, socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => text,
        _ => {
            return Err((
                ErrorCode::BadRequest,
                CLOSE_NO_HELLO,
                "expected a hello text message first".to_owned(),
            ));
        }
    };
    let (v, role, tenant, api_key, token) = match parse(first.as_str()) {
        Ok(Inbound::Hello {
            v,
            role,
            tenant,
            api_key,
            token,
        }) => (v, role, tenant, api_key, token),
        Ok(_) => {
            return Err((
                ErrorCode::BadRequest,
                CLOSE_NO_HELLO,
                "the first message must be a hello".to_owned(),
            ));
        }
        Err((_, code, message)) => return Err((code, CLOSE_NO_HELLO, message)),
    };
    if v != PROTOCOL_VERSION {
        return Err((
            ErrorCode::UnsupportedVersion,
            CLOSE_NO_HELLO,
            format!("protocol version {v} is not supported; this relay speaks {PROTOCOL_VERSION}"),
        ));
    }
    let unauthorized = |why: &str| (ErrorCode::Unauthorized, CLOSE_UNAUTHORIZED, why.to_owned());
    match role {
        Role::Controller => {
            let (Some(tenant), Some(api_key)) = (tenant, api_key) else {
                return Err(unauthorized("a controller gives its tenant and api_key"));
            };
            let known = context
                .settings
                .tenants
                .iter()
                .any(|t| t.name == tenant && same_secret(&t.api_key, &api_key));
            if !known {
                return Err(unauthorized("unknown tenant or wrong api_key"));
            }
            Ok(Identity {
                tenant,
                role,
                user: None,
            })
        }
        Role::Client => {
            let Some(token) = token else {
                return Err(unauthorized(
                    "a client gives the token its controller minted",
                ));
            };
            let (tenant, user) = context
                .tokens
                .verify(&token, unix_now())
                .map_err(|err| unauthorized(&err.to_string()))?;
            if !context.settings.tenants.iter().any(|t| t.name == tenant) {
                return Err(unauthorized("the token's tenant is not configured"));
            }
            Ok(Identity {
                tenant,
                role,
                user: Some(user),
            })
        }
    }
}

/// Answers one request of an authenticated session.
async fn handle(context: &Shared, session: SessionId, identity: &Identity, text: &str) -> Outbound {
    let error = |id, code, message: String| Outbound::Error { id, code, message };
    match parse(text) {
        Err((id, code, message)) => error(id, code, message),
        Ok(Inbound::Hello { .. }) => error(
            None,
            ErrorCode::BadRequest,
            "this session has already said hello".to_owned(),
        ),
        Ok(Inbound::TokenMint { id, user, ttl_secs }) => {
            if identity.role != Role::Controller {
                return error(
                    Some(id),
                    ErrorCode::Forbidden,
                    "only controllers mint tokens".to_owned(),
                );
            }
            if !valid_name(&user) {
                return error(
                    Some(id),
                    ErrorCode::BadRequest,
                    format!("user: {user:?}: 1 to 64 of A-Z a-z 0-9 . _ @ + -"),
                );
            }
            let max = context.settings.max_token_lifetime_secs;
            if ttl_secs == 0 || ttl_secs > max {
                return error(
                    Some(id),
                    ErrorCode::BadRequest,
                    format!(
                        "ttl_secs: {ttl_secs}: must be 1 to {max} (signalling.max_token_lifetime_secs)"
                    ),
                );
            }
            let expires = unix_now() + ttl_secs;
            let token = context.tokens.mint(&identity.tenant, &user, expires);
            let mut fields = serde_json::Map::new();
            fields.insert("token".into(), token.into());
            fields.insert("user".into(), user.into());
            fields.insert("expires".into(), expires.into());
            Outbound::Result { id, fields }
        }
        Ok(Inbound::Send { id, to, body }) => {
            let routed = match context.hub.route(session, &to, body.clone()) {
                Err(err) if err.code == ErrorCode::Offline => {
                    forward(context, session, identity, &to, body, err).await
                }
                routed => routed,
            };
            match routed {
                Ok(delivered) => {
                    let mut fields = serde_json::Map::new();
                    fields.insert("delivered".into(), delivered.into());
                    Outbound::Result { id, fields }
                }
                Err(err) => error(Some(id), err.code, err.message),
            }
        }
        Ok(
            request @ (Inbound::CallCreate { .. }
            | Inbound::CallAnswer { .. }
            | Inbound::CallUpdate { .. }
            | Inbound::CallCandidate { .. }
            | Inbound::CallHangup { .. }),
        ) => call_requests::call_request(context, session, identity, request, text).await,
        Ok(
            request @ (Inbound::PushRegister { .. }
            | Inbound::PushUnregister { .. }
            | Inbound::PushDevices { .. }),
        ) => handle_push(context, identity, request),
    }
}

/// The push requests: apps register and unregister their own device, controllers count a
/// user's.
fn handle_push(context: &Shared, identity: &Identity, request: Inbound) -> Outbound {
    let refuse = |id, code, message: &str| Outbound::Error {
        id: Some(id),
        code,
        message: message.to_owned(),
    };
    let (id, client_only) = match &request {
        Inbound::PushRegister { id, .. } | Inbound::PushUnregister { id, .. } => (*id, true),
        Inbound::PushDevices { id, .. } => (*id, false),
        _ => unreachable!("push requests only"),
    };
    let Some(push) = context.hub.push() else {
        return refuse(
            id,
            ErrorCode::Forbidden,
            "push is not enabled on this relay ([push] enabled)",
        );
    };
    let user = match (client_only, identity.role, identity.user.as_deref()) {
        (true, Role::Client, Some(user)) => user,
        (true, _, _) => {
            return refuse(id, ErrorCode::Forbidden, "only apps register their devices");
        }
        (false, Role::Controller, _) => "",
        (false, _, _) => return refuse(id, ErrorCode::Forbidden, "only controllers list devices"),
    };
    match request {
        Inbound::PushRegister {
            provider,
            token,
            app_id,
            voip,
            ..
        } => match push.register(
            &identity.tenant,
            user,
            &provider,
            &token,
            app_id.as_deref(),
            voip,
        ) {
            Ok(devices) => Outbound::Result {
                id,
                fields: fields([("devices", devices.into())]),
            },
            Err(err) => Outbound::Error {
                id: Some(id),
                code: ErrorCode::BadRequest,
                message: format!("push.register: {err}"),
            },
        },
        Inbound::PushUnregister { token, .. } => {
            let removed = push.unregister(&identity.tenant, user, &token);
            Outbound::Result {
                id,
                fields: fields([("removed", removed.into())]),
            }
        }
        Inbound::PushDevices { user, .. } => {
            if !valid_name(&user) {
                return Outbound::Error {
                    id: Some(id),
                    code: ErrorCode::BadRequest,
                    message: format!("user: {user:?}: 1 to 64 of A-Z a-z 0-9 . _ @ + -"),
                };
            }
            let devices = push.devices(&identity.tenant, &user);
            Outbound::Result {
                id,
                fields: fields([
                    ("user", user.into()),
                    ("devices", serde_json::to_value(devices).expect("JSON")),
                ]),
            }
        }
        _ => unreachable!("push requests only"),
    }
}

async fn send(socket: &mut Socket, message: &Outbound) -> Result<(), tungstenite::Error> {
    socket.send(frame(message)).await
}

fn frame(message: &Outbound) -> Message {
    Message::text(serde_json::to_string(message).expect("outbound messages serialize"))
}

/// A message whose recipient is not connected here, to the other nodes of the cluster
/// that have it; `offline` (as here) when none has.
async fn forward(
    context: &Shared,
    session: SessionId,
    identity: &Identity,
    to: &Target,
    body: serde_json::Value,
    offline: RouteError,
) -> Result<usize, RouteError> {
    let Some(cluster) = &context.cluster else {
        return Err(offline);
    };
    let recipient = match (identity.role, to) {
        (
            Role::Client,
            Target::Role {
                role: Role::Controller,
            },
        ) => Recipient::Controller,
        (Role::Controller, Target::User { user }) => Recipient::User(user.clone()),
        _ => return Err(offline),
    };
    let message = Outbound::Message {
        from: Sender {
            role: identity.role,
            user: identity.user.clone(),
            session,
        },
        body,
    };
    let message = serde_json::to_value(&message).expect("outbound messages serialize");
    match cluster.forward(&identity.tenant, &recipient, message).await {
        Forwarded::Delivered(delivered) => Ok(delivered),
        Forwarded::Busy => Err(RouteError {
            code: ErrorCode::Busy,
            message: "the recipient's queues on another relay are full; try again".to_owned(),
        }),
        Forwarded::Nowhere => Err(RouteError {
            message: format!("{} (on any relay of the cluster)", offline.message),
            ..offline
        }),
        Forwarded::Unreachable => Err(RouteError {
            message: format!(
                "{} (on this relay; the cluster's other relays cannot be reached now)",
                offline.message
            ),
            ..offline
        }),
    }
}

/// The most queued messages written with one flush.
const MOST_BATCHED: usize = 64;

/// `first` and what else is queued behind it (up to [`MOST_BATCHED`] in all), written with
/// one flush: the stats of 1,000 calls fall due together, and a write (a TLS record, a TCP
/// segment, a system call) per event cost relayd more than everything else its connected
/// calls did.
async fn send_queued(
    socket: &mut Socket,
    first: &Outbound,
    queue: &mut tokio::sync::mpsc::Receiver<Outbound>,
) -> Result<(), tungstenite::Error> {
    socket.feed(frame(first)).await?;
    for _ in 1..MOST_BATCHED {
        let Ok(message) = queue.try_recv() else { break };
        socket.feed(frame(&message)).await?;
    }
    socket.flush().await
}

async fn close(socket: &mut Socket, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
    let _ = socket.flush().await;
}
