//! How a vector of f32 values travels: the body layouts of `f32`, `bf16`,
//! `f16`, blockwise `int8` and `top-k`, their exact byte lengths, and the
//! sender-side error feedback that makes top-k converge.
//!
//! This module is pure: bytes in, values out. It owns no framing, checksum
//! or peer checks (that is `wire`). Every body is little-endian.
//!
//! Layouts for `n` elements and their error bounds (all tested below):
//! - `f32`: `n` f32. Exact, bit for bit (NaN payloads included).
//! - `bf16`, `f16`: `n` u16, rounded to nearest even. Relative error at most
//!   2^-8 (bf16) and 2^-11 (f16, normal range 2^-14 ..= 65504). Finite values
//!   beyond the format's range saturate to its largest finite value
//!   (±65504 for f16) rather than become infinities, so one large weight
//!   cannot get a whole payload refused; ±inf and NaN stay what they are and
//!   the receiver refuses them.
//! - `int8:B`: `ceil(n/B)` f32 scales, then `n` i8. Per block,
//!   `scale = max|x| / 127` and `q = round(x / scale)` in `[-127, 127]`, so
//!   `|x - q·scale| <= scale/2` (normal-range scales). A block holding NaN or
//!   ±inf gets a non-finite scale, which the receiver refuses.
//! - `topk:K`: `K` ascending u32 indices, then their `K` f32 values. Kept
//!   entries are exact, the others decode to 0. Plain top-k keeps the `K`
//!   largest `|x|`, ties to the lower index; `ErrorFeedback` adds what was
//!   left out last time before choosing.
//!
//! `decode` checks the body length against `Encoding::body_len` before it
//! allocates anything, so the output is never larger than `element_count`.

use std::fmt;
use std::str::FromStr;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use murmur_proto::wire::v1::Encoding as ProtoEncoding;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// Bodies are the in-memory bytes of the host's floats; murmur targets
// little-endian hosts only (x86_64, aarch64).
const _: () =
    assert!(cfg!(target_endian = "little"), "murmur's wire format needs a little-endian host");

/// Block size of `int8` when none is given.
pub const DEFAULT_INT8_BLOCK: u32 = 256;

/// Values converted at a time through a stack buffer (half-precision paths).
const CHUNK: usize = 1024;

/// How a vector of f32 values travels. Parses from and prints as `f32`,
/// `bf16`, `f16`, `int8` (block 256), `int8:BLOCK` or `topk:K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    F32,
    Bf16,
    F16,
    Int8Block { block: u32 },
    TopK { k: u32 },
}

/// Why an encoding could not be parsed or a body could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    BadSpec(String),
    #[error("unknown encoding {0}")]
    Unknown(i32),
    #[error(
        "a {encoding} body of {element_count} elements takes {} bytes, got {got}",
        want.map_or_else(|| "no valid number of".to_string(), |w| w.to_string())
    )]
    Length { encoding: Encoding, element_count: usize, want: Option<usize>, got: usize },
    #[error(
        "int8 block starting at element {index} has scale {scale}; scales must be finite and >= 0"
    )]
    BadScale { index: usize, scale: f32 },
    #[error("int8 value -128 at element {index}; values must lie in [-127, 127]")]
    Int8OutOfRange { index: usize },
    #[error(
        "top-k index {index} at position {position} is out of range for {element_count} elements"
    )]
    BadIndex { position: usize, index: u32, element_count: usize },
    #[error(
        "top-k index {index} at position {position} does not follow {previous}; indices must ascend"
    )]
    NotAscending { position: usize, index: u32, previous: u32 },
}

impl Encoding {
    /// Exact body length in bytes for `element_count` values; `None` when the
    /// encoding cannot carry that many (overflow, block 0, `k > n`, or more
    /// elements than a u32 index can address).
    pub fn body_len(&self, element_count: usize) -> Option<usize> {
        let n = element_count;
        match *self {
            Encoding::F32 => n.checked_mul(4),
            Encoding::Bf16 | Encoding::F16 => n.checked_mul(2),
            Encoding::Int8Block { block: 0 } => None,
            Encoding::Int8Block { block } => {
                n.div_ceil(block as usize).checked_mul(4)?.checked_add(n)
            }
            Encoding::TopK { k } => {
                let addressable = u32::try_from(n.saturating_sub(1)).is_ok();
                if k as usize > n || !addressable { None } else { (k as usize).checked_mul(8) }
            }
        }
    }

