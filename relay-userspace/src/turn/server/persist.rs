//! The TURN server's allocations as the state store keeps them ([`AllocationRecord`]), and
//! back: what a restarted relayd restores.

use std::{collections::HashMap, net::IpAddr};

use stun_codec::TransactionId;

use super::{Action, Allocation, Channel, TurnServer, channel_flows};
use crate::state::{AllocationRecord, ChannelRecord};

impl TurnServer {
    /// The allocations as the state store keeps them.
    pub fn snapshot(&self) -> Vec<AllocationRecord> {
        self.allocations
            .iter()
            .map(|(&(client, server), allocation)| AllocationRecord {
                client,
                server,
                username: allocation.username.clone(),
                relays: allocation.relays.clone(),
                expires: allocation.expires,
                dont_fragment: allocation.dont_fragment,
                permissions: allocation
                    .permissions
                    .iter()
                    .map(|(ip, expires)| (*ip, *expires))
                    .collect(),
                channels: allocation
                    .channels
                    .iter()
                    .map(|(number, channel)| ChannelRecord {
                        number: *number,
                        peer: channel.peer,
                        relay: channel.relay,
                        expires: channel.expires,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Takes back allocations a previous relayd stored: those still alive at `now`, on
    /// relay addresses this configuration still serves, not clashing with one another.
    /// Returns the actions that bring them back (relay sockets, then channel flows) and how
    /// many were restored. Their clients keep their 5-tuples and relayed addresses, and
    /// the nonces they hold when the server keeps its nonce key ([`TurnServer::keep_nonces`]).
    pub fn restore(&mut self, stored: Vec<AllocationRecord>, now: u64) -> (Vec<Action>, usize) {
        let mut actions = Vec::new();
        let mut restored = 0;
        for state in stored {
            let five_tuple = (state.client, state.server);
            let servable = state.relays.iter().all(|relay| {
                let ours = match relay.ip() {
                    IpAddr::V4(v4) => self.config.relay_ipv4 == Some(v4),
                    IpAddr::V6(v6) => self.config.relay_ipv6 == Some(v6),
                };
                ours && self.config.ports.contains(&relay.port()) && self.is_free(*relay)
            });
            if state.expires <= now || !servable || self.allocations.contains_key(&five_tuple) {
                tracing::info!(client = %state.client, relays = ?state.relays, "turn: stored allocation not restored (expired, or its relay address is no longer served)");
                continue;
            }
            let mut channels = HashMap::new();
            for channel in &state.channels {
                if channel.expires <= now {
                    continue;
                }
                channels.insert(
                    channel.number,
                    Channel {
                        peer: channel.peer,
                        relay: channel.relay,
                        expires: channel.expires,
                    },
                );
                actions.push(Action::Offload(channel_flows(
                    five_tuple,
                    channel.relay,
                    channel.number,
                    channel.peer,
                )));
            }
            for relay in &state.relays {
                self.by_relay.insert(*relay, five_tuple);
                actions.push(Action::OpenRelay {
                    relay: *relay,
                    dont_fragment: state.dont_fragment,
                });
            }
            self.allocations.insert(
                five_tuple,
                Allocation {
                    username: state.username,
                    relays: state.relays,
                    expires: state.expires,
                    transaction: TransactionId::new([0; 12]),
                    answer: None,
                    dont_fragment: state.dont_fragment,
                    permissions: state
                        .permissions
                        .into_iter()
                        .filter(|(_, expires)| *expires > now)
                        .collect(),
                    channels,
                },
            );
            restored += 1;
        }
        // Relay sockets first, then the flows that forward to and from them.
        actions.sort_by_key(|action| !matches!(action, Action::OpenRelay { .. }));
        (actions, restored)
    }
}
