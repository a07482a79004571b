//! Background processes a test starts (peers, other servers), killed on drop.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

pub struct Background {
    child: Child,
    pub name: String,
}

impl Background {
    /// Starts `args` inside `ns`, output discarded.
    pub fn spawn(ns: &NetNs, args: &[&str]) -> Background {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {args:?}: {err}"));
        Background {
            child,
            name: args[0].to_owned(),
        }
    }
}

impl Background {
    /// Starts `args` inside `ns` with standard output and error into the file `output`.
    pub fn spawn_with_output(ns: &NetNs, args: &[&str], output: &Path) -> Background {
        let file = std::fs::File::create(output)
            .unwrap_or_else(|err| panic!("{}: {err}", output.display()));
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("output file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {args:?}: {err}"));
        Background {
            child,
            name: args[0].to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit by itself; true if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
