//! The relay's control plane as a library; `relayd` and `relayctl` are thin binaries over it.

pub mod admission;
pub mod calls;
pub mod cli_docs;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod ice;
pub mod media;
pub mod metrics;
pub mod ng;
pub mod paths;
pub mod push;
pub mod reload;
pub mod session;
pub mod signalling;
pub mod state;
pub mod time;
pub mod turn;
