//! A real redis-server (Debian's) inside a test's network namespace, on loopback, with
//! nothing kept on disk; stopped on drop.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{netns::NetNs, process::Background};

pub struct RedisServer {
    process: Background,
    ns: String,
    pub port: u16,
}

impl RedisServer {
    /// Starts redis-server on 127.0.0.1:`port` inside `ns` and waits until it answers PING.
    pub fn start(ns: &NetNs, port: u16) -> RedisServer {
        let port_text = port.to_string();
        let process = Background::spawn(
            ns,
            &[
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                &port_text,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                "/tmp",
            ],
        );
        let server = RedisServer {
            process,
            ns: ns.name.clone(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} does not answer PING after 10 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.ns, "redis-cli", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// `redis-cli COMMAND ...`'s output, trimmed; panics if redis-cli fails.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed (redis-server {})", self.pid()))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}
