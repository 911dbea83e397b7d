//! A byte-level shim between the socket and the AMQP engine that fixes two interop traps of
//! real clients (`shared/protocol-amqp.md`, "Interop traps"):
//!
//! 1. **Outgoing performatives are written with every field.** AMQP 1.0 lets an encoder drop
//!    trailing null or default fields, and `fe2o3-amqp` does; `azure-eventhub`'s pyamqp reads
//!    fixed list positions (`Open[4]`, `Begin[7]`, `Attach[13]`, the transfer payload after
//!    `Transfer[10]`) and fails with `IndexError` on a short list, and reads `max-frame-size`
//!    and `handle-max` without applying their defaults. The real broker always writes full
//!    lists, so we do too: each outgoing performative's list is re-encoded with its missing
//!    trailing fields appended and null fields that have a default given that default.
//! 2. **Session frames on a channel after the peer ended it are dropped.** pyamqp still sends `Detach`
//!    on a session's channel after its `End`; the engine would treat that as a protocol error
//!    and close the whole connection.
//! 3. **String keys in a performative's `properties` become symbols.** The spec types them as
//!    `fields` (symbol keys), and `fe2o3-amqp` refuses the whole Open otherwise; uamqp (the
//!    `az iot` CLI's `monitor-events`) sends its Open properties (product, version, platform)
//!    with string keys, which IoT Hub accepts. A `str8`/`str32` key is rewritten in place as
//!    the `sym8`/`sym32` of the same bytes (same length, so nothing else moves).
//!
//! Only framing is parsed here (frame header, descriptor, list size and element boundaries);
//! the values themselves are left to the engine. Anything that does not parse as expected
//! is passed through unchanged, for the engine to judge.

use bytes::{Buf, BufMut, BytesMut};
use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Frames larger than this are passed through without inspection (the engine refuses them).
const MAX_INSPECTED_FRAME: usize = 1024 * 1024;

/// Wraps a transport stream; see the module documentation.
#[derive(Debug)]
pub struct FullFrames<S> {
    inner: S,
    /// Bytes read from the socket, not yet handed to the engine.
    read_raw: BytesMut,
    /// Filtered bytes ready for the engine.
    read_ready: BytesMut,
    read_eof: bool,
    /// Channels the peer has ended (and not begun again).
    ended: HashSet<u16>,
    /// Bytes the engine wrote, not yet re-encoded (a frame may arrive in pieces).
    write_raw: BytesMut,
    /// Re-encoded bytes waiting for the socket.
    write_ready: BytesMut,
    /// Once something unparseable passed, the rest of that direction passes through.
    read_passthrough: bool,
    write_passthrough: bool,
    /// A malformed frame arrived: once `read_ready` is drained, reads fail.
    read_malformed: bool,
}

impl<S> FullFrames<S> {
    /// Wraps `inner`, whose first bytes (`prefix`, the protocol header) were already read.
    pub fn with_prefix(inner: S, prefix: &[u8]) -> Self {
        let mut shim = Self::new(inner);
        shim.read_raw.extend_from_slice(prefix);
        shim.filter_incoming();
        shim
    }

    pub fn new(inner: S) -> Self {
        Self {
            inner,
            read_raw: BytesMut::new(),
            read_ready: BytesMut::new(),
            read_eof: false,
            ended: HashSet::new(),
            write_raw: BytesMut::new(),
            write_ready: BytesMut::new(),
            read_passthrough: false,
            write_passthrough: false,
            read_malformed: false,
        }
    }
}

/// One unit of the byte stream: a protocol header or a whole frame.
enum Unit {
    Header(usize),
    Frame(usize),
    /// Too large to inspect: pass everything through from here on.
    Opaque,
    /// A frame header no valid frame has (size below 8, data offset below 8 or past the end).
    /// The engine's decoder panics on some of these, so it never sees them.
    Malformed,
}

