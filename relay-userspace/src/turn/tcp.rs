//! TURN over TCP between client and server (RFC 8656 section 3.1, as coturn offers it):
//! for clients whose network lets no UDP out. Each connection is one client 5-tuple; its
//! byte stream carries STUN messages and ChannelData (padded to 4 bytes over TCP, section
//! 12.5), which go to the same TURN core as UDP datagrams. Relaying to peers stays UDP.
//! XDP does not touch TCP: these channels are relayed in userspace. The allocation ends
//! with its connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
    time::Instant,
};

use super::{driver::TurnService, server::RevokeTarget};
use crate::admission::Listener;

/// Bytes a connection may have waiting that make no whole message: one maximal STUN
/// message or ChannelData and a bit.
const MAX_PENDING: usize = 65_536 + 64;
/// Messages queued toward one client before the connection is deemed stuck.
const QUEUE: usize = 1024;
/// A client that connects must speak within this; one with an allocation refreshes it
/// before its lifetime ends (an hour at most, `turn.max_lifetime_secs`' default) and
/// checks consent far more often, so two hours of silence mean it is gone.
const FIRST_MESSAGE_LIMIT: Duration = Duration::from_secs(10);
const IDLE_LIMIT: Duration = Duration::from_secs(7200);
/// A message begun must be whole within this: a client sending one byte at a time (or one
/// byte and then nothing) would otherwise hold its connection for the idle limit.
const FRAME_LIMIT: Duration = Duration::from_secs(10);

/// The length of the first message in `buf` and how many bytes it takes on the stream
/// (ChannelData is padded to 4): Ok(None) until enough bytes are there; Err for a first
/// byte that starts neither STUN nor ChannelData (RFC 7983).
pub fn frame(buf: &[u8]) -> Result<Option<(usize, usize)>, u8> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if buf.len() < 4 {
        return match first {
            0..=3 | 0x40..=0x7f => Ok(None),
            other => Err(other),
        };
    }
    let length = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    match first {
        // STUN: a 20-byte header, then `length` bytes (a multiple of 4).
        0..=3 => Ok(Some((20 + length, 20 + length))),
        0x40..=0x7f => {
            let message = 4 + length;
            Ok(Some((message, message.next_multiple_of(4))))
        }
        other => Err(other),
    }
}

impl TurnService {
    /// Accepts TURN clients over TCP on `local` (a listening address).
    pub(super) async fn serve_tcp(self: Arc<Self>, mut listener: Listener, local: SocketAddr) {
        loop {
            let (stream, client, admitted) = listener.accept().await;
            let _ = stream.set_nodelay(true);
            let service = self.clone();
            tokio::spawn(async move {
                service
                    .stream_client(stream, Vec::new(), client, local, "tcp")
                    .await;
                drop(admitted);
            });
        }
    }

    /// Serves one client on a byte stream (TCP, or TLS on the signalling port), `first`
    /// being what was already read from it.
    pub async fn stream_client<S>(
        self: Arc<Self>,
        stream: S,
        first: Vec<u8>,
        client: SocketAddr,
        server: SocketAddr,
        transport: &'static str,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (queue, mut outgoing) = mpsc::channel::<Vec<u8>>(QUEUE);
        self.tcp_connected(client, server, queue, transport);
        let writing = tokio::spawn(async move {
            while let Some(bytes) = outgoing.recv().await {
                if writer.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        buf.extend_from_slice(&first);
        let mut heard = !first.is_empty();
        // When the first byte of a message not yet whole arrived.
        let mut partial_since: Option<Instant> = None;
        let why = loop {
            // Every whole message in the buffer first (`first` may hold some already).
            let mut stop = None;
            loop {
                match frame(&buf) {
                    Ok(Some((message, taken))) if buf.len() >= taken => {
                        let actions = self.server().from_client(
                            crate::time::unix_now(),
                            server,
                            client,
                            &buf[..message],
                        );
                        self.carry_out(actions);
                        buf.drain(..taken);
                    }
                    Ok(_) => break,
                    Err(first) => {
                        stop = Some(format!(
                            "not STUN or ChannelData (first byte {first:#04x}): the stream cannot be followed"
                        ));
                        break;
                    }
                }
            }
            if let Some(why) = stop {
                break why;
            }
            if buf.len() > MAX_PENDING {
                break "a message longer than STUN allows".to_owned();
            }
            // A connection that says nothing holds a socket for nothing; one that began a
            // message has a deadline for all of it.
            let now = Instant::now();
            partial_since = if buf.is_empty() {
                None
            } else {
                Some(partial_since.unwrap_or(now))
            };
            let (deadline, silence) = match partial_since {
                Some(since) => (since + FRAME_LIMIT, "a message not whole"),
                None if heard => (now + IDLE_LIMIT, "nothing received"),
                None => (now + FIRST_MESSAGE_LIMIT, "nothing received"),
            };
            match tokio::time::timeout_at(deadline, reader.read_buf(&mut buf)).await {
                Err(_) => {
                    break format!(
                        "{silence} for {:?}",
                        deadline - partial_since.unwrap_or(now)
                    );
                }
                Ok(Ok(0)) => break "closed by the client".to_owned(),
                Ok(Ok(_)) => heard = true,
                Ok(Err(err)) => break format!("{err}"),
            }
        };
        writing.abort();
        self.tcp_disconnected(client, server);
        // The allocation goes with its connection.
        let (actions, ended) = self
            .server()
            .revoke(&RevokeTarget::Client { client, server });
        self.carry_out(actions);
        tracing::info!(%client, %server, allocations_ended = ended, why, "turn: TCP client gone");
    }
}

#[cfg(test)]
mod tests {
    use super::frame;

    #[test]
    fn stun_and_channel_data_are_framed_from_their_headers() {
        // Too short to tell the length: wait.
        assert_eq!(frame(&[]), Ok(None));
        assert_eq!(frame(&[0x00, 0x01]), Ok(None));
        assert_eq!(frame(&[0x40, 0x01, 0x00]), Ok(None));
        // A Binding request with 8 bytes of attributes: 28 bytes.
        assert_eq!(frame(&[0x00, 0x01, 0x00, 0x08]), Ok(Some((28, 28))));
        // ChannelData with 5 bytes of data: 9 bytes, padded to 12 on the stream.
        assert_eq!(frame(&[0x40, 0x01, 0x00, 0x05]), Ok(Some((9, 12))));
        assert_eq!(frame(&[0x7f, 0xfe, 0x00, 0x04]), Ok(Some((8, 8))));
        // RTP, DTLS or garbage: the stream cannot be followed.
        assert_eq!(frame(&[0x80, 0x00, 0x00, 0x00]), Err(0x80));
        assert_eq!(frame(&[22]), Err(22));
    }
}
