//! rtpengine 10.5 (Debian `rtpengine-daemon`) in userspace mode (`--table=-1`, no kernel
//! module), the comparison for the relay's ng protocol and its media: started in a
//! namespace with its interfaces and ng socket, up once it answers an ng ping, killed on
//! drop.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{netns::NetNs, ng::NgClient, process::Background};

pub struct Rtpengine {
    process: Background,
    log: tempfile::NamedTempFile,
}

impl Rtpengine {
    /// `interfaces` as rtpengine writes them (`wan/198.51.100.1`), media ports `ports`,
    /// `extra` arguments after those.
    pub fn start(
        ns: &NetNs,
        interfaces: &[&str],
        ng: &str,
        ports: (u16, u16),
        extra: &[&str],
    ) -> Rtpengine {
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let mut args: Vec<String> = [
            "rtpengine",
            "--config-file=none",
            "--foreground",
            "--table=-1",
            "--log-stderr",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(interfaces.iter().map(|i| format!("--interface={i}")));
        args.push(format!("--listen-ng={ng}"));
        args.push(format!("--port-min={}", ports.0));
        args.push(format!("--port-max={}", ports.1));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Background::spawn_with_output(ns, &args, log.path());
        let rtpengine = Rtpengine { process, log };
        let mut client = NgClient::new(ns, ng.parse().expect("ng address"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.request(&json!({"command": "ping"})).is_err() {
            assert!(
                Instant::now() < deadline,
                "rtpengine answers no ng ping:\n{}",
                rtpengine.log()
            );
        }
        rtpengine
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}
