//! A blocking, byte-level USMP device for tests that must break the rules on purpose: it runs
//! the real handshake with the protocol core over a std socket, then writes whatever it likes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use usmp::proto::crypto::{EphemeralKey, Psk};
use usmp::proto::deframer::Deframer;
use usmp::proto::frame::Frame;
use usmp::proto::handshake::{ClientHandshake, ClientReply};
use usmp::proto::session::Session;
use usmp::Transport;

/// An established session over a plain blocking socket.
pub struct RawDevice {
    pub stream: TcpStream,
    pub session: Session,
    deframer: Deframer,
}

fn read_frame(stream: &mut TcpStream, d: &mut Deframer) -> Option<Vec<u8>> {
    loop {
        if let Some(f) = d.next_frame().expect("gateway sent a bad frame") {
            return Some(f.to_vec());
        }
        let n = stream.read(d.spare_mut()).ok()?;
        if n == 0 {
            return None;
        }
        d.commit(n);
    }
}

impl RawDevice {
    /// Connect and complete the four-step handshake.
    pub fn connect(addr: SocketAddr, psk: &[u8], device_id: [u8; 6]) -> RawDevice {
        Self::handshake(TcpStream::connect(addr).unwrap(), psk, device_id)
    }

    /// [`RawDevice::connect`] with a receive buffer shrunk to `rcvbuf` bytes before the
    /// connection opens (the window it advertises stays small): a device that takes little.
    pub fn connect_small(addr: SocketAddr, psk: &[u8], device_id: [u8; 6], rcvbuf: usize) -> RawDevice {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(rcvbuf).unwrap();
        s.connect(&addr.into()).unwrap();
        Self::handshake(s.into(), psk, device_id)
    }

    fn handshake(mut stream: TcpStream, psk: &[u8], device_id: [u8; 6]) -> RawDevice {
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut d = Deframer::new();
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8 ^ device_id[5] ^ 0x5a);
        let hs =
            ClientHandshake::new(device_id, Psk::new(psk).unwrap(), EphemeralKey::from_seed(&seed).unwrap());
        let mut buf = [0u8; 128];
        let n = hs.encode_hello(&mut buf).unwrap();
        stream.write_all(&buf[..n]).unwrap();
        let f = read_frame(&mut stream, &mut d).expect("CHALLENGE");
        let ClientReply::Challenge(expect) = hs.handle_reply(&Frame::decode(&f).unwrap()).unwrap() else {
            panic!("expected CHALLENGE")
        };
        let n = expect.encode_hello_ack(&mut buf).unwrap();
        stream.write_all(&buf[..n]).unwrap();
        let f = read_frame(&mut stream, &mut d).expect("SESSION_OK");
        let est = expect.handle_session_ok(&Frame::decode(&f).unwrap()).unwrap();
        RawDevice { stream, session: Session::new(&est, Transport::Tcp), deframer: d }
    }

    /// Seal a message into frames (not sent).
    pub fn seal(&mut self, msg: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 4096];
        let n = self.session.seal_message(msg, &mut out).unwrap();
        out.truncate(n);
        out
    }

    /// Write raw bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The next frame from the gateway, or `None` when the connection closed.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        read_frame(&mut self.stream, &mut self.deframer)
    }

    /// True when the gateway closes the connection without sending another byte.
    pub fn closed_silently(&mut self) -> bool {
        let mut b = [0u8; 64];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}
