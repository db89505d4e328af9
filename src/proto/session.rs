//! An established session (PROTOCOL.md §4–§6): sealing messages into frames (fragmented),
//! opening frames in place, sequence rules per transport, PING/PONG/BYE, REKEY both ways and
//! the control-frame flood guard. Time is a `Duration` since any fixed origin, passed in.

use core::time::Duration;

use super::crypto::{
    derive_rekey_keys, gcm_nonce, RecordKey, DEVICE_ID_LEN, GCM_NONCE_LEN, KEY_LEN, RECORD_OVERHEAD,
    REKEY_SALT_LEN, SESSION_ID_LEN,
};
use super::error::{Error, ErrorKind, Result, Transport};
use super::frame::{
    check_header, finish_crc, write_header, PacketType, AAD_LEN, HEADER_LEN, MAX_FRAME_LEN, MAX_PAYLOAD_LEN,
};
use super::handshake::{Established, Role};
use super::reassembly::{Reassembly, MAX_MESSAGE_FRAMES, MAX_MESSAGE_LEN, MAX_PLAINTEXT_LEN};
use super::window::ReplayWindow;
use zeroize::Zeroize;

/// Buffer size that holds any sealed message (4 maximal frames).
pub const MAX_SEALED_MESSAGE_LEN: usize = MAX_MESSAGE_FRAMES * MAX_FRAME_LEN;
/// The last sequence number; a session that reaches it is spent (only BYE may use it).
pub const SPENT_SEQ: u32 = u32::MAX;
/// Control frames (PING + PONG) a peer may send per second before the session ends.
pub const MAX_CONTROL_FRAMES_PER_SEC: u32 = 8;

/// Frames needed for a message of `len` bytes (an empty message is one DATA frame).
pub fn frames_for(len: usize) -> usize {
    len.div_ceil(MAX_PLAINTEXT_LEN).max(1)
}

/// Bytes on the wire for a message of `len` bytes.
pub fn sealed_len(len: usize) -> usize {
    frames_for(len) * (HEADER_LEN + RECORD_OVERHEAD) + len
}

/// Counts control frames in one-second windows, as the reference does.
#[derive(Debug, Default, Clone, Copy)]
pub struct FloodGuard {
    /// Nanoseconds of the window's start plus one; 0 = no window yet (16 bytes instead of
    /// 24: two of these live in every session).
    window_start: u64,
    count: u32,
}

impl FloodGuard {
    /// Count one frame at `now`; `false` once more than 8 fell in the current window.
    pub fn hit(&mut self, now: Duration) -> bool {
        let start = self.window_start.checked_sub(1).map(Duration::from_nanos);
        match start {
            Some(start) if now.saturating_sub(start) <= Duration::from_secs(1) => {}
            _ => {
                self.window_start = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX - 1) + 1;
                self.count = 0;
            }
        }
        self.count += 1;
        self.count <= MAX_CONTROL_FRAMES_PER_SEC
    }

    /// Would one more frame at `now` stay within the budget? (Does not count it.)
    pub fn has_room(&self, now: Duration) -> bool {
        let mut probe = *self;
        probe.hit(now)
    }
}

/// What an opened frame meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// A complete message (borrowed from the frame buffer or the reassembly buffer).
    Message(&'a [u8]),
    /// A DATA_FRAG was buffered; nothing to deliver yet.
    Fragment,
    /// The peer pinged: answer with [`Session::seal_pong`].
    Ping,
    /// The peer answered a ping.
    Pong,
    /// The peer said BYE: the session is over.
    Bye,
    /// The peer rotated the keys (we are the REKEY responder).
    Rekeyed,
}

/// The receive key from before the last REKEY, with its sequence state (UDP: its replay
/// window; TCP: the next seq it expects). Frames the peer sealed before it switched (in
/// flight, queued, or retransmitted when our UTACK was lost) still open with it, in the
/// transport's order, until a frame under the new key verifies. PROTOCOL.md §6 says such
/// frames "will fail"; that loses messages the peer was told (TCP) or acknowledged-to-be
/// (UDP) arrived, so we keep them.
// Not `Copy` and no derived `Debug`: it holds keys, zeroized on drop.
#[derive(Clone)]
struct PrevRx {
    key: [u8; KEY_LEN],
    window: ReplayWindow,
    /// TCP: the seq the next frame under this key must carry.
    next: u32,
    /// The last frame opened (or verified as a duplicate) was sealed under this key (kept
    /// here, not in the session: every byte of a session is per-device memory).
    opened: bool,
    /// We answered the peer's REKEY: our transmit key from before it, until the frames we
    /// sealed with it but never sent are re-sealed ([`Session::reseal_unsent`]).
    old_tx: Option<[u8; KEY_LEN]>,
}

