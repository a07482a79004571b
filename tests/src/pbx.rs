//! The PBX end of the calls tests: an RTP echo on the PBX's LAN address (what a phone
//! behind the PBX sends back), and SIP toward sipp as a real PBX-side user agent.

/// Echoes every datagram back to its sender, until the task is aborted.
pub async fn rtp_echo(socket: std::net::UdpSocket) {
    socket.set_nonblocking(true).expect("nonblocking");
    let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio socket");
    let mut buf = vec![0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}
