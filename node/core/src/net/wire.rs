//! Framing and validation of one `/murmur/params/1` payload:
//! `u32 LE header_len`, a `PayloadHeader` protobuf, then `body_len` body
//! bytes in the header's encoding (see `encoding`).
//!
//! This module owns the decision to accept or refuse a peer's payload. It
//! opens no streams and counts nothing (that is `service` and `accounting`);
//! a refusal carries a stable `reason()` for their counters.
//!
//! Allocation is sized only from validated lengths: the header buffer only
//! after `header_len <= MAX_HEADER_LEN`, the body and the decoded values only
//! after `check_header` has tied `body_len` to the encoding's exact length for
//! an `element_count` that fits the receiver's model. A peer therefore
//! cannot make a receiver hold more than one model's worth of values (plus a
//! header) per payload, whatever it sends.

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use murmur_proto::wire::v1::{PayloadHeader, PayloadKind};
use prost::Message;

use super::buffers::BufferPool;
use super::encoding::{self, DecodeError, Encoding};

/// The stream protocol that carries payloads.
pub const PROTOCOL: &str = "/murmur/params/1";
/// Largest header a receiver reads; the header carries no bulk data.
pub const MAX_HEADER_LEN: usize = 4096;
const PREFIX_LEN: usize = 4;

/// What a receiver accepts: its run, its model, and element ranges inside
/// its parameter vector (shards allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    pub run_id: String,
    pub fingerprint: String,
    pub total_elements: usize,
    /// The run's `--encoding`: payloads come in it or in f32 (results,
    /// pulls, final averages), never in another one.
    pub encoding: Encoding,
}

impl Expectation {
    /// Whether a payload in `got` can be one of this run's.
    pub fn accepts(&self, got: Encoding) -> bool {
        got == Encoding::F32
            || std::mem::discriminant(&got) == std::mem::discriminant(&self.encoding)
    }
}

/// A validated payload: finite values, `values.len() == header.element_count`.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub header: PayloadHeader,
    pub values: Vec<f32>,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("header length {len} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    OversizeHeader { len: usize },
    #[error("header does not decode: {0}")]
    BadHeader(String),
    #[error("payload is for run {got}, this node is in run `{want}`")]
    WrongRun { got: String, want: String },
    #[error("payload is for model fingerprint {got}, this node's model is `{want}`")]
    WrongFingerprint { got: String, want: String },
    #[error("header names sender {claimed}, but the stream comes from {actual}")]
    SenderMismatch { claimed: String, actual: String },
    #[error("unknown encoding {0}")]
    UnknownEncoding(i32),
    #[error("encoding {got} is not this run's (it sends {run} and f32)")]
    EncodingNotUsed { got: Encoding, run: Encoding },
    #[error("sample weight {weight} must be finite and >= 0")]
    BadWeight { weight: f64 },
    #[error("wrong length: {0}")]
    WrongLength(String),
    #[error("body checksum {got:#010x} does not match the header's {want:#010x}")]
    BadChecksum { got: u32, want: u32 },
    #[error("value at element {index} of the payload is not finite")]
    NonFinite { index: usize },
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("stream ended in the {part} after {got} of {expected} bytes")]
    Truncated { part: &'static str, expected: usize, got: usize },
    #[error("i/o error: {0}")]
    Io(String),
    #[error("the payload did not arrive within {0:?}")]
    TimedOut(std::time::Duration),
}

/// Every `Refusal::reason()`, for registering counters up front.
pub const ALL_REASONS: &[&str] = &[
    "oversize_header",
    "bad_header",
    "wrong_run",
    "wrong_fingerprint",
    "sender_mismatch",
    "unknown_encoding",
    "encoding_not_used",
    "bad_weight",
    "wrong_length",
    "bad_checksum",
    "non_finite",
    "malformed",
    "truncated",
    "io",
    "timed_out",
];

impl Refusal {
    /// Stable snake_case label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::OversizeHeader { .. } => "oversize_header",
            Refusal::BadHeader(_) => "bad_header",
            Refusal::WrongRun { .. } => "wrong_run",
            Refusal::WrongFingerprint { .. } => "wrong_fingerprint",
            Refusal::SenderMismatch { .. } => "sender_mismatch",
            Refusal::UnknownEncoding(_) => "unknown_encoding",
            Refusal::EncodingNotUsed { .. } => "encoding_not_used",
            Refusal::BadWeight { .. } => "bad_weight",
            Refusal::WrongLength(_) => "wrong_length",
            Refusal::BadChecksum { .. } => "bad_checksum",
            Refusal::NonFinite { .. } => "non_finite",
            Refusal::Malformed(_) => "malformed",
            Refusal::Truncated { .. } => "truncated",
            Refusal::Io(_) => "io",
            Refusal::TimedOut(_) => "timed_out",
        }
    }
}

