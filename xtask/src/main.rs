//! Developer tasks: `cargo xtask setup | build | run | test | bench | fuzz | deb | demo |
//! layers`.

mod bench;
mod deb;
mod fuzz;
mod layers;
mod leftovers;
mod run;
mod setup;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark the relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make sure the eBPF toolchain is there: nightly rust-src and a bpf-linker built against
    /// nightly's LLVM (idempotent)
    Setup,
    /// Build everything (the XDP object is rebuilt only when relay-ebpf or relay-common changed)
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build relayd and relayctl and start relayd with a trial configuration on loopback
    /// (TURN, signalling and calls, secrets made for the run); extra args go to relayd
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test, including the XDP and network-namespace tests (needs root)
    Test,
    /// Measure: `fastpath` (XDP program cost, end-to-end packets per second XDP vs userspace),
    /// `turn` (TURN relaying: offload, userspace, coturn), `calls` (setup, concurrent calls,
    /// XDP vs userspace), `anchor` (bridged calls: relayd vs rtpengine, DTLS setup), `ng`
    /// (under Kamailio over ng: setup rate, concurrent calls, relayd vs rtpengine),
    /// `cluster` (two relays sharing Redis: signalling across them)
    Bench {
        #[arg(value_enum, default_value = "fastpath")]
        suite: bench::Suite,
        /// Parts of the suite to run (fastpath: cost, matrix, end-to-end; anchor: crypto, the
        /// SRTP transforms alone); all when none
        parts: Vec<String>,
    },
    /// Run the fuzz targets (fuzz/, cargo-fuzz on nightly) for --seconds each, all of them
    /// or those named; prints executions, corpus and crashes per target
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        targets: Vec<String>,
    },
    /// Concurrent calls and TURN allocations carrying media for --minutes while faults are
    /// injected on a printed schedule (relayd killed and restarted, the LAN link flapped,
    /// 200 signalling reconnects, call and allocation churn, a reload); prints loss per
    /// slice, the churn, RSS and open files, flows and allocations left and the warnings
    /// (needs root)
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        #[arg(long, default_value_t = 1000)]
        calls: u64,
        #[arg(long, default_value_t = 1000)]
        allocations: u64,
        /// Only these faults, comma-separated (kill, restart, link-flap, reconnects,
        /// churn, reload), each after a quiet slice
        #[arg(long)]
        faults: Option<String>,
    },
    /// Build the Debian package (target/deb/relay_<version>_<arch>.deb)
    Deb,
    /// relay-userspace's modules in layers, lowest first; fails on an import cycle
    Layers,
    /// The relay in namespaces (app behind NAT, relay, PBX) with three calls' media for
    /// about 20 s and live relayctl tables; removes everything it made (needs root)
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::Build { release } => {
            setup::run()?;
            util::cargo(&["build"], release)
        }
        Command::Run { args } => {
            setup::run()?;
            run::run(&args)
        }
        Command::Test => {
            setup::run()?;
            setup::test_tools()?;
            leftovers::sweep(&util::target_dir());
            // The default members: everything but relay-ebpf, which build.rs builds for BPF.
            util::cargo(&["build"], false)?;
            util::cargo(
                &[
                    "test",
                    "-p",
                    "relay-common",
                    "-p",
                    "relay-userspace",
                    "-p",
                    "xtask",
                ],
                false,
            )?;
            // The namespace tests saturate both cores with packets: one at a time keeps their
            // loss checks about the relay, not about scheduling.
            // The package test installs this .deb into a clean Debian root.
            let deb = deb::build()?;
            // SAFETY: single-threaded here; the variable is read by the test processes.
            unsafe { std::env::set_var("RELAY_DEB", &deb) };
            util::cargo(
                &["test", "-p", "relay-tests", "--", "--test-threads=1"],
                false,
            )
        }
        Command::Bench { suite, parts } => {
            setup::run()?;
            setup::test_tools()?;
            bench::run(suite, &parts)
        }
        Command::Fuzz { seconds, targets } => {
            // The fuzz targets link relay-userspace, which embeds the XDP program.
            setup::run()?;
            fuzz::run(seconds, &targets)
        }
        Command::Soak {
            minutes,
            calls,
            allocations,
            faults,
        } => {
            setup::run()?;
            setup::test_tools()?;
            bench::run_binary(
                "soak",
                &[
                    "--minutes".into(),
                    minutes.to_string(),
                    "--calls".into(),
                    calls.to_string(),
                    "--allocations".into(),
                    allocations.to_string(),
                ]
                .into_iter()
                .chain(
                    faults
                        .into_iter()
                        .flat_map(|faults| ["--faults".into(), faults]),
                )
                .collect::<Vec<String>>(),
            )
        }
        Command::Demo => {
            setup::run()?;
            setup::test_tools()?;
            bench::run_binary("demo", &[])
        }
        Command::Layers => layers::run(),
        Command::Deb => {
            setup::run()?;
            setup::packaging_tools()?;
            deb::build().map(|_| ())
        }
    }
}
