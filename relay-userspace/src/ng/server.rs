//! The ng socket (UDP): each datagram `<cookie> <bencoded dictionary>`, each reply the same
//! cookie and a dictionary with `result` (`ok`, `pong`, `error` with `error-reason`). A
//! retransmission (the same cookie from the same proxy) gets the reply already sent, without
//! doing the work twice.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, sync::watch};

use super::{
    bencode::{self, Value},
    calls::NgCalls,
    protocol::{self, NgError, Request},
};

/// Datagrams longer than this are refused (a large WebRTC offer is 10 KiB).
pub const MAX_MESSAGE: usize = 32 * 1024;
/// How long replies are kept for retransmissions (Kamailio retries within seconds).
const CACHE_FOR: Duration = Duration::from_secs(30);
/// Replies kept at most; the oldest go first.
const CACHE_SIZE: usize = 4096;

/// ng commands by command and result, for the metrics.
#[derive(Debug, Default)]
pub struct NgStats {
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl NgStats {
    fn count(&self, command: &'static str, result: &'static str) {
        *self
            .counts
            .lock()
            .expect("ng stats poisoned")
            .entry((command, result))
            .or_default() += 1;
    }

    pub fn counts(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.counts.lock().expect("ng stats poisoned").clone()
    }
}

struct ReplyCache {
    replies: HashMap<(SocketAddr, Vec<u8>), Vec<u8>>,
    order: VecDeque<(Instant, (SocketAddr, Vec<u8>))>,
}

impl ReplyCache {
    fn get(&mut self, key: &(SocketAddr, Vec<u8>), now: Instant) -> Option<&Vec<u8>> {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < CACHE_FOR && self.order.len() <= CACHE_SIZE {
                break;
            }
            let (_, old) = self.order.pop_front().expect("front exists");
            self.replies.remove(&old);
        }
        self.replies.get(key)
    }

    fn put(&mut self, key: (SocketAddr, Vec<u8>), reply: Vec<u8>, now: Instant) {
        self.order.push_back((now, key.clone()));
        self.replies.insert(key, reply);
    }
}

pub struct NgServer {
    socket: UdpSocket,
    calls: Arc<NgCalls>,
    stats: Arc<NgStats>,
}

impl NgServer {
    pub async fn bind(
        address: SocketAddr,
        calls: Arc<NgCalls>,
        stats: Arc<NgStats>,
    ) -> anyhow::Result<NgServer> {
        let socket = UdpSocket::bind(address)
            .await
            .map_err(|err| anyhow::anyhow!("ng.listen: {address}: cannot listen: {err}"))?;
        Ok(NgServer {
            socket,
            calls,
            stats,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until `stopped`; also ends the calls nobody deletes, every second.
    pub async fn serve(self, mut stopped: watch::Receiver<bool>) {
        let mut cache = ReplyCache {
            replies: HashMap::new(),
            order: VecDeque::new(),
        };
        let mut buf = vec![0u8; 65536];
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            let (n, from) = tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok(received) => received,
                    Err(err) => {
                        tracing::debug!(%err, "ng: receive failed");
                        continue;
                    }
                },
                _ = every.tick() => {
                    self.calls.expire();
                    continue;
                }
                _ = stopped.changed() => break,
            };
            let datagram = &buf[..n];
            let Some(space) = datagram.iter().position(|&b| b == b' ') else {
                // No cookie: nothing to answer under.
                self.stats.count("none", "error");
                tracing::debug!(%from, "ng: a datagram without a cookie ignored");
                continue;
            };
            let (cookie, body) = (&datagram[..space], &datagram[space + 1..]);
            let key = (from, cookie.to_vec());
            let now = Instant::now();
            if let Some(reply) = cache.get(&key, now) {
                let _ = self.socket.send_to(reply, from).await;
                continue;
            }
            let (command, reply) = if n > MAX_MESSAGE {
                (
                    "none",
                    error(&NgError::new(format!(
                        "the message is {n} bytes, more than {MAX_MESSAGE}"
                    ))),
                )
            } else {
                self.handle(body).await
            };
            let result = match reply.get("result").and_then(|r| r.as_str()).as_deref() {
                Some("error") => "error",
                _ => "ok",
            };
            self.stats.count(command, result);
            if result == "error" {
                tracing::info!(%from, command, reason = %reply.get("error-reason").and_then(|r| r.as_str()).unwrap_or_default(), "ng: request refused");
            }
            let mut out = cookie.to_vec();
            out.push(b' ');
            out.extend(reply.encode());
            let _ = self.socket.send_to(&out, from).await;
            cache.put(key, out, now);
        }
        self.calls.stop();
    }

    async fn handle(&self, body: &[u8]) -> (&'static str, Value) {
        let request = match bencode::decode(body)
            .map_err(|err| NgError::new(err.to_string()))
            .and_then(|message| protocol::parse(&message))
        {
            Ok(request) => request,
            Err(err) => return ("none", error(&err)),
        };
        let command = request.command();
        let reply = match &request {
            Request::Ping => Ok(Value::dict([("result", Value::bytes("pong"))])),
            Request::Offer(signal) => self
                .calls
                .offer(signal)
                .await
                .map(|sdp| ok_sdp(sdp, &signal.options.unknown)),
            Request::Answer(signal) => self
                .calls
                .answer(signal)
                .await
                .map(|sdp| ok_sdp(sdp, &signal.options.unknown)),
            Request::Delete(target) => self.calls.delete(target),
            Request::Query(target) => self.calls.query(target),
            Request::List { limit } => Ok(Value::dict([
                ("result", Value::bytes("ok")),
                (
                    "calls",
                    Value::List(
                        self.calls
                            .list(*limit)
                            .into_iter()
                            .map(Value::bytes)
                            .collect(),
                    ),
                ),
            ])),
            Request::Statistics => Ok(self.statistics()),
        };
        (command, reply.unwrap_or_else(|err| error(&err)))
    }

    fn statistics(&self) -> Value {
        let int = |n: u64| Value::Int(n.min(i64::MAX as u64) as i64);
        let totals = self.calls.totals();
        let ended: u64 = totals.ended.values().sum();
        let commands: Vec<(String, Value)> = self
            .stats
            .counts()
            .into_iter()
            .map(|((command, result), n)| (format!("{command} {result}"), int(n)))
            .collect();
        Value::dict([
            ("result", Value::bytes("ok")),
            (
                "statistics",
                Value::dict([
                    ("current sessions", int(self.calls.len() as u64)),
                    ("total sessions", int(totals.created)),
                    ("ended sessions", int(ended)),
                    (
                        "commands",
                        Value::Dict(
                            commands
                                .into_iter()
                                .map(|(k, v)| (k.into_bytes(), v))
                                .collect(),
                        ),
                    ),
                ]),
            ),
        ])
    }
}

fn ok_sdp(sdp: String, unknown: &[String]) -> Value {
    let mut reply = vec![("result", Value::bytes("ok")), ("sdp", Value::bytes(sdp))];
    if !unknown.is_empty() {
        reply.push((
            "warning",
            Value::bytes(format!("Unknown flag(s) ignored: {}", unknown.join(", "))),
        ));
    }
    Value::dict(reply)
}

fn error(err: &NgError) -> Value {
    Value::dict([
        ("result", Value::bytes("error")),
        ("error-reason", Value::bytes(err.0.clone())),
    ])
}
