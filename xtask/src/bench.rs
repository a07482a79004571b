//! `cargo xtask bench <suite>`: builds in release mode and runs the suite's benchmark binary
//! (in the tests crate, which has the namespace harness). Benchmarks measure and print; they
//! assert nothing.

use crate::util;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Suite {
    /// XDP program ns/packet (empty and 1M-flow table) and end-to-end pps, XDP vs userspace
    Fastpath,
    /// TURN ChannelData relaying: ours with XDP offload, ours in userspace, and coturn
    Turn,
    /// Calls: setups per second through signalling and ICE, concurrent calls at 50 pps each
    /// way, media in XDP vs userspace
    Calls,
    /// Bridged calls (SDES-SRTP toward the app, plain RTP toward the PBX), the relay
    /// transcrypting, side by side with rtpengine in userspace
    Anchor,
    /// The relay under Kamailio over ng: call setup rate through Kamailio, concurrent calls
    /// at 50 pps each way, side by side with rtpengine in userspace
    Ng,
    /// Two relays sharing Redis: what a cross-relay hop adds to signalling
    Cluster,
}

pub fn run(suite: Suite, parts: &[String]) -> anyhow::Result<()> {
    let binary = match suite {
        Suite::Fastpath => "bench-fastpath",
        Suite::Turn => "bench-turn",
        Suite::Calls => "bench-calls",
        Suite::Anchor => "bench-anchor",
        Suite::Ng => "bench-ng",
        Suite::Cluster => "bench-cluster",
    };
    match (suite, parts) {
        (Suite::Fastpath, _) | (_, []) => {}
        (Suite::Anchor, [part]) if part == "crypto" => {}
        _ => anyhow::bail!(
            "only the fastpath suite has parts to choose from, and anchor its `crypto` alone"
        ),
    }
    run_binary(binary, parts)
}

/// Builds relayd, relayctl and the tests crate's binaries in release mode, and runs
/// `binary` (a benchmark, or the demo) with `args`.
pub fn run_binary(binary: &str, args: &[String]) -> anyhow::Result<()> {
    util::cargo(
        &[
            "build",
            "-p",
            "relay-userspace",
            "-p",
            "relay-tests",
            "--bins",
        ],
        true,
    )?;
    let path = util::target_dir().join("release").join(binary);
    util::step(&format!("running {}", path.display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    util::run(path.to_str().expect("utf-8 path"), &args)
}
