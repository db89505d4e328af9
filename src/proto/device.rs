//! The device's side of the UDP binding (PROTOCOL.md §7), the client role of the sans-IO
//! endpoint: the cookie round trip and every handshake frame under the stop-and-wait ARQ
//! (HELLO and HELLO_ACK retransmitted until acknowledged; every gateway frame acknowledged,
//! duplicates included). Datagrams in ([`Device::handle_datagram`]), datagrams out
//! ([`Device::poll_transmit`]), one deadline ([`Device::poll_timeout`] /
//! [`Device::handle_timeout`]). Once established, the session's datagrams go to its link.

use core::net::SocketAddr;
use core::time::Duration;
use std::collections::VecDeque;

use super::arq::{Arq, ArqAction};
use super::crypto::{EphemeralKey, Psk, DEVICE_ID_LEN};
use super::endpoint::{Transmit, MAX_TRANSMIT_LEN};
use super::error::{Error, ErrorKind, Result};
use super::frame::{Frame, PacketType, HEADER_LEN};
use super::handshake::{ClientExpectSessionOk, ClientHandshake, ClientReply, Established, HELLO_ACK_SEQ};
use super::udp::{encode_utack, is_utack, ExpectedAck};

enum Stage {
    Hello(ClientHandshake),
    AwaitOk(ClientExpectSessionOk),
    Established,
    Failed,
}

/// What one datagram did (see [`Device::handle_datagram`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// Handled (or dropped) by the handshake: nothing for the caller.
    Handled,
    /// SESSION_OK verified: build the session from these keys.
    Established(Established),
    /// The handshake failed for good (a rogue gateway's proof, a malformed answer).
    Failed(Error),
    /// A session datagram: hand it to the session's link.
    Session,
}

/// One device's UDP handshake, then the router of its datagrams.
pub struct Device {
    server: SocketAddr,
    stage: Stage,
    arq: Arq,
    cur: [u8; MAX_TRANSMIT_LEN],
    cur_len: usize,
    transmits: VecDeque<Transmit>,
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Device").field("server", &self.server).finish_non_exhaustive()
    }
}

impl Device {
    /// Start a handshake with `server` for `device_id` with a fresh ephemeral `key`.
    /// HELLO is queued at once.
    pub fn new(
        now: Duration,
        server: SocketAddr,
        device_id: [u8; DEVICE_ID_LEN],
        psk: Psk,
        key: EphemeralKey,
    ) -> Result<Self> {
        let hs = ClientHandshake::new(device_id, psk, key);
        let mut d = Device {
            server,
            stage: Stage::Failed,
            arq: Arq::default(),
            cur: [0; MAX_TRANSMIT_LEN],
            cur_len: 0,
            transmits: VecDeque::new(),
        };
        d.cur_len = hs.encode_hello(&mut d.cur)?;
        d.stage = Stage::Hello(hs);
        d.send_current(now, PacketType::Hello, 0);
        Ok(d)
    }

    /// The gateway's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Whether SESSION_OK has verified.
    pub fn is_established(&self) -> bool {
        matches!(self.stage, Stage::Established)
    }

    fn send_current(&mut self, now: Duration, ptype: PacketType, seq: u32) {
        self.arq.on_send(ExpectedAck::new(ptype as u8, seq, None), now);
        self.transmits.push_back(Transmit::new(self.server, &self.cur[..self.cur_len]));
    }