impl From<DecodeError> for Refusal {
    fn from(e: DecodeError) -> Refusal {
        match e {
            DecodeError::Unknown(v) => Refusal::UnknownEncoding(v),
            DecodeError::Length { .. } => Refusal::WrongLength(e.to_string()),
            DecodeError::BadScale { index, scale } if !scale.is_finite() => {
                Refusal::NonFinite { index }
            }
            other => Refusal::Malformed(other.to_string()),
        }
    }
}

/// A header with the identity fields set, weight 1 and offset 0; `seal` or
/// `encode_payload` fill in the rest.
pub fn build_header(
    run_id: &str,
    fingerprint: &str,
    sender: &[u8],
    kind: PayloadKind,
    round: u64,
) -> PayloadHeader {
    PayloadHeader {
        run_id: run_id.to_string(),
        fingerprint: fingerprint.to_string(),
        sender: sender.to_vec(),
        kind: kind as i32,
        round,
        sample_weight: 1.0,
        ..PayloadHeader::default()
    }
}

/// Completes `header` for `body`, which encodes `element_count` values as
/// `enc` (top-k's `k` is clamped as `encode` does): encoding fields, counts,
/// `body_len` and the CRC32C checksum.
pub fn seal(
    mut header: PayloadHeader,
    enc: Encoding,
    element_count: usize,
    body: &[u8],
) -> PayloadHeader {
    let (encoding, block_size, top_k) = encoding::to_proto(enc.fit(element_count));
    header.encoding = encoding as i32;
    header.block_size = block_size;
    header.top_k = top_k;
    header.element_count = element_count as u64;
    header.body_len = body.len() as u64;
    header.checksum = crc32c::crc32c(body);
    header
}

/// Encodes `values` as `enc` and seals `header` for them.
pub fn encode_payload(
    header: PayloadHeader,
    values: &[f32],
    enc: Encoding,
) -> (PayloadHeader, Vec<u8>) {
    let body = encoding::encode(values, enc);
    (seal(header, enc, values.len(), &body), body)
}

/// Bytes this payload takes on the stream: prefix, header and body.
pub fn frame_len(header: &PayloadHeader) -> usize {
    let body = usize::try_from(header.body_len).unwrap_or(usize::MAX);
    (PREFIX_LEN + header.encoded_len()).saturating_add(body)
}

/// The validated shape of a payload.
struct Shape {
    encoding: Encoding,
    element_count: usize,
    body_len: usize,
}

/// Everything checkable before reading the body: run, fingerprint, sender,
/// weight, encoding, element range, and `body_len` equal to the encoding's
/// exact length (which bounds what reading the body allocates).
pub fn check_header(
    h: &PayloadHeader,
    exp: &Expectation,
    sender: &[u8],
) -> Result<Encoding, Refusal> {
    shape(h, exp, sender).map(|s| s.encoding)
}

fn shape(h: &PayloadHeader, exp: &Expectation, sender: &[u8]) -> Result<Shape, Refusal> {
    if h.run_id != exp.run_id {
        let got = super::log_limit::peer_text(&h.run_id);
        return Err(Refusal::WrongRun { got, want: exp.run_id.clone() });
    }
    if h.fingerprint != exp.fingerprint {
        let (got, want) = (super::log_limit::peer_text(&h.fingerprint), exp.fingerprint.clone());
        return Err(Refusal::WrongFingerprint { got, want });
    }
    if h.sender != sender {
        let (claimed, actual) = (peer_label(&h.sender), peer_label(sender));
        return Err(Refusal::SenderMismatch { claimed, actual });
    }
    if !(h.sample_weight.is_finite() && h.sample_weight >= 0.0) {
        return Err(Refusal::BadWeight { weight: h.sample_weight });
    }
    let encoding = encoding::from_proto(h.encoding, h.block_size, h.top_k)?;
    if !exp.accepts(encoding) {
        return Err(Refusal::EncodingNotUsed { got: encoding, run: exp.encoding });
    }
    let (offset, count) = (h.element_offset, h.element_count);
    if count == 0 {
        return Err(Refusal::WrongLength("element_count is 0".into()));
    }
    let end = offset.checked_add(count).and_then(|end| usize::try_from(end).ok());
    let Some(element_count) = end.filter(|&end| end <= exp.total_elements).map(|_| count as usize)
    else {
        return Err(Refusal::WrongLength(format!(
            "element_offset {offset} + element_count {count} exceeds the model's {} elements",
            exp.total_elements
        )));
    };
    let Some(body_len) = encoding.body_len(element_count) else {
        return Err(Refusal::WrongLength(format!("{encoding} cannot carry {count} elements")));
    };
    if h.body_len != body_len as u64 {
        return Err(Refusal::WrongLength(format!(
            "body_len {} but {encoding} takes {body_len} bytes for {count} elements",
            h.body_len
        )));
    }
    Ok(Shape { encoding, element_count, body_len })
}

