//! Stop-and-wait ARQ of the UDP binding as a timer table of one (quinn's `poll_timeout` /
//! `handle_timeout` shape): one outstanding frame, up to 5 transmissions, attempt `k` waits
//! `min(5 s, max(50 ms, RTO·2^k))`, RTT samples only from first-attempt ACKs (Karn).

use core::time::Duration;

use super::udp::{ExpectedAck, Rto, MAX_ATTEMPTS};

/// What the caller must do after [`Arq::handle_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArqAction {
    /// Nothing is due yet (or nothing is outstanding).
    Wait,
    /// Send the outstanding frame again (attempt number inside).
    Retransmit(u32),
    /// Five transmissions went unanswered: the peer is gone.
    GiveUp,
}

/// Times are kept as nanoseconds (`u64`, half a `Duration`): one of these lives in every UDP
/// session.
#[derive(Debug, Clone, Copy)]
struct Pending {
    expect: ExpectedAck,
    first_sent: u64,
    attempt: u32,
    deadline: u64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The sender side of one session's (or handshake's) stop-and-wait link.
#[derive(Debug, Default, Clone)]
pub struct Arq {
    rto: Rto,
    pending: Option<Pending>,
}

impl Arq {
    /// The RTO estimator.
    pub fn rto(&self) -> &Rto {
        &self.rto
    }

    /// A frame is outstanding.
    pub fn is_busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Record the first transmission of a frame at `now`.
    pub fn on_send(&mut self, expect: ExpectedAck, now: Duration) {
        self.pending = Some(Pending {
            expect,
            first_sent: ns(now),
            attempt: 0,
            deadline: ns(now + self.rto.timeout(0)),
        });
    }

    /// When the runtime must call [`Arq::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.pending.map(|p| Duration::from_nanos(p.deadline))
    }

    /// Advance time: retransmit when the deadline has come, give up after the fifth attempt.
    pub fn handle_timeout(&mut self, now: Duration) -> ArqAction {
        let Some(p) = self.pending.as_mut() else { return ArqAction::Wait };
        if ns(now) < p.deadline {
            return ArqAction::Wait;
        }
        if p.attempt + 1 >= MAX_ATTEMPTS {
            self.pending = None;
            return ArqAction::GiveUp;
        }
        p.attempt += 1;
        p.deadline = ns(now + self.rto.timeout(p.attempt));
        ArqAction::Retransmit(p.attempt)
    }

    /// A UTACK arrived: true if it acknowledges the outstanding frame (which is then done).
    pub fn handle_ack(&mut self, datagram: &[u8], now: Duration) -> bool {
        match self.pending {
            Some(p) if p.expect.matches(datagram) => {
                if p.attempt == 0 {
                    self.rto.on_sample(now.saturating_sub(Duration::from_nanos(p.first_sent)));
                }
                self.pending = None;
                true
            }
            _ => false,
        }
    }

    /// Treat the outstanding frame as delivered without a UTACK (e.g. the peer's next
    /// handshake step proves it arrived).
    pub fn assume_acked(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::udp::encode_utack;

    const NS: Duration = Duration::from_nanos(1);
    const T: Duration = Duration::from_secs(1000);

    #[test]
    fn deadlines_at_t_rto_minus_1ns_and_rto() {
        let mut a = Arq::default();
        let key = [3u8; 32];
        a.on_send(ExpectedAck::new(5, 1, Some(&key)), T);
        let rto = Duration::from_millis(500);
        assert_eq!(a.poll_timeout(), Some(T + rto));
        assert_eq!(a.handle_timeout(T), ArqAction::Wait);
        assert_eq!(a.handle_timeout(T + rto - NS), ArqAction::Wait);
        assert_eq!(a.handle_timeout(T + rto), ArqAction::Retransmit(1));
        // Attempt 1 waits 2·RTO from the retransmission.
        let t1 = T + rto;
        assert_eq!(a.handle_timeout(t1 + 2 * rto - NS), ArqAction::Wait);
        assert_eq!(a.handle_timeout(t1 + 2 * rto), ArqAction::Retransmit(2));
        let t2 = t1 + 2 * rto;
        assert_eq!(a.handle_timeout(t2 + 4 * rto), ArqAction::Retransmit(3));
        let t3 = t2 + 4 * rto;
        assert_eq!(a.handle_timeout(t3 + Duration::from_secs(4)), ArqAction::Retransmit(4));
        let t4 = t3 + Duration::from_secs(4);
        assert_eq!(a.handle_timeout(t4 + Duration::from_secs(5) - NS), ArqAction::Wait, "capped at 5 s");
        assert_eq!(a.handle_timeout(t4 + Duration::from_secs(5)), ArqAction::GiveUp);
        assert!(!a.is_busy());
    }

    #[test]
    fn karn_samples_only_first_attempts() {
        let key = [3u8; 32];
        let mut a = Arq::default();
        a.on_send(ExpectedAck::new(5, 1, Some(&key)), T);
        let (ack, n) = encode_utack(5, 1, Some(&key));
        assert!(!a.handle_ack(&encode_utack(5, 2, Some(&key)).0[..n], T), "other seq ignored");
        assert!(a.handle_ack(&ack[..n], T + Duration::from_millis(10)));
        let after_sample = *a.rto();
        assert_ne!(after_sample, Rto::default());
        a.on_send(ExpectedAck::new(5, 2, Some(&key)), T);
        assert_eq!(a.handle_timeout(T + Duration::from_secs(1)), ArqAction::Retransmit(1));
        let (ack, n) = encode_utack(5, 2, Some(&key));
        assert!(a.handle_ack(&ack[..n], T + Duration::from_secs(2)));
        assert_eq!(*a.rto(), after_sample, "a retransmitted frame's ACK is no RTT sample");
    }
}