    /// Feed one datagram received from `from` (only the gateway may talk to a device).
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, d: &[u8]) -> DeviceEvent {
        if from != self.server {
            return DeviceEvent::Handled;
        }
        let established = matches!(self.stage, Stage::Established);
        if is_utack(d) {
            if established {
                return DeviceEvent::Session;
            }
            // The first HELLO's UTACK does not complete it: the HELLO_RETRY travels without
            // ARQ, so HELLO goes out again at its RTO until the HELLO_RETRY (or a CHALLENGE)
            // arrives. The gateway answers it statelessly each time.
            let first_hello = matches!(&self.stage, Stage::Hello(hs) if !hs.has_cookie());
            if !first_hello {
                self.arq.handle_ack(d, now);
            }
            return DeviceEvent::Handled;
        }
        if d.len() < HEADER_LEN {
            return DeviceEvent::Handled;
        }
        let encrypted = PacketType::from_u8(d[3]).is_some_and(|t| t.is_encrypted())
            && d[3] != PacketType::HelloRetry as u8;
        if established && encrypted {
            return DeviceEvent::Session;
        }
        let Ok(frame) = Frame::decode_exact(d) else { return DeviceEvent::Handled };
        let ptype = frame.packet_type();
        if !matches!(ptype, PacketType::HelloRetry | PacketType::Challenge | PacketType::SessionOk) {
            return DeviceEvent::Handled;
        }
        // Devices ACK every handshake frame they receive, duplicates included.
        let (a, l) = encode_utack(ptype as u8, frame.seq(), None);
        self.transmits.push_back(Transmit::new(self.server, &a[..l]));
        let stage = core::mem::replace(&mut self.stage, Stage::Failed);
        let (stage, event) = match (stage, ptype) {
            (Stage::Hello(hs), PacketType::HelloRetry) if !hs.has_cookie() => match hs.handle_reply(&frame) {
                Ok(ClientReply::Retry(hs)) => match hs.encode_hello(&mut self.cur) {
                    Ok(n) => {
                        self.cur_len = n;
                        self.send_current(now, PacketType::Hello, 1);
                        (Stage::Hello(hs), DeviceEvent::Handled)
                    }
                    Err(e) => (Stage::Failed, DeviceEvent::Failed(e)),
                },
                Ok(ClientReply::Challenge(_)) => (Stage::Failed, DeviceEvent::Failed(unexpected())),
                Err(e) => (Stage::Failed, DeviceEvent::Failed(e)),
            },
            (Stage::Hello(hs), PacketType::Challenge) => match hs.handle_reply(&frame) {
                Ok(ClientReply::Challenge(expect)) => match expect.encode_hello_ack(&mut self.cur) {
                    Ok(n) => {
                        self.cur_len = n;
                        self.send_current(now, PacketType::HelloAck, HELLO_ACK_SEQ);
                        (Stage::AwaitOk(expect), DeviceEvent::Handled)
                    }
                    Err(e) => (Stage::Failed, DeviceEvent::Failed(e)),
                },
                Ok(ClientReply::Retry(_)) => (Stage::Failed, DeviceEvent::Failed(unexpected())),
                Err(e) => (Stage::Failed, DeviceEvent::Failed(e)),
            },
            (Stage::AwaitOk(expect), PacketType::SessionOk) => match expect.handle_session_ok(&frame) {
                Ok(est) => {
                    self.arq.assume_acked();
                    (Stage::Established, DeviceEvent::Established(est))
                }
                Err(e) => (Stage::Failed, DeviceEvent::Failed(e)),
            },
            // Duplicates (a second HELLO_RETRY, a retransmitted SESSION_OK) and strays.
            (s, _) => (s, DeviceEvent::Handled),
        };
        self.stage = stage;
        event
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Device::handle_timeout`] must run next (a handshake frame in flight).
    pub fn poll_timeout(&self) -> Option<Duration> {
        if matches!(self.stage, Stage::Established | Stage::Failed) {
            return None;
        }
        self.arq.poll_timeout()
    }

    /// Advance time: retransmit the handshake frame in flight; `Err(Timeout)` once five
    /// transmissions went unacknowledged.
    pub fn handle_timeout(&mut self, now: Duration) -> Result<()> {
        if matches!(self.stage, Stage::Established | Stage::Failed) {
            return Ok(());
        }
        match self.arq.handle_timeout(now) {
            ArqAction::Wait => Ok(()),
            ArqAction::Retransmit(_) => {
                self.transmits.push_back(Transmit::new(self.server, &self.cur[..self.cur_len]));
                Ok(())
            }
            ArqAction::GiveUp => {
                self.stage = Stage::Failed;
                Err(Error::left(ErrorKind::Timeout, "gateway did not acknowledge the handshake"))
            }
        }
    }
}

fn unexpected() -> Error {
    Error::misbehaved(ErrorKind::Handshake, "unexpected handshake reply")
}