/// One established session, either side, either transport.
pub struct Session {
    transport: Transport,
    role: Role,
    device_id: [u8; DEVICE_ID_LEN],
    session_id: [u8; SESSION_ID_LEN],
    tx_key_bytes: [u8; KEY_LEN],
    rx_key_bytes: [u8; KEY_LEN],
    /// Expanded (tx, rx) AES-GCM keys: about 1.1 KiB, so an idle session drops them
    /// ([`Session::park`]) and the next frame expands them again from the key bytes.
    expanded: Option<Box<(RecordKey, RecordKey)>>,
    tx_seq: u32,
    rx_next: u32,
    window: ReplayWindow,
    reasm: Reassembly,
    rx_control: FloodGuard,
    tx_control: FloodGuard,
    closed: bool,
    /// Boxed: only between a REKEY and the first frame under the new key.
    prev_rx: Option<Box<PrevRx>>,
}

impl Drop for PrevRx {
    fn drop(&mut self) {
        self.key.zeroize();
        if let Some(k) = self.old_tx.as_mut() {
            k.zeroize();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.tx_key_bytes.zeroize();
        self.rx_key_bytes.zeroize();
    }
}

impl core::fmt::Debug for Session {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session")
            .field("transport", &self.transport)
            .field("role", &self.role)
            .field("device_id", &self.device_id)
            .field("tx_seq", &self.tx_seq)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Build the session from a completed handshake. Keys are expanded on first use.
    pub fn new(est: &Established, transport: Transport) -> Self {
        Session {
            transport,
            role: est.role,
            device_id: est.device_id,
            session_id: est.session_id,
            tx_key_bytes: est.tx_key,
            rx_key_bytes: est.rx_key,
            expanded: None,
            tx_seq: 0,
            rx_next: 0,
            window: ReplayWindow::new(),
            reasm: Reassembly::default(),
            rx_control: FloodGuard::default(),
            tx_control: FloodGuard::default(),
            closed: false,
            prev_rx: None,
        }
    }

    /// A session whose counters start at `tx_seq` / `rx_seq` instead of 0: for known-answer
    /// tests against frames recorded mid-session, and for fuzzing. Not for production use.
    pub fn with_sequences(est: &Established, transport: Transport, tx_seq: u32, rx_seq: u32) -> Self {
        let mut s = Self::new(est, transport);
        s.tx_seq = tx_seq;
        s.rx_next = rx_seq;
        if rx_seq > 0 {
            s.window.mark(rx_seq - 1);
        }
        s
    }

    /// Device id bytes.
    pub fn device_id(&self) -> &[u8; DEVICE_ID_LEN] {
        &self.device_id
    }
    /// Session id bytes.
    pub fn session_id(&self) -> &[u8; SESSION_ID_LEN] {
        &self.session_id
    }
    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The transport this session's rules follow.
    pub fn transport(&self) -> Transport {
        self.transport
    }
    /// Next sequence number we will seal with.
    pub fn tx_seq(&self) -> u32 {
        self.tx_seq
    }
    /// Current tx key (for the UDP binding's UTACK MACs of frames we receive/send).
    pub fn tx_key_bytes(&self) -> &[u8; KEY_LEN] {
        &self.tx_key_bytes
    }
    /// Current rx key.
    pub fn rx_key_bytes(&self) -> &[u8; KEY_LEN] {
        &self.rx_key_bytes
    }
    /// Drop the expanded AES-GCM keys (about 1.1 KiB) while the session is idle; the next
    /// seal or open expands them again (two AES key schedules and GHASH tables, well under a
    /// microsecond) from the 32-byte key bytes the session keeps anyway.
    pub fn park(&mut self) {
        self.expanded = None;
    }
    /// The expanded keys are dropped (see [`Session::park`]).
    pub fn is_parked(&self) -> bool {
        self.expanded.is_none()
    }

    fn keys(&mut self) -> &(RecordKey, RecordKey) {
        let (tx, rx) = (&self.tx_key_bytes, &self.rx_key_bytes);
        self.expanded.get_or_insert_with(|| Box::new((RecordKey::new(tx), RecordKey::new(rx))))
    }