fn next_unit(buf: &[u8]) -> Option<Unit> {
    if buf.len() < 8 {
        // "AMQP" plus 4 bytes, or a frame header: either way 8 bytes are needed.
        return None;
    }
    if &buf[..4] == b"AMQP" {
        return Some(Unit::Header(8));
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let doff = buf[4] as usize * 4;
    if size < 8 || doff < 8 || doff > size {
        return Some(Unit::Malformed);
    }
    if size > MAX_INSPECTED_FRAME {
        return Some(Unit::Opaque);
    }
    if buf.len() < size {
        return None;
    }
    // The performative (the body's first value; a transfer's payload follows it) must be well
    // formed before the engine decodes it. An empty body is a heartbeat.
    let body = &buf[doff..size];
    if !body.is_empty() && well_formed(body, 0).is_none() {
        return Some(Unit::Malformed);
    }
    Some(Unit::Frame(size))
}

/// Frame type (0 = AMQP, 1 = SASL), channel, and the performative's descriptor code, if the
/// frame has a body with a small-ulong or ulong descriptor.
fn frame_info(frame: &[u8]) -> (u8, u16, Option<(u64, usize)>) {
    let doff = frame[4] as usize * 4;
    let kind = frame[5];
    let channel = u16::from_be_bytes([frame[6], frame[7]]);
    let body = &frame[doff..];
    let code = match body {
        [0x00, 0x53, code, ..] => Some((u64::from(*code), doff + 3)),
        [0x00, 0x80, rest @ ..] if rest.len() >= 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[..8]);
            Some((u64::from_be_bytes(b), doff + 10))
        }
        _ => None,
    };
    (kind, channel, code)
}

/// The byte length of the encoded AMQP value at the start of `buf`, if complete.
fn value_len(buf: &[u8]) -> Option<usize> {
    let code = *buf.first()?;
    let need = |n: usize| (buf.len() > n).then_some(n + 1);
    match code {
        0x00 => {
            let d = value_len(&buf[1..])?;
            let v = value_len(&buf[1 + d..])?;
            Some(1 + d + v)
        }
        0x40..=0x4f => Some(1),
        0x50..=0x5f => need(1),
        0x60..=0x6f => need(2),
        0x70..=0x7f => need(4),
        0x80..=0x8f => need(8),
        0x90..=0x9f => need(16),
        0xa0..=0xaf | 0xc0..=0xcf | 0xe0..=0xef => {
            let n = *buf.get(1)? as usize;
            (buf.len() >= 2 + n).then_some(2 + n)
        }
        0xb0..=0xbf | 0xd0..=0xdf | 0xf0..=0xff => {
            let n = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
            (buf.len() >= 5 + n).then_some(5 + n)
        }
        _ => None,
    }
}

/// Whether the encoded AMQP value at the start of `buf` is well formed as far as sizes go:
/// every variable-width, compound or array value's declared size fits in what is there, and no
/// compound or array declares more elements than it has bytes. The engine's decoder allocates
/// a buffer of the declared size before it reads (serde_amqp's `IoReader::fill_buffer`), so a
/// 40-byte frame declaring a 3.6 GB symbol made it allocate 3.6 GB (found by the
/// `amqp_frames` fuzz target). Returns the value's length.
fn well_formed(buf: &[u8], depth: usize) -> Option<usize> {
    if depth > 32 {
        return None;
    }
    let code = *buf.first()?;
    match code {
        0x00 => {
            let d = well_formed(&buf[1..], depth + 1)?;
            let v = well_formed(&buf[1 + d..], depth + 1)?;
            Some(1 + d + v)
        }
        0xc0..=0xdf => {
            let (size, count, head, counted) = sized_header(buf, code >= 0xd0)?;
            let end = head.checked_add(size)?;
            if end > buf.len() || count > size || size < counted {
                return None;
            }
            // Walk the elements: each must fit inside the compound.
            let mut at = head + counted;
            for _ in 0..count {
                at += well_formed(buf.get(at..end)?, depth + 1)?;
            }
            Some(end)
        }
        0xe0..=0xff => {
            let (size, count, head, _) = sized_header(buf, code >= 0xf0)?;
            let end = head.checked_add(size)?;
            (end <= buf.len() && count <= size).then_some(end)
        }
        _ => value_len(buf),
    }
}