    /// The encoding a sender actually uses for `element_count` values: top-k
    /// never keeps more than there are, int8 block 0 means the default.
    pub fn fit(self, element_count: usize) -> Encoding {
        match self {
            Encoding::Int8Block { block: 0 } => Encoding::Int8Block { block: DEFAULT_INT8_BLOCK },
            Encoding::TopK { k } => {
                Encoding::TopK { k: k.min(u32::try_from(element_count).unwrap_or(u32::MAX)) }
            }
            other => other,
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encoding::F32 => f.write_str("f32"),
            Encoding::Bf16 => f.write_str("bf16"),
            Encoding::F16 => f.write_str("f16"),
            Encoding::Int8Block { block: DEFAULT_INT8_BLOCK } => f.write_str("int8"),
            Encoding::Int8Block { block } => write!(f, "int8:{block}"),
            Encoding::TopK { k } => write!(f, "topk:{k}"),
        }
    }
}

impl FromStr for Encoding {
    type Err = DecodeError;

    fn from_str(s: &str) -> Result<Encoding, DecodeError> {
        let bad = |why: &str| {
            DecodeError::BadSpec(format!(
                "bad encoding `{s}`: {why}; use f32, bf16, f16, int8, int8:BLOCK or topk:K"
            ))
        };
        let positive = |arg: &str| match arg.trim().parse::<u32>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(bad(&format!("`{arg}` is not a positive integer"))),
        };
        let lower = s.trim().to_ascii_lowercase();
        let (name, arg) = match lower.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (lower.as_str(), None),
        };
        match (name, arg) {
            ("f32", None) => Ok(Encoding::F32),
            ("bf16", None) => Ok(Encoding::Bf16),
            ("f16", None) => Ok(Encoding::F16),
            ("int8", None) => Ok(Encoding::Int8Block { block: DEFAULT_INT8_BLOCK }),
            ("int8", Some(b)) => Ok(Encoding::Int8Block { block: positive(b)? }),
            ("topk", Some(k)) => Ok(Encoding::TopK { k: positive(k)? }),
            ("topk", None) => Err(bad("top-k needs a count, e.g. topk:1000")),
            _ => Err(bad("unknown name or unexpected parameter")),
        }
    }
}