    /// BYE was sent or received, or the peer's sequence space ran out.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn spent(&self) -> Error {
        Error::misuse(ErrorKind::Sequence, "sequence space spent: only BYE may be sent")
    }

    /// Seal one frame whose plaintext already sits at `frame[24..24+plain_len]`.
    fn seal_in_place(&mut self, ptype: PacketType, frame: &mut [u8], plain_len: usize) -> usize {
        let seq = self.tx_seq;
        // Burn the seq before the frame exists: a failed write can never reuse a GCM nonce.
        self.tx_seq = seq.saturating_add(1);
        if seq == SPENT_SEQ {
            // The last nonce is used now: the session is over, so that no later call can seal
            // under it again whatever checks it skipped (the counter saturates here).
            self.closed = true;
        }
        let payload_len = plain_len + RECORD_OVERHEAD;
        let total = HEADER_LEN + payload_len;
        let frame = &mut frame[..total];
        write_header(frame, ptype, seq, payload_len);
        let mut aad = [0u8; AAD_LEN];
        aad.copy_from_slice(&frame[..AAD_LEN]);
        let nonce = gcm_nonce(seq, &self.session_id);
        self.keys().0.seal_record(nonce, &aad, &mut frame[HEADER_LEN..]);
        finish_crc(frame);
        total
    }

    pub(crate) fn seal_one(&mut self, ptype: PacketType, plaintext: &[u8], out: &mut [u8]) -> usize {
        let at = HEADER_LEN + GCM_NONCE_LEN;
        out[at..at + plaintext.len()].copy_from_slice(plaintext);
        self.seal_in_place(ptype, out, plaintext.len())
    }

    /// Seal a message into `out` as ⌈len/452⌉ frames on consecutive seqs (DATA_FRAG…, DATA).
    /// Refused before anything is produced when over 1808 bytes (`PayloadError`), when `out`
    /// is smaller than [`sealed_len`], or when the sequence space cannot hold every frame.
    /// Returns the bytes written: the frames back to back (for UDP, split by their headers).
    pub fn seal_message(&mut self, msg: &[u8], out: &mut [u8]) -> Result<usize> {
        if msg.len() > MAX_MESSAGE_LEN {
            return Err(Error::misuse(ErrorKind::Payload, "message over 1808 bytes"));
        }
        if self.closed {
            return Err(Error::misuse(ErrorKind::NotConnected, "session is closed"));
        }
        let n = frames_for(msg.len());
        if out.len() < sealed_len(msg.len()) {
            return Err(Error::misuse(ErrorKind::Payload, "output buffer smaller than the sealed message"));
        }
        if self.tx_seq as u64 + n as u64 > SPENT_SEQ as u64 {
            return Err(self.spent());
        }
        let mut written = 0;
        for (i, chunk) in msg.chunks(MAX_PLAINTEXT_LEN).enumerate() {
            let ptype = if i + 1 < n { PacketType::DataFrag } else { PacketType::Data };
            written += self.seal_one(ptype, chunk, &mut out[written..]);
        }
        if msg.is_empty() {
            written += self.seal_one(PacketType::Data, &[], out);
        }
        Ok(written)
    }

    /// Seal a PING (at most 8 of our PING+PONG frames per second, so we never trip the
    /// peer's flood guard; over budget is refused with `SequenceError`).
    pub fn seal_ping(&mut self, now: Duration, out: &mut [u8]) -> Result<usize> {
        if self.closed {
            return Err(Error::misuse(ErrorKind::NotConnected, "session is closed"));
        }
        if self.tx_seq == SPENT_SEQ {
            return Err(self.spent());
        }
        if !self.tx_control.has_room(now) {
            return Err(Error::misuse(ErrorKind::Sequence, "control-frame budget (8/s) used up"));
        }
        self.tx_control.hit(now);
        Ok(self.seal_one(PacketType::Ping, &[], out))
    }

    /// Seal the PONG answering a PING; `None` when the budget of 8 control frames per second
    /// is used up (a flooding peer gets fewer answers) or the sequence space is spent.
    pub fn seal_pong(&mut self, now: Duration, out: &mut [u8]) -> Option<usize> {
        if self.closed || self.tx_seq == SPENT_SEQ || !self.tx_control.hit(now) {
            return None;
        }
        Some(self.seal_one(PacketType::Pong, &[], out))
    }

    /// Seal a BYE (allowed even on a spent sequence) and mark the session closed.
    pub fn seal_bye(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.closed {
            return Err(Error::misuse(ErrorKind::NotConnected, "session is closed"));
        }
        self.closed = true;
        Ok(self.seal_one(PacketType::Bye, &[], out))
    }

