//! Test harness: network namespaces and veth pairs that clean up after themselves, packets
//! built from scratch (checksums computed here, independently of the XDP program), and
//! relayd / relayctl processes.
//!
//! Everything here needs root (network namespaces, BPF). Every namespace, pin directory and
//! process is owned by a guard that removes it on drop, also when a test fails.

pub mod app;
pub mod bench;
pub mod config_file;
pub mod dtls_app;
pub mod fleet;
pub mod generator;
pub mod kamailio;
pub mod lab;
pub mod measure;
pub mod netns;
pub mod ng;
pub mod packet;
pub mod pbx;
pub mod process;
pub mod redis;
pub mod relayd;
pub mod rtpengine;
pub mod sdes;
pub mod signalling_client;
pub mod traffic;
pub mod turn_client;

/// Fails the test with a clear message when not run as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and load XDP programs: run them as root (cargo xtask test)"
    );
}

/// A name unique to this test process and call site, short enough for interface names.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A single-threaded tokio runtime, for a test's main thread or a thread that entered a
/// namespace (each thread drives its own).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Waits for a message on a std channel (from a test thread) without blocking the async
/// runtime; gives the receiver back for the next one.
pub async fn recv_async<T: Send + 'static>(
    receiver: std::sync::mpsc::Receiver<T>,
) -> (T, std::sync::mpsc::Receiver<T>) {
    tokio::task::spawn_blocking(move || {
        let message = receiver.recv().expect("the test thread is there");
        (message, receiver)
    })
    .await
    .expect("waiting on the channel")
}
