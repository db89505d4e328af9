//! A blocking, byte-level UDP device: the real handshake (cookie, UTACKs) with the protocol
//! core over a std socket, then whatever datagrams a test wants to send.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use usmp::proto::crypto::{EphemeralKey, Psk};
use usmp::proto::frame::{Frame, PacketType};
use usmp::proto::handshake::{ClientHandshake, ClientReply};
use usmp::proto::session::{Received, Session};
use usmp::proto::udp::{encode_utack, is_utack};
use usmp::Transport;

/// A received session frame `(type, seq, message)`, or a UTACK as `Err(bytes)`.
pub type Incoming = Result<(PacketType, u32, Vec<u8>), Vec<u8>>;

pub struct RawUdpDevice {
    pub sock: UdpSocket,
    pub gw: SocketAddr,
    pub session: Session,
    /// The 66-byte cookie HELLO, kept to replay it.
    pub cookie_hello: Vec<u8>,
}

fn recv(sock: &UdpSocket) -> Option<Vec<u8>> {
    let mut b = [0u8; 2048];
    sock.recv(&mut b).ok().map(|n| b[..n].to_vec())
}

/// Wait for a datagram that is a frame of `t` (UTACKs and others skipped).
fn recv_frame(sock: &UdpSocket, t: PacketType) -> Vec<u8> {
    for _ in 0..50 {
        let d = recv(sock).expect("gateway answered");
        if !is_utack(&d) && Frame::decode_exact(&d).map(|f| f.packet_type()) == Ok(t) {
            return d;
        }
    }
    panic!("no {t:?}")
}

impl RawUdpDevice {
    pub fn connect(gw: SocketAddr, psk: &[u8], device_id: [u8; 6]) -> RawUdpDevice {
        Self::connect_from(UdpSocket::bind("127.0.0.1:0").unwrap(), gw, psk, device_id)
    }

    /// Handshake from a given socket (a rebooted device reusing its address).
    pub fn connect_from(sock: UdpSocket, gw: SocketAddr, psk: &[u8], device_id: [u8; 6]) -> RawUdpDevice {
        sock.connect(gw).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // A fresh key per handshake, as real devices do (the cookie binds it).
        static N: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8 ^ device_id[5] ^ n);
        let hs =
            ClientHandshake::new(device_id, Psk::new(psk).unwrap(), EphemeralKey::from_seed(&seed).unwrap());
        let mut b = [0u8; 128];
        let n = hs.encode_hello(&mut b).unwrap();
        sock.send(&b[..n]).unwrap();
        let retry = recv_frame(&sock, PacketType::HelloRetry);
        sock.send(&encode_utack(0x0A, 0, None).0[..7]).unwrap();
        let ClientReply::Retry(hs) = hs.handle_reply(&Frame::decode_exact(&retry).unwrap()).unwrap() else {
            panic!()
        };
        let n = hs.encode_hello(&mut b).unwrap();
        let cookie_hello = b[..n].to_vec();
        sock.send(&cookie_hello).unwrap();
        let ch = recv_frame(&sock, PacketType::Challenge);
        sock.send(&encode_utack(2, 0, None).0[..7]).unwrap();
        let ClientReply::Challenge(expect) = hs.handle_reply(&Frame::decode_exact(&ch).unwrap()).unwrap()
        else {
            panic!()
        };
        let n = expect.encode_hello_ack(&mut b).unwrap();
        sock.send(&b[..n]).unwrap();
        let ok = recv_frame(&sock, PacketType::SessionOk);
        sock.send(&encode_utack(4, 0, None).0[..7]).unwrap();
        let est = expect.handle_session_ok(&Frame::decode_exact(&ok).unwrap()).unwrap();
        RawUdpDevice { sock, gw, session: Session::new(&est, Transport::Udp), cookie_hello }
    }

    /// Seal a single-frame message.
    pub fn seal(&mut self, msg: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 600];
        let n = self.session.seal_message(msg, &mut out).unwrap();
        out.truncate(n);
        out
    }

    pub fn send(&self, d: &[u8]) {
        self.sock.send(d).unwrap();
    }

    /// Next datagram within `t`, if any.
    pub fn recv_within(&self, t: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(t)).unwrap();
        recv(&self.sock)
    }

    /// Next session frame from the gateway (opened), ACKing it like a device; UTACKs are
    /// returned as `Err(utack)`.
    pub fn next(&mut self, t: Duration) -> Option<Incoming> {
        let mut d = self.recv_within(t)?;
        if is_utack(&d) {
            return Some(Err(d));
        }
        let f = Frame::decode_exact(&d).ok()?;
        let (ty, seq) = (f.packet_type(), f.seq());
        let key = *self.session.rx_key_bytes();
        let msg = match self.session.open(&mut d, Duration::ZERO) {
            Ok(Received::Message(m)) => m.to_vec(),
            Ok(_) => vec![],
            Err(_) => return Some(Ok((ty, seq, vec![]))),
        };
        let (a, n) = encode_utack(ty as u8, seq, Some(&key));
        self.sock.send(&a[..n]).unwrap();
        Some(Ok((ty, seq, msg)))
    }
}