impl Serialize for Encoding {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Encoding {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Encoding, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The header fields for `enc`: (encoding, block_size, top_k).
pub fn to_proto(enc: Encoding) -> (ProtoEncoding, u32, u32) {
    match enc {
        Encoding::F32 => (ProtoEncoding::F32, 0, 0),
        Encoding::Bf16 => (ProtoEncoding::Bf16, 0, 0),
        Encoding::F16 => (ProtoEncoding::F16, 0, 0),
        Encoding::Int8Block { block } => (ProtoEncoding::Int8Block, block, 0),
        Encoding::TopK { k } => (ProtoEncoding::Topk, 0, k),
    }
}

/// The encoding a header names. Parameters of other encodings are ignored.
pub fn from_proto(encoding: i32, block_size: u32, top_k: u32) -> Result<Encoding, DecodeError> {
    match ProtoEncoding::try_from(encoding) {
        Ok(ProtoEncoding::F32) => Ok(Encoding::F32),
        Ok(ProtoEncoding::Bf16) => Ok(Encoding::Bf16),
        Ok(ProtoEncoding::F16) => Ok(Encoding::F16),
        Ok(ProtoEncoding::Int8Block) if block_size == 0 => {
            Err(DecodeError::BadSpec("int8 payload with block_size 0".into()))
        }
        Ok(ProtoEncoding::Int8Block) => Ok(Encoding::Int8Block { block: block_size }),
        Ok(ProtoEncoding::Topk) if top_k == 0 => {
            Err(DecodeError::BadSpec("top-k payload with top_k 0".into()))
        }
        Ok(ProtoEncoding::Topk) => Ok(Encoding::TopK { k: top_k }),
        Ok(ProtoEncoding::Unspecified) | Err(_) => Err(DecodeError::Unknown(encoding)),
    }
}

/// Encodes `values` as `enc.fit(values.len())` (the header must say the
/// same; `wire::seal` does). Never fails: non-finite values are carried
/// as they are and left for the receiver to refuse.
pub fn encode(values: &[f32], enc: Encoding) -> Vec<u8> {
    match enc.fit(values.len()) {
        Encoding::F32 => bytemuck::cast_slice(values).to_vec(),
        Encoding::Bf16 => encode_half::<bf16>(values, bf16::MAX.to_f32()),
        Encoding::F16 => encode_half::<f16>(values, f16::MAX.to_f32()),
        Encoding::Int8Block { block } => encode_int8(values, block as usize),
        Encoding::TopK { k } => topk_body(values, &top_k_indices(values, k as usize)),
    }
}

/// What `values` become after travelling in `enc`: what a receiver
/// decodes. A sender that wants to know its own rounding (error feedback,
/// an all-reduce owner keeping what it sends) uses this.
pub fn round_trip(values: &[f32], enc: Encoding) -> Vec<f32> {
    let fitted = enc.fit(values.len());
    if fitted == Encoding::F32 || values.is_empty() {
        return values.to_vec();
    }
    let body = encode(values, fitted);
    let mut out = vec![0.0; values.len()];
    // A body we just encoded always has the length it decodes from.
    if decode_into(&body, fitted, &mut out).is_err() {
        return values.to_vec();
    }
    out
}

/// Decodes a body of `element_count` values. The length is checked first,
/// so nothing is allocated for a body that does not match.
pub fn decode(body: &[u8], enc: Encoding, element_count: usize) -> Result<Vec<f32>, DecodeError> {
    check_len(body, enc, element_count)?;
    let mut out = super::hugepages::zeroed_f32(element_count);
    decode_into(body, enc, &mut out)?;
    Ok(out)
}

/// Decodes a body into `out` (`out.len()` is the element count) without
/// allocating. On error `out` holds partial results and must be discarded.
pub fn decode_into(body: &[u8], enc: Encoding, out: &mut [f32]) -> Result<(), DecodeError> {
    check_len(body, enc, out.len())?;
    match enc {
        Encoding::F32 => bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(body),
        Encoding::Bf16 | Encoding::F16 => {
            decode_half_words(body, enc, out);
        }
        Encoding::Int8Block { block } => decode_int8(body, block as usize, out)?,
        Encoding::TopK { k } => decode_topk(body, k as usize, out)?,
    }
    Ok(())
}

fn check_len(body: &[u8], encoding: Encoding, element_count: usize) -> Result<(), DecodeError> {
    let want = encoding.body_len(element_count);
    if want == Some(body.len()) {
        Ok(())
    } else {
        Err(DecodeError::Length { encoding, element_count, want, got: body.len() })
    }
}

fn encode_half<H>(values: &[f32], max: f32) -> Vec<u8>
where
    H: bytemuck::Pod,
    [H]: HalfFloatSliceExt,
{
    let mut out = Vec::with_capacity(values.len() * 2);
    let (mut wide, mut narrow) = ([0f32; CHUNK], [H::zeroed(); CHUNK]);
    for chunk in values.chunks(CHUNK) {
        let (wide, narrow) = (&mut wide[..chunk.len()], &mut narrow[..chunk.len()]);
        for (w, &x) in wide.iter_mut().zip(chunk) {
            *w = if x.is_finite() { x.clamp(-max, max) } else { x };
        }
        narrow.convert_from_f32_slice(wide);
        out.extend_from_slice(bytemuck::cast_slice(narrow));
    }
    out
}

/// Decodes the whole little-endian words of a `bf16` or `f16` body into
/// `out`, one value per word, and returns the index of the first value that
/// is not finite. Both conversions are exact, so that is the word's own
/// exponent being all ones, checked as the words go by: a receiver reading
/// a body piece by piece decodes and checks each piece while it is in cache.
pub fn decode_half_words(words: &[u8], half: Encoding, out: &mut [f32]) -> Option<usize> {
    debug_assert_eq!(words.len(), out.len() * 2);
    if half == Encoding::Bf16 {
        return match super::widen::bf16_to_f32(words, out) {
            true => super::widen::first_non_finite(words),
            false => None,
        };
    }
    let mut first_bad = None;
    let mut narrow = [f16::ZERO; CHUNK];
    for (c, (bytes, dst)) in words.chunks(CHUNK * 2).zip(out.chunks_mut(CHUNK)).enumerate() {
        let narrow = &mut narrow[..dst.len()];
        let mut bad = 0u16;
        for (n, w) in narrow.iter_mut().zip(bytes.chunks_exact(2)) {
            let w = u16::from_le_bytes([w[0], w[1]]);
            bad |= u16::from(w & 0x7c00 == 0x7c00);
            *n = f16::from_bits(w);
        }
        narrow.convert_to_f32_slice(dst);
        if bad != 0 && first_bad.is_none() {
            first_bad = dst.iter().position(|x| !x.is_finite()).map(|i| c * CHUNK + i);
        }
    }
    first_bad
}

/// `max|x| / 127`, or NaN when the block holds a NaN.
fn block_scale(block: &[f32]) -> f32 {
    let mut max = 0f32;
    for x in block {
        if x.is_nan() {
            return f32::NAN;
        }
        max = max.max(x.abs());
    }
    max / 127.0
}

fn encode_int8(values: &[f32], block: usize) -> Vec<u8> {
    let blocks = values.len().div_ceil(block);
    let mut out = Vec::with_capacity(blocks * 4 + values.len());
    let scales: Vec<f32> = values.chunks(block).map(block_scale).collect();
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for (chunk, &s) in values.chunks(block).zip(&scales) {
        let usable = s.is_finite() && s > 0.0;
        out.extend(chunk.iter().map(|&x| {
            let q = if usable { (x / s).round().clamp(-127.0, 127.0) } else { 0.0 };
            q as i8 as u8
        }));
    }
    out
}

fn decode_int8(body: &[u8], block: usize, out: &mut [f32]) -> Result<(), DecodeError> {
    let (scales, qs) = body.split_at(out.len().div_ceil(block) * 4);
    let blocks = scales.chunks_exact(4).zip(qs.chunks(block).zip(out.chunks_mut(block)));
    for (b, (s, (qs, dst))) in blocks.enumerate() {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(DecodeError::BadScale { index: b * block, scale });
        }
        for (i, (&q, d)) in qs.iter().zip(dst).enumerate() {
            if q as i8 == i8::MIN {
                return Err(DecodeError::Int8OutOfRange { index: b * block + i });
            }
            *d = f32::from(q as i8) * scale;
        }
    }
    Ok(())
}

/// Indices of the `k` largest `|x|` (NaN counts as largest, so it is sent
/// and refused rather than hidden), ties to the lower index, ascending.
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let n = values.len().min(u32::MAX as usize);
    let mut idx: Vec<u32> = (0..n as u32).collect();
    if k < n {
        let mag = |i: u32| values[i as usize].abs();
        idx.select_nth_unstable_by(k, |&a, &b| mag(b).total_cmp(&mag(a)).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

fn topk_body(values: &[f32], idx: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(idx.len() * 8);
    out.extend(idx.iter().flat_map(|i| i.to_le_bytes()));
    out.extend(idx.iter().flat_map(|&i| values[i as usize].to_le_bytes()));
    out
}

fn decode_topk(body: &[u8], k: usize, out: &mut [f32]) -> Result<(), DecodeError> {
    out.fill(0.0);
    let element_count = out.len();
    let (indices, values) = body.split_at(k * 4);
    let mut previous: Option<u32> = None;
    for (position, (i, v)) in indices.chunks_exact(4).zip(values.chunks_exact(4)).enumerate() {
        let index = u32::from_le_bytes([i[0], i[1], i[2], i[3]]);
        if let Some(previous) = previous.filter(|&p| index <= p) {
            return Err(DecodeError::NotAscending { position, index, previous });
        }
        let Some(slot) = out.get_mut(index as usize) else {
            return Err(DecodeError::BadIndex { position, index, element_count });
        };
        *slot = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        previous = Some(index);
    }
    Ok(())
}

/// Sender-side memory for top-k, one per destination or stream: what was
/// not sent is added to the next vector before choosing, so over rounds the
/// sum of what was sent plus `residual()` equals the sum of the inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    pub fn new(len: usize) -> ErrorFeedback {
        ErrorFeedback { residual: vec![0.0; len] }
    }

    /// What has been left out so far.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Encodes the top `k` of `values + residual` as
    /// `Encoding::TopK { k }.fit(values.len())` and keeps the rest. A vector
    /// of a different length than before starts from a zero residual.
    pub fn compress(&mut self, values: &[f32], k: u32) -> Vec<u8> {
        if self.residual.len() != values.len() {
            self.residual = vec![0.0; values.len()];
        }
        for (r, v) in self.residual.iter_mut().zip(values) {
            *r += v;
        }
        let idx = top_k_indices(&self.residual, k as usize);
        let body = topk_body(&self.residual, &idx);
        for &i in &idx {
            self.residual[i as usize] = 0.0;
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
    }

    /// Values spread over many binades: sign * 2^e * mantissa.
    fn wide_range(n: usize, seed: u64, min_exp: i32, max_exp: i32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let e = rng.random_range(min_exp..max_exp);
                let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                sign * 2f32.powi(e) * rng.random_range(1.0f32..2.0)
            })
            .collect()
    }

