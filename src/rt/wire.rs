//! Handshake-phase socket helpers: read one frame through the deframer, write bytes, draw
//! randomness. (After the handshake, [`crate::rt::conn`] owns the socket.)

use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent};
use monoio::net::TcpStream;
use ring::rand::{SecureRandom, SystemRandom};

use super::Error;
use crate::proto::deframer::Deframer;
use crate::proto::ErrorKind;

/// Read until the deframer yields one complete, CRC-checked frame; returns a copy of it
/// (handshake frames are small). EOF is `ConnectionClosed`.
pub async fn read_frame(stream: &mut TcpStream, d: &mut Deframer) -> Result<Vec<u8>, Error> {
    read_frame_cancelable(stream, d, None).await
}

/// [`read_frame`] whose pending read a [`monoio::io::Canceller`] can cancel (handshake
/// eviction under a flood); a cancelled read is an error.
pub async fn read_frame_cancelable(
    stream: &mut TcpStream,
    d: &mut Deframer,
    cancel: Option<CancelHandle>,
) -> Result<Vec<u8>, Error> {
    loop {
        if let Some(f) = d.next_frame()? {
            return Ok(f.to_vec());
        }
        let (buf, range) = d.take_buffer();
        let slice = SliceMut::new(buf, range.start, range.end);
        let (res, slice) = match &cancel {
            Some(c) => stream.cancelable_read(slice, c.clone()).await,
            None => stream.read(slice).await,
        };
        let buf = slice.into_inner();
        match res {
            Ok(0) => {
                d.restore_buffer(buf, 0);
                return Err(Error::closed("connection closed during the handshake"));
            }
            Ok(n) => d.restore_buffer(buf, n),
            Err(e) => {
                d.restore_buffer(buf, 0);
                return Err(e.into());
            }
        }
    }
}

/// Write all of `bytes`.
pub async fn write_all(stream: &mut TcpStream, bytes: Vec<u8>) -> Result<(), Error> {
    let (res, _) = stream.write_all(bytes).await;
    res.map(|_| ()).map_err(Error::from)
}

/// Fill `N` bytes from the OS RNG.
pub fn random<const N: usize>(rng: &SystemRandom) -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    rng.fill(&mut b).map_err(|_| Error::misuse(ErrorKind::Crypto, "OS randomness unavailable"))?;
    Ok(b)
}