/// A peer id as libp2p prints it, or hex when the bytes are not one.
fn peer_label(bytes: &[u8]) -> String {
    match PeerId::from_bytes(bytes) {
        Ok(peer) => peer.to_string(),
        Err(_) => format!("0x{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}

/// Reads and validates one payload from `sender` (the connection's peer id
/// as bytes). Returns finite values only.
pub async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    exp: &Expectation,
    sender: &[u8],
) -> Result<Payload, Refusal> {
    read_payload_noting(r, exp, sender, &mut None, &BufferPool::new(0)).await
}

/// `read_payload` into buffers from `pool`, also leaving in `seen` the
/// header of a refused payload when it decoded and named this run and this
/// sender: the receiver then knows which message will not come, and need
/// not wait for it.
pub async fn read_payload_noting<R: AsyncRead + Unpin>(
    r: &mut R,
    exp: &Expectation,
    sender: &[u8],
    seen: &mut Option<PayloadHeader>,
    pool: &BufferPool,
) -> Result<Payload, Refusal> {
    let mut prefix = [0u8; PREFIX_LEN];
    read_full(r, &mut prefix, "length prefix").await?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_HEADER_LEN {
        return Err(Refusal::OversizeHeader { len });
    }
    let mut buf = vec![0u8; len];
    read_full(r, &mut buf, "header").await?;
    let header =
        PayloadHeader::decode(buf.as_slice()).map_err(|e| Refusal::BadHeader(e.to_string()))?;
    if header.run_id == exp.run_id && header.sender == sender {
        *seen = Some(header.clone());
    }
    let shape = shape(&header, exp, sender)?;
    let mut values = pool.values(shape.element_count);
    // The body is checked as it streams in: checksum and finiteness piece
    // by piece while each piece is in cache, f32 straight into the values
    // and bf16/f16 decoded piece by piece (no body-sized second buffer).
    // The values are only handed on once the checksum matched.
    let read = match shape.encoding {
        Encoding::F32 => read_f32_body(r, &mut values).await,
        Encoding::Bf16 | Encoding::F16 => read_half_body(r, shape.encoding, &mut values).await,
        _ => read_whole_body(r, &shape, header.checksum, &mut values, pool).await,
    };
    let checked = read.and_then(|body| {
        verify_checksum(body.crc, header.checksum)?;
        match body.first_non_finite {
            Some(index) => Err(Refusal::NonFinite { index }),
            None => Ok(()),
        }
    });
    if let Err(refusal) = checked {
        pool.put_values(values);
        return Err(refusal);
    }
    Ok(Payload { header, values })
}

/// The index of the first NaN or infinity. Each block is checked without
/// branching (so it vectorizes); only a block with one is searched.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    const EXPONENT: u32 = 0x7f80_0000;
    values.chunks(BLOCK).enumerate().find_map(|(b, chunk)| {
        let bad =
            chunk.iter().fold(0u32, |acc, x| acc | u32::from(x.to_bits() & EXPONENT == EXPONENT));
        if bad == 0 {
            None
        } else {
            chunk.iter().position(|x| !x.is_finite()).map(|i| b * BLOCK + i)
        }
    })
}

fn verify_checksum(got: u32, want: u32) -> Result<(), Refusal> {
    if got == want { Ok(()) } else { Err(Refusal::BadChecksum { got, want }) }
}

/// Fills `buf` or says how far the stream got.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), Refusal> {
    read_summing(r, buf, part, |_| {}).await
}

/// What reading a body found: the CRC32C of its bytes and the index of its
/// first value that is not finite.
struct BodyRead {
    crc: u32,
    first_non_finite: Option<usize>,
}

/// Bytes of a half-precision body staged at a time.
const HALF_STAGE: usize = 64 * 1024;

/// Reads an f32 body straight into `values`.
async fn read_f32_body<R: AsyncRead + Unpin>(
    r: &mut R,
    values: &mut [f32],
) -> Result<BodyRead, Refusal> {
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(values);
    let (len, mut got) = (bytes.len(), 0);
    let mut found = BodyRead { crc: 0, first_non_finite: None };
    while got < len {
        let n = read_some(r, &mut bytes[got..], "body", len, got).await?;
        found.crc = crc32c::crc32c_append(found.crc, &bytes[got..got + n]);
        // The values this piece completed (one may have begun in the last).
        let (from, to) = (got / 4, (got + n) / 4);
        if found.first_non_finite.is_none() && to > from {
            let done: &[f32] = bytemuck::cast_slice(&bytes[from * 4..to * 4]);
            found.first_non_finite = first_non_finite(done).map(|i| from + i);
        }
        got += n;
    }
    Ok(found)
}

