//! Many apps at once for the benchmarks and the soak, in the edge lab's app namespace
//! behind the NAT: one signalling session and one call each. The steady apps answer their call, talk for a second, tell the soak their
//! media address (the generator's flows) and stay; the first [`RECONNECTS`] of them open a
//! new signalling session at each reconnect round. The churned apps take a new call at
//! each churn round: they reconnect their signalling (their session may have gone with a
//! relayd killed since), say they are ready, answer the call the controller then places,
//! talk for a second and count the echoes.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    app::{App, talk},
    signalling_client::receive_within,
};

/// Steady apps whose signalling reconnects at once in the reconnect fault.
pub const RECONNECTS: usize = 200;

/// Rounds the soak starts (reconnects, churn) and what the apps did.
#[derive(Default)]
pub struct Fleet {
    pub done: AtomicBool,
    /// Steady apps with a session.
    pub connected: AtomicU64,
    pub reconnect: AtomicU64,
    pub reconnected: AtomicU64,
    pub churn: AtomicU64,
    /// Churned apps reconnected for the current round, calls they answered, packets they
    /// sent and got back.
    pub churn_ready: AtomicU64,
    pub churn_answered: AtomicU64,
    pub churn_sent: AtomicU64,
    pub churn_echoed: AtomicU64,
}

/// Runs `steady` apps with the first tokens and churned ones with the rest, until `done`;
/// the calling thread is in the app's namespace.
pub async fn run(
    tokens: Vec<String>,
    steady: usize,
    fingerprint: String,
    addresses: std::sync::mpsc::Sender<SocketAddr>,
    apps: Arc<Fleet>,
) {
    let connecting = Arc::new(tokio::sync::Semaphore::new(20));
    let mut tasks = Vec::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let (fingerprint, addresses, apps, connecting) = (
            fingerprint.clone(),
            addresses.clone(),
            apps.clone(),
            connecting.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let app = {
                let _permit = connecting.acquire().await.expect("semaphore");
                App::in_edge_lab(&fingerprint, &token).await
            };
            apps.connected.fetch_add(1, Ordering::Relaxed);
            if index < steady {
                steady_app(app, index, &fingerprint, &token, addresses, &apps).await;
            } else {
                churned_app(app, &fingerprint, &token, &apps).await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn steady_app(
    mut app: App,
    index: usize,
    fingerprint: &str,
    token: &str,
    addresses: std::sync::mpsc::Sender<SocketAddr>,
    apps: &Fleet,
) {
    let incoming = app.next_within(Duration::from_secs(600)).await;
    let media = app.answer(&incoming).await;
    talk(&media, 0, 50).await;
    if let Ok(local) = media.local_addr() {
        let _ = addresses.send(local);
    }
    let mut round = 0;
    while !apps.done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = apps.reconnect.load(Ordering::Relaxed);
        if now != round && index < RECONNECTS {
            round = now;
            // A new session; the old one's socket closes with it.
            app.signalling = App::in_edge_lab(fingerprint, token).await.signalling;
            apps.reconnected.fetch_add(1, Ordering::Relaxed);
        }
    }
    app.close().await;
}

async fn churned_app(mut app: App, fingerprint: &str, token: &str, apps: &Fleet) {
    // The first call is placed with the steady ones'.
    let mut round = 0;
    let mut ringing = true;
    while !apps.done.load(Ordering::Relaxed) {
        let now = apps.churn.load(Ordering::Relaxed);
        if now != round {
            round = now;
            app.close_agents().await;
            app.signalling = App::in_edge_lab(fingerprint, token).await.signalling;
            apps.churn_ready.fetch_add(1, Ordering::Relaxed);
            ringing = true;
        }
        if !ringing {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Waits a little at a time, so that `done` and new rounds are seen.
        let next = tokio::time::timeout(
            Duration::from_millis(200),
            receive_within(&mut app.signalling, Duration::from_secs(3600)),
        )
        .await;
        match next {
            Ok(Ok(message)) if message["event"] == "call.incoming" => {
                ringing = false;
                let media = app.answer(&message).await;
                let talked = talk(&media, 0, 50).await;
                apps.churn_answered.fetch_add(1, Ordering::Relaxed);
                apps.churn_sent.fetch_add(50, Ordering::Relaxed);
                apps.churn_echoed
                    .fetch_add(u64::from(talked.echoed), Ordering::Relaxed);
            }
            // Other events (the old call's end); a session that closed waits for the
            // next round's reconnect.
            Ok(Ok(_)) => {}
            Ok(Err(_)) => ringing = false,
            Err(_) => {}
        }
    }
    app.close().await;
}
