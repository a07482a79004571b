//! Background processes a test starts (peers, other servers), killed on drop.

use std::process::{Child, Command, Stdio};

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
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