    /// Start a REKEY (PROTOCOL.md §6) with 32 random bytes: seals REKEY under the old key at
    /// the current seq, then switches keys at once and resets every sequence and window.
    pub fn seal_rekey(&mut self, salt: &[u8; REKEY_SALT_LEN], out: &mut [u8]) -> Result<usize> {
        if self.closed {
            return Err(Error::misuse(ErrorKind::NotConnected, "session is closed"));
        }
        if self.tx_seq == SPENT_SEQ {
            return Err(self.spent());
        }
        let n = self.seal_one(PacketType::Rekey, salt, out);
        let (tx, rx) = derive_rekey_keys(&self.tx_key_bytes, &self.rx_key_bytes, &self.session_id, salt);
        self.install_keys(tx, rx);
        Ok(n)
    }

    fn install_keys(&mut self, tx: [u8; KEY_LEN], rx: [u8; KEY_LEN]) {
        self.prev_rx = Some(Box::new(PrevRx {
            key: self.rx_key_bytes,
            window: self.window,
            next: self.rx_next,
            opened: false,
            old_tx: None,
        }));
        self.expanded = None; // expanded from the new bytes on first use
        self.tx_key_bytes = tx;
        self.rx_key_bytes = rx;
        // UDP: our sequence numbers go on from where they were instead of restarting at 0.
        // A receiver's window accepts any forward jump (PROTOCOL.md §4), so correct peers
        // see no difference, and the reference's UDP transport, which keeps its pre-REKEY
        // replay baseline, no longer drops (while acknowledging) our frames after a REKEY.
        // The key is new, so no GCM nonce repeats either way.
        if self.transport != Transport::Udp {
            self.tx_seq = 0;
        }
        self.rx_next = 0;
        self.window.reset();
        // A message being reassembled stays: its last frames may still come under the
        // previous key (a new message's first frame, seq 0, is not consecutive with it).
    }

    fn opened_prev(&self) -> bool {
        self.prev_rx.as_ref().is_some_and(|p| p.opened)
    }

    fn set_opened_prev(&mut self, opened: bool) {
        if let Some(p) = self.prev_rx.as_mut() {
            p.opened = opened;
        }
    }

    /// No REKEY is in progress: no previous receive key is kept (see [`Session::ack_key_bytes`]).
    pub fn rekey_settled(&self) -> bool {
        self.prev_rx.is_none()
    }

    /// After the peer's REKEY ([`Received::Rekeyed`]): re-seal `frames`, whole frames back to
    /// back that we sealed under the old key and have not sent, under the new key at our next
    /// sequence numbers, in place and in order. A peer that forgot the old key when it
    /// switched, as PROTOCOL.md §6 allows, can then open them. Returns how many frames were
    /// re-sealed. The old key is forgotten by the first call, so later calls re-seal nothing:
    /// call it at once, before anything new is sealed.
    pub fn reseal_unsent(&mut self, frames: &mut [u8]) -> Result<u64> {
        let Some(mut old) = self.prev_rx.as_mut().and_then(|p| p.old_tx.take()) else { return Ok(0) };
        let old_key = RecordKey::new(&old);
        old.zeroize();
        let mut count = 0u64;
        let mut at = 0;
        while at < frames.len() {
            at += HEADER_LEN + check_header(&frames[at..])?;
            count += 1;
        }
        if at != frames.len() {
            return Err(Error::misuse(ErrorKind::Frame, "re-seal: not whole frames"));
        }
        if u64::from(self.tx_seq) + count > u64::from(SPENT_SEQ) {
            return Err(self.spent());
        }
        let mut at = 0;
        while at < frames.len() {
            let end = at + HEADER_LEN + usize::from(u16::from_le_bytes([frames[at + 8], frames[at + 9]]));
            let frame = &mut frames[at..end];
            let ptype = PacketType::from_u8(frame[3])
                .filter(|t| t.is_encrypted())
                .ok_or(Error::misuse(ErrorKind::Frame, "re-seal: not a session frame"))?;
            let seq = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
            let (header, payload) = frame.split_at_mut(HEADER_LEN);
            let plain = old_key.open_record(gcm_nonce(seq, &self.session_id), &header[..AAD_LEN], payload)?;
            // Opened in place: the plaintext sits where `seal_in_place` expects it.
            debug_assert_eq!(plain.start, GCM_NONCE_LEN);
            self.seal_in_place(ptype, frame, plain.len());
            at = end;
        }
        Ok(count)
    }

