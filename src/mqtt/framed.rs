//! MQTT packets on a byte stream: the codec, the checks it leaves to us, and why a connection ends.

use super::MAX_PACKET_BYTES;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::Error as CodecError;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

/// How long one write to the client may take before the client counts as not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How much the read buffer grows by when it runs short.
const READ_CHUNK: usize = 1024;
/// A read buffer larger than this is released once empty.
const RETAINED_BUFFER: usize = 8 * 1024;

/// Why a connection ended; logged once at the task boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0:?}")]
    Codec(CodecError),
    #[error("no CONNECT within the timeout")]
    ConnectTimeout,
    #[error("the first packet was not CONNECT")]
    NotConnect,
    #[error("connection refused: {0}")]
    Refused(String),
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("the SAS token expired")]
    TokenExpired,
    #[error("replaced by a newer connection of the same identity, or too slow to read")]
    Closed,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("the client stopped reading")]
    WriteTimeout,
}

/// Reads and writes MQTT packets on any byte stream (TLS socket or WebSocket pipe).
pub(super) struct Framed<S> {
    pub(super) stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Buffers start empty and are sized by use: an idle connection holds only a small read
    /// buffer, and no write buffer at all (memory per idle connection is what limits fleets).
    pub(super) fn new(stream: S) -> Self {
        Self {
            stream,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
        }
    }

    /// The next packet, or `None` when the peer closed cleanly. Cancel-safe: bytes already read
    /// stay in `read_buf`.
    pub(super) async fn read(&mut self) -> Result<Option<Packet>, Error> {
        loop {
            // Reserved packet types (0 and 15) are refused by the codec's fixed-header check;
            // the flag rules it does not check are checked here, on the raw bytes.
            check_flags(&self.read_buf).map_err(Error::Protocol)?;
            match v4::read(&mut self.read_buf, MAX_PACKET_BYTES) {
                Ok(packet) => {
                    check_strings(&packet).map_err(Error::Protocol)?;
                    return Ok(Some(packet));
                }
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(Error::Codec(e)),
            }
            if self.read_buf.is_empty() && self.read_buf.capacity() > RETAINED_BUFFER {
                // A large packet grew the buffer; give the memory back.
                self.read_buf = BytesMut::new();
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 2 {
                self.read_buf.reserve(READ_CHUNK);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Codec(CodecError::InsufficientBytes(0)))
                };
            }
        }
    }

    pub(super) async fn write(&mut self, packet: Packet) -> Result<(), Error> {
        let written = match &packet {
            Packet::ConnAck(p) => p.write(&mut self.write_buf),
            Packet::Publish(p) => p.write(&mut self.write_buf),
            Packet::PubAck(p) => p.write(&mut self.write_buf),
            Packet::SubAck(p) => p.write(&mut self.write_buf),
            Packet::UnsubAck(p) => p.write(&mut self.write_buf),
            Packet::PingResp => v4::PingResp.write(&mut self.write_buf),
            other => unreachable!("the hub never sends {other:?}"),
        };
        written.map_err(Error::Codec)?;
        let flush = async {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await
        };
        let result = timeout(WRITE_TIMEOUT, flush).await;
        // Written: free the buffer rather than keep it for a connection that may stay idle.
        self.write_buf = BytesMut::new();
        match result {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::WriteTimeout),
        }
    }
}

/// The fixed-header flags MQTT 3.1.1 fixes, and CONNECT's reserved flag, on the bytes of the
/// next packet (as many of them as have arrived).
pub(super) fn check_flags(buf: &[u8]) -> Result<(), String> {
    let Some(&first) = buf.first() else {
        return Ok(());
    };
    let (kind, flags) = (first >> 4, first & 0x0f);
    let required = match kind {
        // PUBLISH carries DUP, QoS and RETAIN in its flags.
        3 => None,
        // [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1]: PUBREL, SUBSCRIBE, UNSUBSCRIBE.
        6 | 8 | 10 => Some(0b0010),
        // [MQTT-2.2.2-1]: every other packet's flags are reserved as 0.
        _ => Some(0),
    };
    if required.is_some_and(|r| r != flags) {
        return Err(format!(
            "packet type {kind} with fixed-header flags {flags:#06b} (MQTT-2.2.2-2)"
        ));
    }
    if kind == 1 {
        // CONNECT: remaining length (1-4 bytes), protocol name (2-byte length + name), level,
        // then the connect flags, whose bit 0 is reserved [MQTT-3.1.2-3].
        let mut at = 1;
        while buf.get(at).is_some_and(|b| b & 0x80 != 0) && at < 4 {
            at += 1;
        }
        at += 1;
        let name_len = match buf.get(at..at + 2) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return Ok(()),
        };
        if buf.get(at + 2 + name_len + 1).is_some_and(|f| f & 1 != 0) {
            return Err("CONNECT with the reserved flag set (MQTT-3.1.2-3)".into());
        }
    }
    Ok(())
}

/// [MQTT-4.7.3-2]: topic names and filters must not contain U+0000.
pub(super) fn check_strings(packet: &Packet) -> Result<(), String> {
    let nul = match packet {
        Packet::Publish(p) => p.topic.contains('\0'),
        Packet::Subscribe(s) => s.filters.iter().any(|f| f.path.contains('\0')),
        Packet::Unsubscribe(u) => u.topics.iter().any(|t| t.contains('\0')),
        _ => false,
    };
    if nul {
        Err("a topic containing U+0000 (MQTT-4.7.3-2)".into())
    } else {
        Ok(())
    }
}