/// A compound's or array's (size, count, bytes before the size's span, width of the count):
/// one-byte fields for the 8-bit encodings, four-byte ones for the 32-bit encodings.
fn sized_header(buf: &[u8], wide: bool) -> Option<(usize, usize, usize, usize)> {
    if wide {
        let size = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
        let count = u32::from_be_bytes(buf.get(5..9)?.try_into().ok()?) as usize;
        Some((size, count, 5, 4))
    } else {
        Some((*buf.get(1)? as usize, *buf.get(2)? as usize, 2, 1))
    }
}

/// The full field list of a performative: each field's encoded default (null when it has none).
fn fields_of(frame_type: u8, code: u64) -> Option<&'static [&'static [u8]]> {
    const NULL: &[u8] = &[0x40];
    const FALSE: &[u8] = &[0x42];
    const UINT_MAX: &[u8] = &[0x70, 0xff, 0xff, 0xff, 0xff];
    const USHORT_MAX: &[u8] = &[0x60, 0xff, 0xff];
    const MIXED: &[u8] = &[0x50, 0x02];
    const FIRST: &[u8] = &[0x50, 0x00];
    Some(match (frame_type, code) {
        // open: container-id, hostname, max-frame-size, channel-max, idle-time-out,
        // outgoing-locales, incoming-locales, offered-, desired-capabilities, properties
        (0, 0x10) => &[
            NULL, NULL, UINT_MAX, USHORT_MAX, NULL, NULL, NULL, NULL, NULL, NULL,
        ],
        // begin: remote-channel, next-outgoing-id, incoming-window, outgoing-window,
        // handle-max, offered-, desired-capabilities, properties
        (0, 0x11) => &[NULL, NULL, NULL, NULL, UINT_MAX, NULL, NULL, NULL],
        // attach: name, handle, role, snd-settle-mode, rcv-settle-mode, source, target,
        // unsettled, incomplete-unsettled, initial-delivery-count, max-message-size,
        // offered-, desired-capabilities, properties
        (0, 0x12) => &[
            NULL, NULL, NULL, MIXED, FIRST, NULL, NULL, NULL, FALSE, NULL, NULL, NULL, NULL, NULL,
        ],
        // flow: next-incoming-id, incoming-window, next-outgoing-id, outgoing-window, handle,
        // delivery-count, link-credit, available, drain, echo, properties
        (0, 0x13) => &[
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, FALSE, FALSE, NULL,
        ],
        // transfer: handle, delivery-id, delivery-tag, message-format, settled, more,
        // rcv-settle-mode, state, resume, aborted, batchable
        (0, 0x14) => &[
            NULL, NULL, NULL, NULL, NULL, FALSE, NULL, NULL, FALSE, FALSE, FALSE,
        ],
        // disposition: role, first, last, settled, state, batchable
        (0, 0x15) => &[NULL, NULL, NULL, FALSE, NULL, FALSE],
        // detach: handle, closed, error
        (0, 0x16) => &[NULL, FALSE, NULL],
        // end, close: error
        (0, 0x17 | 0x18) => &[NULL],
        // sasl-mechanisms; sasl-outcome: code, additional-data
        (1, 0x40) => &[NULL],
        (1, 0x44) => &[NULL, NULL],
        _ => return None,
    })
}

/// Index of the `properties` field (a `fields` map) in the performatives that have one:
/// open, begin, attach, flow.
fn properties_index(frame_type: u8, code: u64) -> Option<usize> {
    match (frame_type, code) {
        (0, 0x10) => Some(9),
        (0, 0x11) => Some(7),
        (0, 0x12) => Some(13),
        (0, 0x13) => Some(10),
        _ => None,
    }
}

/// Trap 3: rewrites string keys of the incoming performative's `properties` map as symbols,
/// in place. Leaves the frame alone when it has no such map or does not parse.
fn symbolize_property_keys(frame: &mut [u8]) {
    let (kind, _, code) = frame_info(frame);
    let Some((code, list_at)) = code else {
        return;
    };
    let Some(index) = properties_index(kind, code) else {
        return;
    };
    let Some(map_at) = element_at(frame, list_at, index) else {
        return;
    };
    let Some((count, header)) = compound_header(frame.get(map_at..).unwrap_or_default(), 0xc1)
    else {
        return;
    };
    let mut at = map_at + header;
    for i in 0..count {
        let Some(len) = frame.get(at..).and_then(value_len) else {
            return;
        };
        if i % 2 == 0 {
            match frame[at] {
                0xa1 => frame[at] = 0xa3,
                0xb1 => frame[at] = 0xb3,
                _ => {}
            }
        }
        at += len;
    }
}

