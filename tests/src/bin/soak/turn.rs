//! The soak's TURN allocations: clients of the `turn` crate (an implementation we did not
//! write) in the app's namespace, behind the NAT, each with an allocation on the relay and a
//! channel bound to the PBX side's echo. The long-lived ones stay for the whole soak: the
//! crate refreshes their allocation and permission, and a small datagram through the
//! relayed connection every 30 s lets it refresh the channel binding (it does so on a send
//! once the binding is 5 minutes old). Their media is the paced generator's ChannelData on
//! the clients' own 5-tuples; its echo is counted at the NAT and dropped in the app's
//! namespace before the clients' sockets (nftables), so the test process reads only the
//! clients' STUN. The churned ones allocate, talk, and delete their allocation.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use relay_tests::turn_client;
use turn::client::Client;
use webrtc_util::Conn;

/// The TURN user of the soak's configuration.
pub const USERNAME: &str = "soak";
pub const PASSWORD: &str = "soak-turn-secret";
/// The first channel number the turn crate's client binds: each client binds one.
pub const CHANNEL: u16 = 0x4000;
/// UDP length of the churned allocations' datagrams at the echo: unlike the generator's,
/// their echo reaches the clients.
const CHURN_PAYLOAD: usize = 100;

/// The generator's ChannelData for `payload` on the clients' channel (RFC 8656 12.4).
pub fn channel_data(payload: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + payload.len());
    data.extend_from_slice(&CHANNEL.to_be_bytes());
    data.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    data.extend_from_slice(payload);
    data
}

/// What the allocations did, for the report.
#[derive(Default)]
pub struct Counts {
    /// Long-lived allocations made, and those that failed to be made.
    pub allocated: AtomicU64,
    pub failed: AtomicU64,
    /// Churned allocations made and deleted, their datagrams sent and echoed.
    pub churned: AtomicU64,
    pub churn_failed: AtomicU64,
    pub churn_sent: AtomicU64,
    pub churn_echoed: AtomicU64,
}

/// A client with an allocation whose channel to `peer` is bound, on its own socket on
/// the app's address; the calling thread is in the app's namespace.
async fn allocate(
    server: SocketAddr,
    peer: SocketAddr,
) -> Result<(Client, impl Conn, SocketAddr), String> {
    let socket = tokio::net::UdpSocket::bind((Ipv4Addr::new(10, 20, 0, 2), 0))
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let client = turn_client::listening(socket, server, USERNAME, PASSWORD).await?;
    let relay = client
        .allocate()
        .await
        .map_err(|e| format!("allocate: {e}"))?;
    // The first datagram creates the permission and starts the ChannelBind.
    relay
        .send_to(b"bind", peer)
        .await
        .map_err(|e| format!("permission for {peer}: {e}"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((client, relay, local))
}

/// `count` long-lived allocations, made 50 at a time; each sends its client's address on
/// `addresses` once its channel is bound, and deletes its allocation once `done` is set.
pub async fn keep(
    count: usize,
    server: SocketAddr,
    peer: SocketAddr,
    addresses: std::sync::mpsc::Sender<SocketAddr>,
    done: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let allocating = Arc::new(tokio::sync::Semaphore::new(50));
    let mut tasks = Vec::new();
    for _ in 0..count {
        let (addresses, done, counts, allocating) = (
            addresses.clone(),
            done.clone(),
            counts.clone(),
            allocating.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let allocated = {
                let _permit = allocating.acquire().await.expect("semaphore");
                allocate(server, peer).await
            };
            let (client, relay, local) = match allocated {
                Ok(allocated) => allocated,
                Err(err) => {
                    if counts.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("soak: a TURN allocation failed: {err}");
                    }
                    return;
                }
            };
            counts.allocated.fetch_add(1, Ordering::Relaxed);
            let _ = addresses.send(local);
            let mut keep = tokio::time::interval(Duration::from_secs(30));
            let mut buf = vec![0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = keep.tick() => { let _ = relay.send_to(b"keep", peer).await; }
                    // The echoes of those datagrams; nothing else gets past the app's filter.
                    _ = relay.recv_from(&mut buf) => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            let _ = relay.close().await;
            let _ = client.close().await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// `count` allocations made at once, each sending 50 datagrams at 50 per second through
/// its channel to the echo and counting the echoes (for up to a second after the last),
/// then deleting its allocation (Refresh with lifetime 0).
pub async fn churn(count: usize, server: SocketAddr, peer: SocketAddr, counts: Arc<Counts>) {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            let (client, relay, _) = match allocate(server, peer).await {
                Ok(allocated) => allocated,
                Err(err) => {
                    if counts.churn_failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("soak: a churned TURN allocation failed: {err}");
                    }
                    return;
                }
            };
            let mut echoed = std::collections::HashSet::new();
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            let mut buf = vec![0u8; 2048];
            let mut sent = 0u8;
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < until {
                tokio::select! {
                    _ = pace.tick(), if sent < 50 => {
                        let mut datagram = vec![0x80u8; CHURN_PAYLOAD];
                        datagram[1] = sent;
                        if relay.send_to(&datagram, peer).await.is_ok() {
                            sent += 1;
                        }
                    }
                    received = relay.recv_from(&mut buf) => {
                        if let Ok((CHURN_PAYLOAD, _)) = received {
                            echoed.insert(buf[1]);
                        }
                    }
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            counts
                .churn_sent
                .fetch_add(u64::from(sent), Ordering::Relaxed);
            counts
                .churn_echoed
                .fetch_add(echoed.len() as u64, Ordering::Relaxed);
            let _ = relay.close().await;
            let _ = client.close().await;
            counts.churned.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}