    /// UDP: the key the last opened (or duplicate-verified) frame was sealed with, which its
    /// UTACK is MAC'd with: the receive key, or the one from before the last REKEY.
    pub fn ack_key_bytes(&self) -> &[u8; KEY_LEN] {
        match &self.prev_rx {
            Some(p) if p.opened => &p.key,
            _ => &self.rx_key_bytes,
        }
    }

    /// Open `payload` with the previous receive key if its window allows `seq`; `current` is
    /// what the current key said. A frame the previous window has seen is a replay (a
    /// retransmission for [`Session::verify_duplicate`] to recognise).
    fn open_prev(
        &mut self,
        ptype: PacketType,
        seq: u32,
        header: &[u8],
        payload: &mut [u8],
        current: Error,
    ) -> Result<core::ops::Range<usize>> {
        let Some(prev) = self.prev_rx.as_mut() else { return Err(current) };
        match self.transport {
            Transport::Tcp if seq != prev.next => {
                return Err(Error::misbehaved(ErrorKind::Sequence, "sequence gap or replay"))
            }
            Transport::Tcp => {}
            Transport::Udp => prev.window.check(seq)?,
        }
        let nonce = gcm_nonce(seq, &self.session_id);
        let range =
            RecordKey::new(&prev.key).open_record(nonce, &header[..AAD_LEN], payload).map_err(|_| current)?;
        if ptype == PacketType::Rekey {
            // Sealed before the peer saw our own REKEY (both started one): the keys cannot
            // follow both, so the session is over. Nothing of this frame is recorded, so no
            // retransmission of it is ever acknowledged as a duplicate.
            self.closed = true;
            return Err(Error::left(ErrorKind::Sequence, "REKEY crossed ours"));
        }
        match self.transport {
            Transport::Tcp => prev.next = seq.wrapping_add(1),
            Transport::Udp => prev.window.mark(seq),
        }
        Ok(range)
    }

    /// The seq a frame carries, for transports that need it before opening (UTACKs).
    /// Checks the sequence rule without changing state: strict order on TCP, the replay window
    /// on UDP.
    pub fn check_seq(&self, seq: u32) -> Result<()> {
        match self.transport {
            Transport::Tcp if seq != self.rx_next => {
                Err(Error::misbehaved(ErrorKind::Sequence, "sequence gap or replay"))
            }
            Transport::Tcp => Ok(()),
            Transport::Udp => self.window.check(seq),
        }
    }

    /// For UDP: is `frame` an authentic copy of a frame already accepted (a retransmission
    /// whose UTACK was lost)? Checks the window says "seen" and the AEAD verifies, changing no
    /// state, so the caller may re-ACK it without ever acknowledging a forgery.
    pub fn verify_duplicate(&mut self, frame: &mut [u8]) -> bool {
        let Ok(len) = check_header(frame) else { return false };
        if frame.len() != HEADER_LEN + len || self.transport != Transport::Udp {
            return false;
        }
        if !PacketType::from_u8(frame[3]).is_some_and(|t| t.is_encrypted()) {
            return false;
        }
        let seq = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let (header, payload) = frame.split_at_mut(HEADER_LEN);
        let nonce = gcm_nonce(seq, &self.session_id);
        // A failed open leaves the payload unspecified: keep a copy for the previous key.
        let mut copy = [0u8; MAX_PAYLOAD_LEN];
        let n = payload.len().min(MAX_PAYLOAD_LEN);
        copy[..n].copy_from_slice(&payload[..n]);
        if self.window.check(seq).is_err()
            && self.keys().1.open_record(nonce, &header[..AAD_LEN], payload).is_ok()
        {
            self.set_opened_prev(false);
            return true;
        }
        let Some(prev) = self.prev_rx.as_mut() else { return false };
        if prev.window.check(seq).is_ok() {
            return false;
        }
        payload[..n].copy_from_slice(&copy[..n]);
        let ok = RecordKey::new(&prev.key).open_record(nonce, &header[..AAD_LEN], payload).is_ok();
        prev.opened = ok;
        ok
    }

