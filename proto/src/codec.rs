//! The gRPC codec of the `warmroll.v1` service: prost encoding with buffer sizes chosen
//! for a coordinator holding thousands of long-lived streams.
//!
//! tonic keeps an encode and a decode buffer per stream for the stream's whole life, and
//! a decode buffer grows (for good) whenever a message, plus what is buffered before it,
//! does not fit. Its defaults (8 KiB each, messages batched into chunks of up to 32 KiB)
//! suit short, bulky calls; here a stream carries small messages for days. So every
//! message goes to HTTP/2 as its own chunk (one DATA frame), the encode buffer starts at
//! 512 bytes and the decode buffer at 2 KiB: with snapshot parts of at most
//! [`crate::fleet::SNAPSHOT_PART_BYTES`] (512 bytes) and inventory changes of a few
//! hundred bytes, at most one message's remainder plus one frame is ever buffered, which
//! fits, so the coordinator's buffers keep their initial size. (A larger message, e.g. a
//! node's first change after many pods started at once, grows them for that session.)

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode buffer per stream.
const ENCODE_BUFFER_BYTES: usize = 512;
/// An encoded chunk is sent once it holds this much: every message on its own.
const YIELD_THRESHOLD_BYTES: usize = 1;
/// Initial decode buffer per stream.
const DECODE_BUFFER_BYTES: usize = 2 * 1024;

/// [`ProstCodec`] with the buffer settings above; the generated client and server use it.
#[derive(Debug, Clone)]
pub struct FleetCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for FleetCodec<T, U> {
    fn default() -> Self {
        FleetCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for FleetCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(
            DECODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }
}