/// Reads a bf16 or f16 body through a small staging buffer, decoding each
/// piece into `values` as it arrives.
async fn read_half_body<R: AsyncRead + Unpin>(
    r: &mut R,
    half: Encoding,
    values: &mut [f32],
) -> Result<BodyRead, Refusal> {
    let len = values.len() * 2;
    let mut stage = vec![0u8; HALF_STAGE.min(len.max(2))];
    let mut found = BodyRead { crc: 0, first_non_finite: None };
    // `carry`: the odd byte of a word split between two reads, kept at stage[0].
    let (mut got, mut carry, mut decoded) = (0, 0, 0);
    while got < len {
        let room = (stage.len() - carry).min(len - got);
        let n = read_some(r, &mut stage[carry..carry + room], "body", len, got).await?;
        found.crc = crc32c::crc32c_append(found.crc, &stage[carry..carry + n]);
        got += n;
        let staged = carry + n;
        let words = staged / 2;
        let bad = encoding::decode_half_words(
            &stage[..words * 2],
            half,
            &mut values[decoded..decoded + words],
        );
        if found.first_non_finite.is_none() {
            found.first_non_finite = bad.map(|i| decoded + i);
        }
        decoded += words;
        carry = staged - words * 2;
        if carry == 1 {
            stage[0] = stage[staged - 1];
        }
    }
    Ok(found)
}

/// Reads an int8 or top-k body whole (their layouts put scales or indices
/// first), checks it against `checksum`, then decodes it into `values`.
async fn read_whole_body<R: AsyncRead + Unpin>(
    r: &mut R,
    shape: &Shape,
    checksum: u32,
    values: &mut [f32],
    pool: &BufferPool,
) -> Result<BodyRead, Refusal> {
    let mut body = pool.bytes(shape.body_len);
    let mut crc = 0;
    let read = read_summing(r, &mut body, "body", |piece| crc = crc32c::crc32c_append(crc, piece))
        .await
        .and_then(|()| verify_checksum(crc, checksum))
        .and_then(|()| Ok(encoding::decode_into(&body, shape.encoding, values)?));
    pool.put_bytes(body);
    read?;
    Ok(BodyRead { crc, first_non_finite: first_non_finite(values) })
}

/// One read into `buf`, retried when interrupted; `got` of `expected` body
/// bytes had arrived before it (for the refusal when the stream ends).
async fn read_some<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    part: &'static str,
    expected: usize,
    got: usize,
) -> Result<usize, Refusal> {
    loop {
        match r.read(buf).await {
            Ok(0) => return Err(Refusal::Truncated { part, expected, got }),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Refusal::Io(e.to_string())),
        }
    }
}

/// Fills `buf`, handing every piece read to `seen`.
async fn read_summing<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    part: &'static str,
    mut seen: impl FnMut(&[u8]),
) -> Result<(), Refusal> {
    let (len, mut got) = (buf.len(), 0);
    while got < len {
        let n = read_some(r, &mut buf[got..], part, len, got).await?;
        seen(&buf[got..got + n]);
        got += n;
    }
    Ok(())
}

/// Writes prefix, header and body, then flushes. The body is written as is,
/// not copied; a header that does not describe it is refused as `InvalidInput`.
pub async fn write_payload<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &PayloadHeader,
    body: &[u8],
) -> io::Result<()> {
    let head = frame_head(header, body.len())?;
    w.write_all(&head).await?;
    w.write_all(body).await?;
    w.flush().await
}

/// The bytes before a `body_len`-byte body: length prefix and header. A
/// header that does not describe that body is refused as `InvalidInput`.
pub fn frame_head(header: &PayloadHeader, body_len: usize) -> io::Result<Vec<u8>> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    if header.body_len != body_len as u64 {
        return Err(invalid(format!(
            "header says body_len {} but the body has {body_len} bytes",
            header.body_len
        )));
    }
    let len = header.encoded_len();
    if len > MAX_HEADER_LEN {
        return Err(invalid(format!("header of {len} bytes exceeds {MAX_HEADER_LEN}")));
    }
    let mut head = Vec::with_capacity(PREFIX_LEN + len);
    head.extend_from_slice(&(len as u32).to_le_bytes());
    header.encode(&mut head).map_err(io::Error::other)?;
    Ok(head)
}