    fn round_trip(values: &[f32], enc: Encoding) -> Vec<f32> {
        let body = encode(values, enc);
        assert_eq!(Some(body.len()), enc.fit(values.len()).body_len(values.len()), "{enc}");
        let decoded = decode(&body, enc.fit(values.len()), values.len()).unwrap();
        assert_eq!(
            bytemuck::cast_slice::<f32, u32>(&decoded),
            bytemuck::cast_slice::<f32, u32>(&super::round_trip(values, enc)),
            "{enc}: the public round trip decodes the same"
        );
        decoded
    }

    #[test]
    fn body_lengths_are_exact() {
        assert_eq!(Encoding::F32.body_len(10), Some(40));
        assert_eq!(Encoding::Bf16.body_len(10), Some(20));
        assert_eq!(Encoding::F16.body_len(10), Some(20));
        assert_eq!(Encoding::Int8Block { block: 4 }.body_len(10), Some(3 * 4 + 10));
        assert_eq!(Encoding::Int8Block { block: 4 }.body_len(8), Some(2 * 4 + 8));
        assert_eq!(Encoding::Int8Block { block: 0 }.body_len(8), None);
        assert_eq!(Encoding::TopK { k: 3 }.body_len(10), Some(24));
        assert_eq!(Encoding::TopK { k: 11 }.body_len(10), None);
        assert_eq!(Encoding::F32.body_len(usize::MAX), None);
        assert_eq!(Encoding::Int8Block { block: 1 }.body_len(usize::MAX), None);
    }

