//! Bounded, numbered UDP streams through the relay, checked packet by packet.

use std::{
    collections::HashSet,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// RTP-like test payload: first byte 0x80 (RFC 7983: not STUN, DTLS or ChannelData), the
/// sequence number at bytes 4..8, then filler, 172 bytes in all.
pub fn numbered(sequence: u32) -> Vec<u8> {
    let mut payload = vec![0xd5u8; 172];
    payload[..4].copy_from_slice(&[0x80, 0, 0, 0]);
    payload[4..8].copy_from_slice(&sequence.to_be_bytes());
    payload
}

/// The sequence number of a payload [`numbered`] made, if it is one, intact.
pub fn sequence_of(payload: &[u8]) -> Option<u32> {
    if payload.len() != 172 || payload[0] != 0x80 || payload[8..].iter().any(|b| *b != 0xd5) {
        return None;
    }
    Some(u32::from_be_bytes(payload[4..8].try_into().ok()?))
}

/// How a stream's packets look on the wire: what the sender sends for a sequence number, and
/// the sequence number the receiver finds in a datagram (None: not what it expected). The two
/// differ when the relay reframes the packets (TURN ChannelData).
pub struct Framing {
    pub encode: fn(u32) -> Vec<u8>,
    pub decode: fn(&[u8]) -> Option<u32>,
}

/// Plain numbered payloads both ways.
pub const PLAIN: Framing = Framing {
    encode: numbered,
    decode: sequence_of,
};

/// Sends `count` numbered datagrams from `from` to `to` and checks that `receiver` gets each
/// exactly once, from `expected_source`, intact. Returns what went wrong.
pub fn stream(
    from: &UdpSocket,
    to: SocketAddr,
    receiver: UdpSocket,
    expected_source: SocketAddr,
    count: u32,
    framing: &Framing,
) -> Result<(), String> {
    let done = Arc::new(AtomicBool::new(false));
    let sender_done = done.clone();
    let decode = framing.decode;
    let collector = thread::spawn(move || {
        receiver
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut seen = HashSet::new();
        let mut duplicates = 0;
        let mut wrong = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < count as usize && Instant::now() < deadline {
            match receiver.recv_from(&mut buf) {
                Ok((len, source)) => match decode(&buf[..len]) {
                    Some(sequence) if source == expected_source => {
                        if !seen.insert(sequence) {
                            duplicates += 1;
                        }
                    }
                    _ => wrong.push(format!(
                        "{len} bytes from {source}: {:02x?}",
                        &buf[..len.min(8)]
                    )),
                },
                // Half a second of silence after the sender finished: what is missing is lost.
                Err(_) if sender_done.load(Ordering::Relaxed) => break,
                Err(_) => {}
            }
        }
        // Anything still in flight would be a duplicate.
        receiver
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while let Ok((len, _)) = receiver.recv_from(&mut buf) {
            if decode(&buf[..len]).is_some_and(|sequence| seen.contains(&sequence)) {
                duplicates += 1;
            }
        }
        (seen.len() as u32, duplicates, wrong)
    });
    for sequence in 0..count {
        from.send_to(&(framing.encode)(sequence), to)
            .map_err(|err| format!("send: {err}"))?;
        if sequence == 0 {
            // The first packet takes the slow path and resolves the neighbour; RTP paces
            // at 20 ms anyway.
            thread::sleep(Duration::from_millis(100));
        } else if sequence % 100 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    done.store(true, Ordering::Relaxed);
    let (received, duplicates, wrong) = collector.join().unwrap();
    if received != count || duplicates != 0 || !wrong.is_empty() {
        return Err(format!(
            "{to}: received {received}/{count}, {duplicates} duplicates, unexpected: {:?}",
            wrong.iter().take(5).collect::<Vec<_>>()
        ));
    }
    Ok(())
}
