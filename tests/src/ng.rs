//! A client of rtpengine's ng control protocol, as Kamailio's `rtpengine` module speaks it:
//! over UDP, each message `<cookie> <bencoded dictionary>`, the reply under the same
//! cookie. Requests are written as JSON objects (strings, integers, lists, dictionaries)
//! and replies read back as JSON, byte strings as UTF-8.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_bencode::value::Value as Bencode;
use serde_json::Value;

use crate::netns::NetNs;

pub struct NgClient {
    socket: UdpSocket,
    server: SocketAddr,
}

/// How long one try waits for its reply, and how many tries (ng over UDP is retransmitted
/// by the client under the same cookie).
const REPLY_WAIT: Duration = Duration::from_secs(2);
const TRIES: usize = 3;

impl NgClient {
    /// A client in `ns` of the ng server at `server`.
    pub fn new(ns: &NetNs, server: SocketAddr) -> NgClient {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("address"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("address"),
        };
        let socket = ns.udp_socket(local);
        socket
            .set_read_timeout(Some(REPLY_WAIT))
            .expect("read timeout");
        NgClient { socket, server }
    }

    /// Sends `request` (a JSON object with a `command`) and returns the reply dictionary;
    /// an `error` result is an error with the server's `error-reason`.
    pub fn request(&mut self, request: &Value) -> anyhow::Result<Value> {
        // Unique in the process, not only in this client: rtpengine caches its replies by
        // cookie alone, so a second client's cookie 1 would get the first one's reply.
        let cookie = crate::unique("c");
        let mut message = format!("{cookie} ").into_bytes();
        message.extend(serde_bencode::to_bytes(&to_bencode(request)?)?);
        let mut buf = vec![0u8; 65536];
        for _ in 0..TRIES {
            self.socket.send_to(&message, self.server)?;
            while let Ok((n, _)) = self.socket.recv_from(&mut buf) {
                let Some((got, body)) = split_cookie(&buf[..n]) else {
                    continue;
                };
                if got != cookie.as_bytes() {
                    continue;
                }
                let reply: Bencode = serde_bencode::from_bytes(body)
                    .with_context(|| format!("ng reply to {request}"))?;
                let reply = to_json(&reply);
                if reply["result"] == "error" {
                    bail!(
                        "ng {}: {}",
                        request["command"],
                        reply["error-reason"].as_str().unwrap_or("no reason given")
                    );
                }
                return Ok(reply);
            }
        }
        bail!(
            "ng {}: no reply from {} after {TRIES} tries",
            request["command"],
            self.server
        )
    }
}

fn split_cookie(message: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = message.iter().position(|b| *b == b' ')?;
    Some((&message[..space], &message[space + 1..]))
}

fn to_bencode(value: &Value) -> anyhow::Result<Bencode> {
    Ok(match value {
        Value::String(s) => Bencode::Bytes(s.as_bytes().to_vec()),
        Value::Number(n) => Bencode::Int(n.as_i64().context("ng integers are whole numbers")?),
        Value::Bool(b) => Bencode::Bytes(if *b { b"yes".to_vec() } else { b"no".to_vec() }),
        Value::Array(items) => {
            Bencode::List(items.iter().map(to_bencode).collect::<Result<_, _>>()?)
        }
        Value::Object(fields) => Bencode::Dict(
            fields
                .iter()
                .map(|(k, v)| Ok((k.as_bytes().to_vec(), to_bencode(v)?)))
                .collect::<anyhow::Result<HashMap<_, _>>>()?,
        ),
        Value::Null => bail!("ng has no null"),
    })
}

fn to_json(value: &Bencode) -> Value {
    match value {
        Bencode::Bytes(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
        Bencode::Int(n) => Value::from(*n),
        Bencode::List(items) => Value::Array(items.iter().map(to_json).collect()),
        Bencode::Dict(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), to_json(v)))
                .collect(),
        ),
    }
}