    /// Open one complete frame in place (from [`crate::proto::deframer::Deframer::next_frame`]
    /// or a datagram already checked with `Frame::decode_exact`) at time `now`.
    ///
    /// Order: type → sequence rule → nonce prefix → AEAD → spent-sequence rule → window/seq
    /// update → meaning. An error's [`Error::reaction`] says whether to close or drop.
    pub fn open<'a>(&'a mut self, frame: &'a mut [u8], now: Duration) -> Result<Received<'a>> {
        self.reasm.begin_frame();
        if self.closed {
            return Err(Error::misuse(ErrorKind::NotConnected, "session is closed"));
        }
        let len = check_header(frame)?;
        if frame.len() != HEADER_LEN + len {
            return Err(Error::garbage(ErrorKind::Frame, "frame length differs from header"));
        }
        let ptype = PacketType::from_u8(frame[3])
            .filter(|t| t.is_encrypted())
            .ok_or(Error::misbehaved(ErrorKind::Frame, "unexpected frame type in session"))?;
        let seq = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let (header, payload) = frame.split_at_mut(HEADER_LEN);
        let nonce = gcm_nonce(seq, &self.session_id);
        self.set_opened_prev(false);
        let range = if self.prev_rx.is_none() {
            self.check_seq(seq)?;
            self.keys().1.open_record(nonce, &header[..AAD_LEN], payload)?
        } else {
            // Between a REKEY and the first frame under the new key: the previous key too.
            let mut copy = [0u8; MAX_PAYLOAD_LEN];
            let n = payload.len().min(MAX_PAYLOAD_LEN);
            copy[..n].copy_from_slice(&payload[..n]);
            match self
                .check_seq(seq)
                .and_then(|()| self.keys().1.open_record(nonce, &header[..AAD_LEN], payload))
            {
                Ok(range) => {
                    self.prev_rx = None; // the peer has switched: old frames are done
                    range
                }
                Err(e) => {
                    payload[..n].copy_from_slice(&copy[..n]);
                    let range = self.open_prev(ptype, seq, header, payload, e)?;
                    self.set_opened_prev(true);
                    range
                }
            }
        };
        if seq == SPENT_SEQ {
            self.closed = true;
            return Err(Error::left(ErrorKind::Sequence, "peer sequence space spent"));
        }
        match self.transport {
            _ if self.opened_prev() => {} // the previous key's state moved instead
            Transport::Tcp => self.rx_next = seq + 1,
            Transport::Udp => self.window.mark(seq),
        }
        let plaintext = &payload[range];
        match ptype {
            PacketType::Bye => {
                self.closed = true;
                Ok(Received::Bye)
            }
            PacketType::Ping | PacketType::Pong => {
                self.reasm.check_control()?;
                if !self.rx_control.hit(now) {
                    self.closed = true;
                    return Err(Error::left(
                        ErrorKind::ConnectionClosed,
                        "more than 8 control frames in one second",
                    ));
                }
                Ok(if ptype == PacketType::Ping { Received::Ping } else { Received::Pong })
            }
            PacketType::Rekey => {
                self.reasm.check_control()?;
                // REKEYs count against the control-frame budget too: each one costs us a key
                // derivation and re-sealing what we have queued.
                if !self.rx_control.hit(now) {
                    self.closed = true;
                    return Err(Error::left(
                        ErrorKind::ConnectionClosed,
                        "more than 8 control frames in one second",
                    ));
                }
                let salt: &[u8; REKEY_SALT_LEN] = plaintext
                    .try_into()
                    .map_err(|_| Error::misbehaved(ErrorKind::Payload, "REKEY payload is not 32 bytes"))?;
                // We are the responder: the initiator's (tx, rx) are our (rx, tx).
                let (init_tx, init_rx) =
                    derive_rekey_keys(&self.rx_key_bytes, &self.tx_key_bytes, &self.session_id, salt);
                let mut old_tx = self.tx_key_bytes;
                self.install_keys(init_rx, init_tx);
                // This frame was sealed under what is now the previous key: so is its UTACK.
                self.set_opened_prev(true);
                if let Some(p) = self.prev_rx.as_mut() {
                    p.old_tx = Some(old_tx);
                }
                old_tx.zeroize();
                Ok(Received::Rekeyed)
            }
            PacketType::DataFrag => {
                self.reasm.push_fragment(seq, plaintext)?;
                Ok(Received::Fragment)
            }
            PacketType::Data => {
                if self.reasm.push_final(seq, plaintext)?.is_some() {
                    Ok(Received::Message(self.reasm.delivered_message()))
                } else {
                    Ok(Received::Message(plaintext))
                }
            }
            _ => Err(Error::misbehaved(ErrorKind::Frame, "unexpected frame type in session")),
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
