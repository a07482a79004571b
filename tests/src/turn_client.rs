//! Allocations made by the `turn` crate's client (webrtc-rs), an implementation we did not
//! write, on a TURN server under test (ours or coturn).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

use crate::netns::NetNs;

/// The channel number the turn crate's client gives its first binding.
pub const FIRST_CHANNEL: u16 = 0x4000;

/// A bound channel whose client no longer runs: a packet generator sends ChannelData on
/// the client's 5-tuple in its place.
pub struct BoundChannel {
    /// The client's address (the 5-tuple's source).
    pub client: SocketAddr,
    pub relayed: SocketAddr,
    pub channel: u16,
    /// Keeps the client's port: a closed port would make the host answer with ICMP.
    _socket: std::net::UdpSocket,
}

impl BoundChannel {
    /// Sends `payload` as ChannelData on the bound channel to `server` from the client's
    /// port; whether the peer's echo of it comes back on the channel within `within`
    /// (other data arriving meanwhile, earlier echoes, is skipped).
    pub fn echoes(&self, server: SocketAddr, payload: &[u8], within: Duration) -> bool {
        let mut data = Vec::with_capacity(4 + payload.len());
        data.extend_from_slice(&self.channel.to_be_bytes());
        data.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        data.extend_from_slice(payload);
        let _ = self._socket.send_to(&data, server);
        let deadline = std::time::Instant::now() + within;
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < deadline {
            match self._socket.recv_from(&mut buf) {
                Ok((n, _)) if n >= 4 && buf[..2] == self.channel.to_be_bytes() => {
                    let length = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                    if buf[4..(4 + length).min(n)] == *payload {
                        return true;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        false
    }
}

/// A client of `server` on `socket` with long-term credentials, listening (reading its
/// socket); the realm is taken from the server's 401.
pub async fn listening(
    socket: tokio::net::UdpSocket,
    server: SocketAddr,
    username: &str,
    password: &str,
) -> Result<Client, String> {
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: username.into(),
        password: password.into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(socket),
        vnet: None,
    })
    .await
    .map_err(|e| format!("turn client: {e}"))?;
    client.listen().await.map_err(|e| e.to_string())?;
    Ok(client)
}

/// Allocates on `server` from `local` (port 0: any) in `ns` with long-term credentials, creates a permission and
/// binds a channel to `peer` (the client's first datagram toward it does both), then stops
/// the client without deleting the allocation: it lives its lifetime (10 minutes by
/// default), longer than a benchmark step.
pub fn bind_channel(
    ns: &NetNs,
    local: SocketAddr,
    server: SocketAddr,
    username: &str,
    password: &str,
    peer: SocketAddr,
) -> Result<BoundChannel, String> {
    let socket = ns.udp_socket(local);
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let kept = socket.try_clone().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = socket.local_addr().map_err(|e| e.to_string())?;
    let relayed = runtime.block_on(async {
        let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| e.to_string())?;
        let client = listening(socket, server, username, password).await?;
        let relay = client
            .allocate()
            .await
            .map_err(|e| format!("allocate on {server}: {e}"))?;
        let relayed = relay.local_addr().map_err(|e| e.to_string())?;
        relay
            .send_to(b"hello", peer)
            .await
            .map_err(|e| format!("permission for {peer}: {e}"))?;
        // The ChannelBind goes out with the first datagram; give it its answer.
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.close().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(relayed)
    })?;
    Ok(BoundChannel {
        client,
        relayed,
        channel: FIRST_CHANNEL,
        _socket: kept,
    })
}