    #[test]
    fn f32_is_bit_exact() {
        let mut values = wide_range(1000, 1, -140, 127);
        values.extend([0.0, -0.0, f32::MIN_POSITIVE / 3.0, f32::from_bits(0x7fc0_1234)]);
        let back = round_trip(&values, Encoding::F32);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&values));
    }

    #[test]
    fn bf16_relative_error_at_most_2_pow_minus_8() {
        let values = wide_range(5000, 2, -120, 120);
        let back = round_trip(&values, Encoding::Bf16);
        for (x, y) in values.iter().zip(&back) {
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-8), "{x} -> {y}");
        }
        // Round to nearest even, not truncation: halfway rounds to the even
        // neighbour, just above halfway rounds up.
        let h = 2f32.powi(-8);
        let back = round_trip(&[1.0 + h, 1.0 + 3.0 * h, 1.0 + h * 1.5], Encoding::Bf16);
        assert_eq!(back, vec![1.0, 1.0 + 4.0 * h, 1.0 + 2.0 * h]);
    }

    #[test]
    fn half_words_decode_and_point_at_the_first_non_finite_value() {
        for enc in [Encoding::Bf16, Encoding::F16] {
            let mut values = random(3000, 9, 1.0);
            let clean = encode(&values, enc);
            let mut out = vec![0f32; values.len()];
            assert_eq!(decode_half_words(&clean, enc, &mut out), None);
            let reference: Vec<f32> = clean
                .chunks_exact(2)
                .map(|w| u16::from_le_bytes([w[0], w[1]]))
                .map(|w| match enc {
                    Encoding::Bf16 => bf16::from_bits(w).to_f32(),
                    _ => f16::from_bits(w).to_f32(),
                })
                .collect();
            assert_eq!(out, reference, "{enc}");
            values[2500] = f32::NEG_INFINITY;
            values[2900] = f32::NAN;
            let dirty = encode(&values, enc);
            assert_eq!(decode_half_words(&dirty, enc, &mut out), Some(2500), "{enc}");
            assert_eq!(decode_half_words(&dirty[..2400 * 2], enc, &mut out[..2400]), None);
        }
    }

    #[test]
    fn f16_relative_error_at_most_2_pow_minus_11_in_normal_range() {
        let values = wide_range(5000, 3, -14, 15);
        let back = round_trip(&values, Encoding::F16);
        for (x, y) in values.iter().zip(&back) {
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-11), "{x} -> {y}");
        }
        let h = 2f32.powi(-11);
        assert_eq!(round_trip(&[1.0 + h, 1.0 + 3.0 * h], Encoding::F16), vec![1.0, 1.0 + 4.0 * h]);
    }

    #[test]
    fn half_formats_saturate_finite_overflow_and_keep_non_finite() {
        let back = round_trip(&[70000.0, -1e9, 65519.0, f32::INFINITY, f32::NAN], Encoding::F16);
        assert_eq!(&back[..4], &[65504.0, -65504.0, 65504.0, f32::INFINITY]);
        assert!(back[4].is_nan());
        let back = round_trip(&[f32::MAX, f32::MIN, f32::NEG_INFINITY], Encoding::Bf16);
        let max = bf16::MAX.to_f32();
        assert_eq!(back, vec![max, -max, f32::NEG_INFINITY]);
    }

    #[test]
    fn int8_error_at_most_half_a_scale_per_block() {
        let block = 64;
        // 1000 is not a multiple of 64: the last block is short. Blocks get
        // different magnitudes so a shared scale would break the bound.
        let mut values = random(1000, 4, 1.0);
        for (b, chunk) in values.chunks_mut(block).enumerate() {
            chunk.iter_mut().for_each(|x| *x *= 10f32.powi(b as i32 % 7 - 3));
        }
        values[200..264].fill(0.0);
        let back = round_trip(&values, Encoding::Int8Block { block: block as u32 });
        for (chunk, got) in values.chunks(block).zip(back.chunks(block)) {
            let scale = chunk.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in chunk.iter().zip(got) {
                assert!((x - y).abs() <= scale / 2.0 * (1.0 + 1e-6), "{x} -> {y}, scale {scale}");
            }
        }
        assert!(back[200..264].iter().all(|&y| y == 0.0));
    }

    #[test]
    fn int8_body_layout_is_scales_then_values() {
        let body = encode(&[127.0, -63.5, 0.0, 254.0], Encoding::Int8Block { block: 2 });
        assert_eq!(&body[0..4], &1.0f32.to_le_bytes());
        assert_eq!(&body[4..8], &2.0f32.to_le_bytes());
        // -63.5 rounds half away from zero to -64.
        assert_eq!(&body[8..], &[127, (-64i8) as u8, 0, 127]);
    }

    #[test]
    fn int8_refuses_bad_scales_and_minus_128() {
        let enc = Encoding::Int8Block { block: 2 };
        let mut body = encode(&[1.0, 2.0, 3.0, 4.0], enc);
        for (scale, want_ok) in
            [(-1.0f32, false), (f32::NAN, false), (f32::INFINITY, false), (0.0, true)]
        {
            body[4..8].copy_from_slice(&scale.to_le_bytes());
            let got = decode(&body, enc, 4);
            assert_eq!(got.is_ok(), want_ok, "scale {scale}");
            if let Err(e) = got {
                assert!(matches!(e, DecodeError::BadScale { index: 2, .. }), "{e}");
            }
        }
        body[4..8].copy_from_slice(&1.0f32.to_le_bytes());
        body[11] = 0x80;
        assert_eq!(decode(&body, enc, 4), Err(DecodeError::Int8OutOfRange { index: 3 }));
        // A NaN poisons its block's scale, so the receiver refuses it.
        let body = encode(&[1.0, 2.0, f32::NAN, 4.0], enc);
        assert!(matches!(decode(&body, enc, 4), Err(DecodeError::BadScale { index: 2, .. })));
    }

    #[test]
    fn topk_keeps_largest_exactly_and_zeroes_the_rest() {
        let values = random(1000, 5, 1.0);
        let back = round_trip(&values, Encoding::TopK { k: 100 });
        let mut mags: Vec<f32> = values.iter().map(|x| x.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a));
        let threshold = mags[99];
        let kept = back.iter().filter(|&&y| y != 0.0).count();
        assert_eq!(kept, 100);
        for (x, y) in values.iter().zip(&back) {
            if x.abs() >= threshold {
                assert_eq!(x, y);
            } else {
                assert_eq!(*y, 0.0);
            }
        }
    }

    #[test]
    fn topk_ties_go_to_the_lower_index_and_indices_ascend() {
        let body = encode(&[0.5, 1.0, -1.0, 1.0, 0.25], Encoding::TopK { k: 2 });
        let want: Vec<u8> = [1u32.to_le_bytes(), 2u32.to_le_bytes()]
            .into_iter()
            .chain([1.0f32.to_le_bytes(), (-1.0f32).to_le_bytes()])
            .flatten()
            .collect();
        assert_eq!(body, want);
        // k larger than the vector: everything is sent, with k = n.
        assert_eq!(Encoding::TopK { k: 9 }.fit(3), Encoding::TopK { k: 3 });
        assert_eq!(round_trip(&[3.0, -2.0, 1.0], Encoding::TopK { k: 9 }), vec![3.0, -2.0, 1.0]);
    }

    #[test]
    fn topk_refuses_bad_indices() {
        let enc = Encoding::TopK { k: 2 };
        let body = |a: u32, b: u32| -> Vec<u8> {
            [a.to_le_bytes(), b.to_le_bytes(), 1f32.to_le_bytes(), 2f32.to_le_bytes()].concat()
        };
        assert_eq!(decode(&body(1, 3), enc, 4).unwrap(), vec![0.0, 1.0, 0.0, 2.0]);
        assert_eq!(
            decode(&body(1, 4), enc, 4),
            Err(DecodeError::BadIndex { position: 1, index: 4, element_count: 4 })
        );
        assert_eq!(
            decode(&body(2, 2), enc, 4),
            Err(DecodeError::NotAscending { position: 1, index: 2, previous: 2 })
        );
        assert_eq!(
            decode(&body(3, 1), enc, 4),
            Err(DecodeError::NotAscending { position: 1, index: 1, previous: 3 })
        );
    }

    #[test]
    fn decode_checks_length_before_allocating() {
        // Allocating usize::MAX values first would abort the test process.
        let err = decode(&[], Encoding::F32, usize::MAX).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Length {
                encoding: Encoding::F32,
                element_count: usize::MAX,
                want: None,
                got: 0
            }
        );
        let err = decode(&[0; 7], Encoding::Bf16, 4).unwrap_err();
        assert_eq!(err.to_string(), "a bf16 body of 4 elements takes 8 bytes, got 7");
    }

    #[test]
    fn names_parse_print_and_serialize() {
        for (text, enc) in [
            ("f32", Encoding::F32),
            ("bf16", Encoding::Bf16),
            ("f16", Encoding::F16),
            ("int8", Encoding::Int8Block { block: 256 }),
            ("int8:64", Encoding::Int8Block { block: 64 }),
            ("topk:1000", Encoding::TopK { k: 1000 }),
        ] {
            assert_eq!(text.parse::<Encoding>().unwrap(), enc);
            assert_eq!(enc.to_string(), text);
            let json = serde_json::to_string(&enc).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Encoding>(&json).unwrap(), enc);
        }
        assert_eq!("INT8:256".parse::<Encoding>().unwrap(), Encoding::Int8Block { block: 256 });
        for bad in ["f64", "int8:0", "topk", "topk:-3", "topk:x", "f32:2"] {
            let err = bad.parse::<Encoding>().unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
        assert!(serde_json::from_str::<Encoding>("\"int9\"").is_err());
    }

    #[test]
    fn proto_round_trip_and_unknown_values() {
        for enc in [
            Encoding::F32,
            Encoding::Bf16,
            Encoding::F16,
            Encoding::Int8Block { block: 32 },
            Encoding::TopK { k: 7 },
        ] {
            let (e, block, k) = to_proto(enc);
            assert_eq!(from_proto(e as i32, block, k), Ok(enc));
        }
        assert_eq!(from_proto(99, 0, 0).unwrap_err().to_string(), "unknown encoding 99");
        assert_eq!(from_proto(0, 0, 0).unwrap_err().to_string(), "unknown encoding 0");
        assert!(from_proto(ProtoEncoding::Int8Block as i32, 0, 0).is_err());
        assert!(from_proto(ProtoEncoding::Topk as i32, 0, 0).is_err());
    }

    /// Relative L2 distance between two sums.
    fn rel_err(got: &[f64], want: &[f64]) -> f64 {
        let d: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
        let n: f64 = want.iter().map(|w| w.powi(2)).sum();
        (d / n).sqrt()
    }

    #[test]
    fn error_feedback_conserves_the_sum_plain_top_k_does_not() {
        let (n, k, rounds) = (500, 10u32, 200);
        // Inputs with a steady per-coordinate drift under round-to-round
        // noise: plain top-k chases the noise and never sends most drifts.
        let drift = random(n, 6, 0.2);
        let mut feedback = ErrorFeedback::new(n);
        let (mut inputs, mut sent_fb, mut sent_plain) =
            (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        for round in 0..rounds {
            let noise = random(n, 1000 + round, 1.0);
            let x: Vec<f32> = drift.iter().zip(&noise).map(|(d, e)| d + e).collect();
            let fb = decode(&feedback.compress(&x, k), Encoding::TopK { k }, n).unwrap();
            let plain = round_trip(&x, Encoding::TopK { k });
            for i in 0..n {
                inputs[i] += f64::from(x[i]);
                sent_fb[i] += f64::from(fb[i]);
                sent_plain[i] += f64::from(plain[i]);
            }
        }
        // Conservation: sent + residual == inputs, up to f32 rounding.
        let residual = feedback.residual();
        for i in 0..n {
            let gap = (sent_fb[i] + f64::from(residual[i]) - inputs[i]).abs();
            assert!(gap <= 1e-3 * (1.0 + inputs[i].abs()), "coordinate {i}: gap {gap}");
        }
        // Bounded residual: what is still owed stays small next to the sum.
        let max_residual = residual.iter().fold(0f32, |m, r| m.max(r.abs()));
        let max_input = inputs.iter().fold(0f64, |m, s| m.max(s.abs()));
        let (fb_err, plain_err) = (rel_err(&sent_fb, &inputs), rel_err(&sent_plain, &inputs));
        assert!(f64::from(max_residual) < 0.15 * max_input, "{max_residual} vs {max_input}");
        // Measured: feedback 0.099, plain 0.77 (2% of coordinates per round).
        assert!(fb_err < 0.15, "feedback error {fb_err}");
        assert!(plain_err > 0.6, "plain top-k error {plain_err}");
    }
}