/// `(element count, header length)` of a list (`list_code` 0xc0) or map (0xc1) encoding at
/// the start of `buf`, in its 8-bit or 32-bit form.
fn compound_header(buf: &[u8], list_code: u8) -> Option<(usize, usize)> {
    let code = *buf.first()?;
    if code == list_code {
        Some((*buf.get(2)? as usize, 3))
    } else if code == list_code + 0x10 {
        let count = u32::from_be_bytes(buf.get(5..9)?.try_into().ok()?) as usize;
        Some((count, 9))
    } else {
        None
    }
}

/// Where element `index` of the performative list at `list_at` starts, if the list has it.
fn element_at(frame: &[u8], list_at: usize, index: usize) -> Option<usize> {
    let (count, header) = compound_header(frame.get(list_at..)?, 0xc0)?;
    if index >= count {
        return None;
    }
    let mut at = list_at + header;
    for _ in 0..index {
        at += value_len(frame.get(at..)?)?;
    }
    Some(at)
}

/// Re-encodes one outgoing frame with a full-length performative list. `None` when the frame
/// is not a performative this shim knows, or does not parse (it is then sent unchanged).
fn complete_frame(frame: &[u8]) -> Option<Vec<u8>> {
    let (kind, _, code) = frame_info(frame);
    let (code, list_at) = code?;
    let fields = fields_of(kind, code)?;
    let list = &frame[list_at..];
    let (count, header, size) = match list.first()? {
        0x45 => (0, 1, 0),
        0xc0 => (
            *list.get(2)? as usize,
            3,
            (*list.get(1)? as usize).checked_sub(1)?,
        ),
        0xd0 => {
            let size = u32::from_be_bytes(list.get(1..5)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(list.get(5..9)?.try_into().ok()?) as usize;
            (count, 9, size.checked_sub(4)?)
        }
        _ => return None,
    };
    if count > fields.len() {
        return None;
    }
    let elements = list.get(header..header + size)?;
    let payload = &list[header + size..];

    let mut body = Vec::with_capacity(size + 16);
    let mut at = 0;
    for default in fields.iter().take(count) {
        let len = value_len(&elements[at..])?;
        let value = &elements[at..at + len];
        if value == [0x40] {
            body.extend_from_slice(default);
        } else {
            body.extend_from_slice(value);
        }
        at += len;
    }
    if at != elements.len() {
        return None;
    }
    for default in &fields[count..] {
        body.extend_from_slice(default);
    }

    let mut out = Vec::with_capacity(frame.len() + body.len());
    out.extend_from_slice(&frame[..list_at]);
    out.push(0xd0);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&(fields.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(payload);
    let total = out.len() as u32;
    out[..4].copy_from_slice(&total.to_be_bytes());
    Some(out)
}

impl<S> FullFrames<S> {
    /// Moves complete units from `read_raw` to `read_ready`, dropping frames on ended channels.
    fn filter_incoming(&mut self) {
        loop {
            if self.read_passthrough {
                let rest = self.read_raw.split();
                self.read_ready.unsplit(rest);
                return;
            }
            match next_unit(&self.read_raw) {
                None => return,
                Some(Unit::Opaque) => self.read_passthrough = true,
                Some(Unit::Malformed) => {
                    // AMQP 1.0 §2.3.1: a malformed frame is a fatal framing error. Whatever
                    // came before it is still delivered; then reads fail and the connection ends.
                    self.read_raw.clear();
                    self.read_malformed = true;
                    return;
                }
                Some(Unit::Header(n)) => {
                    let header = self.read_raw.split_to(n);
                    self.read_ready.unsplit(header);
                }
                Some(Unit::Frame(n)) => {
                    let mut frame = self.read_raw.split_to(n);
                    symbolize_property_keys(&mut frame);
                    let (kind, channel, code) = frame_info(&frame);
                    let code = code.map(|(c, _)| c);
                    if kind == 0 {
                        match code {
                            Some(0x11) => {
                                self.ended.remove(&channel);
                            }
                            // Session-scoped performatives (attach … end) on an ended channel.
                            Some(0x12..=0x17) if self.ended.contains(&channel) => {
                                tracing::debug!(
                                    channel,
                                    ?code,
                                    "dropping a frame on an ended channel"
                                );
                                continue;
                            }
                            Some(0x17) => {
                                self.ended.insert(channel);
                            }
                            _ => {}
                        }
                    }
                    self.read_ready.unsplit(frame);
                }
            }
        }
    }

    /// Moves complete units from `write_raw` to `write_ready`, completing performatives.
    fn complete_outgoing(&mut self) {
        loop {
            if self.write_passthrough {
                let rest = self.write_raw.split();
                self.write_ready.unsplit(rest);
                return;
            }
            match next_unit(&self.write_raw) {
                None => return,
                Some(Unit::Opaque | Unit::Malformed) => self.write_passthrough = true,
                Some(Unit::Header(n)) => {
                    let header = self.write_raw.split_to(n);
                    self.write_ready.unsplit(header);
                }
                Some(Unit::Frame(n)) => {
                    let frame = self.write_raw.split_to(n);
                    match complete_frame(&frame) {
                        Some(full) => self.write_ready.put_slice(&full),
                        None => self.write_ready.unsplit(frame),
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FullFrames<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.read_ready.is_empty() {
                let n = this.read_ready.len().min(buf.remaining());
                buf.put_slice(&this.read_ready[..n]);
                this.read_ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_malformed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed AMQP frame header (size or data offset below 8, or offset past the end)",
                )));
            }
            if this.read_eof {
                if this.read_raw.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // The peer closed in the middle of a frame (or of its header). The engine's
                // decoder panics on some truncated frames (a SASL frame cut after its size
                // field, found by fuzz/amqp_frames), so it never sees one: the read fails.
                this.read_raw.clear();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection in the middle of an AMQP frame",
                )));
            }
            let mut chunk = [0u8; 8 * 1024];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf))?;
            if chunk_buf.filled().is_empty() {
                this.read_eof = true;
            } else {
                this.read_raw.extend_from_slice(chunk_buf.filled());
                this.filter_incoming();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> FullFrames<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write_ready.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.write_ready))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.write_ready.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FullFrames<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // Bound the buffered output: drain before taking more once it is large.
        if this.write_ready.len() >= 64 * 1024 {
            ready!(this.poll_drain(cx))?;
        }
        this.write_raw.extend_from_slice(buf);
        this.complete_outgoing();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Incomplete bytes cannot be completed any more; send them as they are.
        let rest = this.write_raw.split();
        this.write_ready.unsplit(rest);
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, channel: u16, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
        f.extend_from_slice(&[2, kind]);
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn a_short_open_gets_every_field_with_defaults() {
        // open(container-id "c") as list8 with one element.
        let body = [0x00, 0x53, 0x10, 0xc0, 0x04, 0x01, 0xa1, 0x01, b'c'];
        let full = complete_frame(&frame(0, 0, &body)).expect("completed");
        let list = &full[8 + 3..];
        assert_eq!(list[0], 0xd0);
        assert_eq!(u32::from_be_bytes(list[5..9].try_into().unwrap()), 10);
        let elements = &list[9..];
        // container-id, hostname null, max-frame-size default, channel-max default, 6 nulls.
        let mut want = vec![
            0xa1, 0x01, b'c', 0x40, 0x70, 0xff, 0xff, 0xff, 0xff, 0x60, 0xff, 0xff,
        ];
        want.extend_from_slice(&[0x40; 6]);
        assert_eq!(elements, &want[..]);
        assert_eq!(
            u32::from_be_bytes(full[..4].try_into().unwrap()) as usize,
            full.len()
        );
    }

    #[test]
    fn a_transfer_keeps_its_payload_after_the_completed_list() {
        // transfer(handle 0, delivery-id 1, tag [7]) then a payload.
        let mut body = vec![
            0x00, 0x53, 0x14, 0xc0, 0x07, 0x03, 0x43, 0x52, 0x01, 0xa0, 0x01, 0x07,
        ];
        body.extend_from_slice(b"PAYLOAD");
        let full = complete_frame(&frame(0, 1, &body)).expect("completed");
        assert!(full.ends_with(b"PAYLOAD"));
        let list = &full[8 + 3..];
        assert_eq!(u32::from_be_bytes(list[5..9].try_into().unwrap()), 11);
        let size = u32::from_be_bytes(list[1..5].try_into().unwrap()) as usize;
        assert_eq!(&list[1 + 4 + size..], b"PAYLOAD");
    }

    #[test]
    fn a_null_with_a_default_becomes_the_default() {
        // begin(remote-channel null, 0, 10, 10, handle-max null, ..., properties {})
        let body = [
            0x00, 0x53, 0x11, 0xc0, 0x0d, 0x08, 0x40, 0x43, 0x52, 0x0a, 0x52, 0x0a, 0x40, 0x40,
            0x40, 0xc1, 0x01, 0x00,
        ];
        let full = complete_frame(&frame(0, 0, &body)).expect("completed");
        let elements = &full[8 + 3 + 9..];
        assert_eq!(&elements[6..11], &[0x70, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&elements[11..], &[0x40, 0x40, 0xc1, 0x01, 0x00]);
    }

    #[test]
    fn string_keys_of_open_properties_become_symbols() {
        // open(container-id "c", 8 nulls, properties {"product": "x", sym "k": "v"}), as
        // uamqp writes it.
        let mut list = vec![0xa1, 1, b'c'];
        list.extend([0x40; 8]);
        let mut map = vec![0xa1, 7];
        map.extend_from_slice(b"product");
        map.extend([0xa1, 1, b'x', 0xa3, 1, b'k', 0xa1, 1, b'v']);
        list.extend([0xc1, map.len() as u8 + 1, 4]);
        list.extend(&map);
        let mut body = vec![0x00, 0x53, 0x10, 0xc0, list.len() as u8 + 1, 10];
        body.extend(&list);
        let mut f = frame(0, 0, &body);
        let before = f.clone();
        symbolize_property_keys(&mut f);
        assert_eq!(f.len(), before.len());
        let map_at = f.len() - map.len();
        assert_eq!(f[map_at], 0xa3, "the string key is now a symbol");
        assert_eq!(&f[map_at + 2..map_at + 9], b"product");
        assert_eq!(f[map_at + 9], 0xa1, "values stay strings");
        assert_eq!(f[map_at + 12], 0xa3, "symbol keys stay symbols");
        let differing: Vec<usize> = (0..f.len()).filter(|&i| f[i] != before[i]).collect();
        assert_eq!(differing, vec![map_at]);
        // A begin without properties, and garbage, are left alone.
        let mut begin = frame(0, 0, &[0x00, 0x53, 0x11, 0x45]);
        let copy = begin.clone();
        symbolize_property_keys(&mut begin);
        assert_eq!(begin, copy);
        let mut junk = frame(0, 0, &[0x00, 0x53, 0x10, 0xc0, 0xff, 0xff]);
        let copy = junk.clone();
        symbolize_property_keys(&mut junk);
        assert_eq!(junk, copy);
    }

    #[test]
    fn unknown_or_broken_frames_are_left_alone() {
        assert!(complete_frame(&frame(0, 0, &[])).is_none());
        assert!(complete_frame(&frame(0, 0, &[0x00, 0x53, 0x99, 0x45])).is_none());
        // A list claiming more bytes than it has.
        assert!(
            complete_frame(&frame(0, 0, &[0x00, 0x53, 0x10, 0xc0, 0x09, 0x01, 0xa1])).is_none()
        );
    }

    #[tokio::test]
    async fn frames_on_an_ended_channel_are_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut peer, ours) = tokio::io::duplex(4096);
        let mut shim = FullFrames::new(ours);
        let end = frame(0, 1, &[0x00, 0x53, 0x17, 0x45]);
        let detach = frame(0, 1, &[0x00, 0x53, 0x16, 0xc0, 0x02, 0x01, 0x43]);
        let close = frame(0, 0, &[0x00, 0x53, 0x18, 0x45]);
        let mut input = b"AMQP\x00\x01\x00\x00".to_vec();
        for f in [&end, &detach, &close] {
            input.extend_from_slice(f);
        }
        peer.write_all(&input).await.unwrap();
        drop(peer);
        let mut got = Vec::new();
        shim.read_to_end(&mut got).await.unwrap();
        let mut want = b"AMQP\x00\x01\x00\x00".to_vec();
        want.extend_from_slice(&end);
        want.extend_from_slice(&close);
        assert_eq!(got, want);
    }

    /// Frame headers the engine's decoder panicked on (size below the 8-byte header) and others
    /// no valid frame has: what came before them is delivered, then reads fail.
    #[tokio::test]
    async fn malformed_frame_headers_fail_the_read_instead_of_reaching_the_engine() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for bad in [
            &[0u8, 0, 0, 4, 2, 0, 0, 0][..], // size 4
            &[0, 0, 0, 0, 2, 0, 0, 0],       // size 0
            &[0, 0, 0, 16, 1, 0, 0, 0],      // data offset 4 bytes
            &[0, 0, 0, 16, 5, 0, 0, 0],      // data offset 20, past the frame's 16
        ] {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut shim = FullFrames::with_prefix(server, b"AMQP\x00\x01\x00\x00");
            client.write_all(bad).await.unwrap();
            client.write_all(&[0; 16]).await.unwrap();
            let mut header = [0u8; 8];
            shim.read_exact(&mut header).await.unwrap();
            assert_eq!(&header, b"AMQP\x00\x01\x00\x00");
            let mut rest = [0u8; 8];
            let e = shim.read(&mut rest).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }

    /// Found by the `amqp_frames` fuzz target: a 40-byte frame whose performative declares a
    /// 3.6 GB symbol made the engine allocate that much before reading. Such a frame is a
    /// framing error now; well-formed performatives still pass.
    #[test]
    fn declared_sizes_beyond_the_frame_are_malformed() {
        let mut input = vec![0x00, 0x00, 0x00, 0x28, 0x02, 0x00, 0x32, 0x75];
        input.extend_from_slice(&[0x00, 0xb3, 0xd9, 0x10, 0x1d, 0xc0]);
        input.resize(0x28, 0xd9);
        assert!(matches!(next_unit(&input), Some(Unit::Malformed)));
        // A list claiming more elements than bytes, and an array of four billion nulls.
        for body in [
            vec![0x00, 0x53, 0x10, 0xc0, 0x02, 0x09, 0x40],
            vec![
                0x00, 0x53, 0x10, 0xf0, 0x00, 0x00, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0x40,
            ],
            vec![
                0x00, 0x53, 0x10, 0xd0, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01,
            ],
        ] {
            let f = frame(0, 0, &body);
            assert!(
                matches!(next_unit(&f), Some(Unit::Malformed)),
                "{body:02x?}"
            );
        }
        // An open with a container id, and a heartbeat, are fine.
        let open = frame(
            0,
            0,
            &[0x00, 0x53, 0x10, 0xc0, 0x04, 0x01, 0xa1, 0x01, b'c'],
        );
        assert!(matches!(next_unit(&open), Some(Unit::Frame(_))));
        let heartbeat = frame(0, 0, &[]);
        assert!(matches!(next_unit(&heartbeat), Some(Unit::Frame(8))));
    }

    /// A frame cut short by the end of the stream (here a SASL frame whose size field says 6)
    /// never reaches the engine, whose decoder panicked on it (fuzz/amqp_frames): the complete
    /// units before it are delivered, then the read fails.
    #[tokio::test]
    async fn a_frame_cut_short_by_the_end_of_the_stream_fails_the_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for cut in [
            &[0u8, 0, 0, 6, 0, 37][..],
            &[0, 0, 0, 16, 2, 1, 0, 0, 0x00, 0x53],
        ] {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut shim = FullFrames::with_prefix(server, b"AMQP\x03\x01\x00\x00");
            client.write_all(cut).await.unwrap();
            drop(client);
            let mut header = [0u8; 8];
            shim.read_exact(&mut header).await.unwrap();
            assert_eq!(&header, b"AMQP\x03\x01\x00\x00");
            let mut rest = Vec::new();
            let e = shim.read_to_end(&mut rest).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{cut:?}");
            assert!(rest.is_empty(), "{cut:?}: {rest:?}");
        }
    }
}