/// `encode_payload` for values shared with their sender: an f32 body is the
/// values' own bytes, shared, not copied; other encodings are encoded anew.
pub fn encode_shared(
    header: PayloadHeader,
    values: Arc<Vec<f32>>,
    enc: Encoding,
) -> (PayloadHeader, Bytes) {
    if enc == Encoding::F32 {
        let header = seal(header, enc, values.len(), bytemuck::cast_slice(&values));
        (header, Bytes::from_owner(F32Body(values)))
    } else {
        let (header, body) = encode_payload(header, &values, enc);
        (header, Bytes::from(body))
    }
}

/// f32 values seen as their little-endian bytes (x86_64 and aarch64 are
/// little-endian; `encoding` writes the same bytes).
struct F32Body(Arc<Vec<f32>>);

impl AsRef<[u8]> for F32Body {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::io::Cursor;
    use proptest::prelude::*;

    const TOTAL: usize = 100;
    const SENDER: &[u8] = b"peer-a";

    fn exp() -> Expectation {
        Expectation {
            run_id: "run-1".into(),
            fingerprint: "fp-1".into(),
            total_elements: TOTAL,
            encoding: Encoding::F32,
        }
    }

    /// The expectation of a run whose encoding is the frame's own (f32 when
    /// its header does not decode), for tests of everything else.
    fn exp_for(bytes: &[u8]) -> Expectation {
        let header = bytes.get(..4).and_then(|prefix| {
            let len = u32::from_le_bytes(prefix.try_into().ok()?) as usize;
            PayloadHeader::decode(bytes.get(4..4 + len)?).ok()
        });
        let encoding = header
            .and_then(|h| encoding::from_proto(h.encoding, h.block_size, h.top_k).ok())
            .unwrap_or(Encoding::F32);
        Expectation { encoding, ..exp() }
    }

    fn template() -> PayloadHeader {
        build_header("run-1", "fp-1", SENDER, PayloadKind::Params, 7)
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect()
    }

