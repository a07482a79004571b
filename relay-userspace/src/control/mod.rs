//! The local control API relayctl uses: newline-delimited JSON over a Unix socket, versioned.
//! The format is documented in docs/control-api.md.

pub mod client;
mod convert;
pub mod protocol;
pub mod server;

#[cfg(test)]
mod tests {
    /// The wire types are the protocol's own: `protocol.rs` uses nothing of the crate, so a
    /// change inside relayd cannot change protocol v1 without a change in that file.
    #[test]
    fn the_protocol_imports_nothing_of_the_crate() {
        let text = include_str!("protocol.rs");
        assert!(
            !text.contains("crate::"),
            "control/protocol.rs names crate:: paths"
        );
        assert!(
            !text.contains("use super"),
            "control/protocol.rs imports its siblings"
        );
    }
}