    fn frame(header: &PayloadHeader, body: &[u8]) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        block_on(write_payload(&mut out, header, body)).unwrap();
        out.into_inner()
    }

    /// Prefix, header and whatever body, consistent or not.
    fn raw_frame(header: &PayloadHeader, body: &[u8]) -> Vec<u8> {
        let mut out = (header.encoded_len() as u32).to_le_bytes().to_vec();
        header.encode(&mut out).unwrap();
        out.extend_from_slice(body);
        out
    }

    fn read(bytes: &[u8]) -> Result<Payload, Refusal> {
        block_on(read_payload(&mut Cursor::new(bytes), &exp_for(bytes), SENDER))
    }

    fn reason(bytes: &[u8]) -> &'static str {
        read(bytes).unwrap_err().reason()
    }

    /// A frame whose header was changed after sealing.
    fn tampered(edit: impl FnOnce(&mut PayloadHeader)) -> Vec<u8> {
        let (mut header, body) = encode_payload(template(), &values(TOTAL), Encoding::F32);
        edit(&mut header);
        frame(&header, &body)
    }

    #[test]
    fn payloads_read_into_reused_buffers_hold_only_their_own_values() {
        let pool = BufferPool::new(4);
        for enc in [Encoding::F32, Encoding::Bf16, Encoding::Int8Block { block: 16 }] {
            // Spares full of garbage, larger than the payload.
            pool.put_values(vec![f32::MAX; 3 * TOTAL]);
            pool.put_bytes(vec![0xAB; 5 * TOTAL]);
            let (header, body) = encode_payload(template(), &values(TOTAL), enc);
            let bytes = frame(&header, &body);
            let mut seen = None;
            let fresh = read(&bytes).unwrap();
            let (mut r, want) = (Cursor::new(&bytes[..]), exp_for(&bytes));
            let reused = block_on(read_payload_noting(&mut r, &want, SENDER, &mut seen, &pool));
            assert_eq!(reused.unwrap().values, fresh.values, "{enc}");
        }
        // A NaN payload's buffer goes back to the pool, and its header is noted.
        let (header, body) = encode_payload(template(), &[f32::NAN; 3], Encoding::F32);
        let mut seen = None;
        let bytes = frame(&header, &body);
        let r = block_on(read_payload_noting(
            &mut Cursor::new(&bytes[..]),
            &exp(),
            SENDER,
            &mut seen,
            &pool,
        ));
        assert_eq!(r.unwrap_err().reason(), "non_finite");
        assert_eq!(seen.map(|h| h.round), Some(7));
    }

    /// A stream that hands out 1, 2, 3, ... 7 bytes per read, so pieces
    /// split values and half-precision words at every offset.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl futures::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.step = self.step % 7 + 1;
            let n = self.step.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn bodies_read_in_odd_pieces_decode_and_find_the_first_bad_value() {
        let trickled = |bytes: &[u8]| {
            let mut r = Trickle { bytes, step: 0 };
            block_on(read_payload(&mut r, &exp_for(bytes), SENDER))
        };
        for enc in [Encoding::F32, Encoding::Bf16, Encoding::F16, Encoding::Int8Block { block: 16 }]
        {
            let (header, body) = encode_payload(template(), &values(TOTAL), enc);
            let bytes = frame(&header, &body);
            assert_eq!(trickled(&bytes).unwrap().values, read(&bytes).unwrap().values, "{enc}");
            let mut bad = values(TOTAL);
            bad[TOTAL - 1] = f32::NAN;
            bad[37] = f32::INFINITY;
            let (header, body) = encode_payload(template(), &bad, enc);
            let refusal = trickled(&frame(&header, &body)).unwrap_err();
            if matches!(enc, Encoding::Int8Block { .. }) {
                // int8 carries the infinity in its block's scale.
                assert_eq!(refusal.reason(), "non_finite", "{refusal}");
            } else {
                assert!(matches!(refusal, Refusal::NonFinite { index: 37 }), "{enc}: {refusal}");
            }
            // A checksum mismatch wins over a bad value, as the reasons are documented.
            let (mut header, body) = encode_payload(template(), &bad, enc);
            header.checksum ^= 1;
            assert_eq!(trickled(&frame(&header, &body)).unwrap_err().reason(), "bad_checksum");
        }
    }

    #[test]
    fn a_vectorized_finite_check_finds_the_first_bad_value() {
        let mut v = vec![1.0f32; 5000];
        assert_eq!(first_non_finite(&v), None);
        v[4097] = f32::INFINITY;
        v[4500] = f32::NAN;
        assert_eq!(first_non_finite(&v), Some(4097));
        v[3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&v), Some(3));
        assert_eq!(first_non_finite(&[f32::MAX, f32::MIN_POSITIVE, -0.0]), None);
    }

    #[test]
    fn payloads_round_trip_in_every_encoding() {
        let v = values(TOTAL);
        for (enc, tolerance) in [
            (Encoding::F32, 0.0),
            (Encoding::Bf16, 3.0 * 2f32.powi(-8)),
            (Encoding::F16, 3.0 * 2f32.powi(-11)),
            (Encoding::Int8Block { block: 16 }, 3.0 / 127.0 / 2.0),
        ] {
            let (header, body) = encode_payload(template(), &v, enc);
            let bytes = frame(&header, &body);
            assert_eq!(bytes.len(), frame_len(&header));
            let payload = read(&bytes).unwrap();
            assert_eq!(payload.header, header);
            assert_eq!(payload.values.len(), TOTAL);
            for (x, y) in v.iter().zip(&payload.values) {
                assert!((x - y).abs() <= tolerance, "{enc}: {x} -> {y}");
            }
        }
        let (header, body) = encode_payload(template(), &v, Encoding::TopK { k: 10 });
        assert_eq!(header.top_k, 10);
        let payload = read(&frame(&header, &body)).unwrap();
        assert_eq!(payload.values.iter().filter(|&&y| y != 0.0).count(), 10);
    }

    #[test]
    fn only_the_runs_encoding_and_f32_are_accepted() {
        let v = values(TOTAL);
        let f32_run = exp();
        let bf16_run = Expectation { encoding: Encoding::Bf16, ..exp() };
        let read_as = |enc: Encoding, want: &Expectation| {
            let (header, body) = encode_payload(template(), &v, enc);
            block_on(read_payload(&mut Cursor::new(frame(&header, &body)), want, SENDER))
        };
        for enc in [Encoding::Bf16, Encoding::TopK { k: 5 }, Encoding::Int8Block { block: 16 }] {
            let refusal = read_as(enc, &f32_run).unwrap_err();
            assert_eq!(refusal.reason(), "encoding_not_used", "{enc}");
            assert!(refusal.to_string().contains(&enc.to_string()), "names it: {refusal}");
        }
        assert!(read_as(Encoding::F32, &bf16_run).is_ok());
        assert!(read_as(Encoding::Bf16, &bf16_run).is_ok());
        assert_eq!(read_as(Encoding::F16, &bf16_run).unwrap_err().reason(), "encoding_not_used");
        let topk_run = Expectation { encoding: Encoding::TopK { k: 1 }, ..exp() };
        assert!(read_as(Encoding::TopK { k: 7 }, &topk_run).is_ok(), "any k of the run's top-k");
    }

    #[test]
    fn a_shard_at_the_end_of_the_vector_is_accepted() {
        let header = PayloadHeader { element_offset: 60, ..template() };
        let (header, body) = encode_payload(header, &values(40), Encoding::F32);
        assert_eq!(read(&frame(&header, &body)).unwrap().values, values(40));
        let (header, body) = encode_payload(
            PayloadHeader { element_offset: 61, ..header },
            &values(40),
            Encoding::F32,
        );
        assert_eq!(reason(&frame(&header, &body)), "wrong_length");
    }

    #[test]
    fn identity_mismatches_are_refused() {
        let frame = tampered(|h| h.run_id = "run-2".into());
        let want = Refusal::WrongRun { got: "\"run-2\"".into(), want: "run-1".into() };
        assert_eq!(read(&frame), Err(want));
        assert_eq!(reason(&tampered(|h| h.fingerprint = "fp-2".into())), "wrong_fingerprint");
        assert_eq!(reason(&tampered(|h| h.sender = b"peer-b".to_vec())), "sender_mismatch");
        let err = read(&tampered(|h| h.sender = b"peer-b".to_vec())).unwrap_err();
        assert!(err.to_string().contains("0x706565722d62"), "{err}");
        assert_eq!(reason(&tampered(|h| h.sample_weight = f64::NAN)), "bad_weight");
        assert_eq!(reason(&tampered(|h| h.sample_weight = -1.0)), "bad_weight");
    }

    #[test]
    fn lengths_out_of_range_are_refused_before_the_body_is_read() {
        for edit in [
            (|h: &mut PayloadHeader| h.element_count = 101) as fn(&mut PayloadHeader),
            |h| h.element_count = 0,
            |h| h.element_offset = 1,
            |h| h.element_offset = u64::MAX,
            |h| h.body_len += 1,
            |h| (h.element_count, h.body_len) = (1 << 40, 4 << 40),
        ] {
            let (mut header, _) = encode_payload(template(), &values(TOTAL), Encoding::F32);
            edit(&mut header);
            // No body follows: a refusal other than wrong_length (truncated)
            // would mean the receiver tried to read it.
            assert_eq!(reason(&raw_frame(&header, &[])), "wrong_length", "{header:?}");
        }
        let (mut header, body) =
            encode_payload(template(), &values(TOTAL), Encoding::TopK { k: 5 });
        header.top_k = 6;
        assert_eq!(reason(&frame(&header, &body)), "wrong_length");
    }

    #[test]
    fn non_finite_values_travel_and_are_refused_by_the_receiver() {
        let mut v = values(TOTAL);
        v[7] = f32::NAN;
        let (header, body) = encode_payload(template(), &v, Encoding::F32);
        assert_eq!(read(&frame(&header, &body)), Err(Refusal::NonFinite { index: 7 }));
        v[7] = f32::INFINITY;
        let (header, body) = encode_payload(template(), &v, Encoding::Bf16);
        assert_eq!(read(&frame(&header, &body)), Err(Refusal::NonFinite { index: 7 }));
        v[7] = f32::NAN;
        let (header, body) = encode_payload(template(), &v, Encoding::Int8Block { block: 4 });
        assert_eq!(read(&frame(&header, &body)), Err(Refusal::NonFinite { index: 4 }));
    }

    #[test]
    fn corrupt_bodies_and_headers_are_refused() {
        let (header, body) = encode_payload(template(), &values(TOTAL), Encoding::F32);
        let mut bytes = frame(&header, &body);
        *bytes.last_mut().unwrap() ^= 0x01;
        let err = read(&bytes).unwrap_err();
        assert_eq!(
            err,
            Refusal::BadChecksum {
                got: crc32c::crc32c(&bytes[bytes.len() - 400..]),
                want: header.checksum
            }
        );

        assert_eq!(read(&tampered(|h| h.encoding = 99)), Err(Refusal::UnknownEncoding(99)));
        assert_eq!(reason(&[3, 0, 0, 0, 0xff, 0xff, 0xff]), "bad_header");

        // A top-k body whose index is out of range, with a valid checksum.
        let body: Vec<u8> = [150u32.to_le_bytes(), 1f32.to_le_bytes()].concat();
        let header = seal(template(), Encoding::TopK { k: 1 }, TOTAL, &body);
        let err = read(&frame(&header, &body)).unwrap_err();
        assert_eq!(err.reason(), "malformed");
        assert!(err.to_string().contains("index 150"), "{err}");
    }

    #[test]
    fn oversize_header_is_refused_without_reading_it() {
        let bytes = (1u32 << 30).to_le_bytes();
        assert_eq!(read(&bytes), Err(Refusal::OversizeHeader { len: 1 << 30 }));
        let bytes = ((MAX_HEADER_LEN + 1) as u32).to_le_bytes();
        assert_eq!(reason(&bytes), "oversize_header");
    }

    #[test]
    fn truncated_streams_say_where_they_ended() {
        let (header, body) = encode_payload(template(), &values(TOTAL), Encoding::F32);
        let bytes = frame(&header, &body);
        let cut = bytes.len() - 1;
        let want = Refusal::Truncated { part: "body", expected: 400, got: 399 };
        assert_eq!(read(&bytes[..cut]), Err(want));
        assert_eq!(
            read(&bytes[..2]),
            Err(Refusal::Truncated { part: "length prefix", expected: 4, got: 2 })
        );
        assert_eq!(reason(&bytes[..10]), "truncated");
    }

    #[test]
    fn writer_refuses_a_header_that_does_not_describe_the_body() {
        let (header, body) = encode_payload(template(), &values(10), Encoding::F32);
        let err = block_on(write_payload(&mut Cursor::new(Vec::new()), &header, &body[1..]));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn every_reason_is_listed_once() {
        let all = [
            Refusal::OversizeHeader { len: 0 },
            Refusal::BadHeader(String::new()),
            Refusal::WrongRun { got: String::new(), want: String::new() },
            Refusal::WrongFingerprint { got: String::new(), want: String::new() },
            Refusal::SenderMismatch { claimed: String::new(), actual: String::new() },
            Refusal::UnknownEncoding(0),
            Refusal::EncodingNotUsed { got: Encoding::F16, run: Encoding::F32 },
            Refusal::BadWeight { weight: 0.0 },
            Refusal::WrongLength(String::new()),
            Refusal::BadChecksum { got: 0, want: 0 },
            Refusal::NonFinite { index: 0 },
            Refusal::Malformed(String::new()),
            Refusal::Truncated { part: "", expected: 0, got: 0 },
            Refusal::Io(String::new()),
            Refusal::TimedOut(std::time::Duration::ZERO),
        ];
        let reasons: Vec<&str> = all.iter().map(Refusal::reason).collect();
        assert_eq!(reasons, ALL_REASONS);
    }

    /// What any accepted payload must satisfy, whatever the input was.
    fn check_accepted(bytes: &[u8]) {
        if let Ok(p) = read(bytes) {
            assert!(p.values.len() <= TOTAL);
            assert_eq!(p.values.len() as u64, p.header.element_count);
            assert!(p.header.element_offset + p.header.element_count <= TOTAL as u64);
            assert!(p.values.iter().all(|x| x.is_finite()));
        }
    }

    fn any_encoding() -> impl Strategy<Value = Encoding> {
        prop_oneof![
            Just(Encoding::F32),
            Just(Encoding::Bf16),
            Just(Encoding::F16),
            (1u32..40).prop_map(|block| Encoding::Int8Block { block }),
            (1u32..40).prop_map(|k| Encoding::TopK { k }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_accepted(&bytes);
            // The same bytes behind a plausible length prefix reach the decoder.
            let len = (bytes.len() as u32 / 2).to_le_bytes();
            check_accepted(&[&len[..], &bytes].concat());
        }

        #[test]
        fn arbitrary_headers_with_consistent_checksums_never_panic(
            encoding in 0i32..7,
            (block_size, top_k) in (0u32..300, 0u32..130),
            (element_offset, element_count) in (0u64..120, 0u64..120),
            exact in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..1200),
        ) {
            let header = PayloadHeader {
                encoding, block_size, top_k, element_offset, element_count, ..template()
            };
            // Half the time the exact length the header implies, so the
            // decoders run on arbitrary bodies.
            let body_len = encoding::from_proto(encoding, block_size, top_k)
                .ok()
                .and_then(|e| e.body_len(element_count as usize))
                .filter(|_| exact)
                .unwrap_or(body.len());
            let body = &body[..body_len.min(body.len())];
            let header = PayloadHeader {
                body_len: body_len as u64, checksum: crc32c::crc32c(body), ..header
            };
            let bytes = raw_frame(&header, body);
            check_accepted(&bytes);
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            enc in any_encoding(),
            n in 1usize..=TOTAL,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let (header, body) = encode_payload(template(), &values(n), enc);
            let mut bytes = frame(&header, &body);
            if flips.is_empty() && cut.is_none() {
                prop_assert!(read(&bytes).is_ok());
            }
            for (at, x) in flips {
                let at = at % bytes.len();
                bytes[at] ^= x;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            check_accepted(&bytes);
        }
    }
}
