//! bf16 words widened to f32, for the receiver's decode.
//!
//! Widening is a shift, but the output is a model-sized buffer that is not
//! in cache, and ordinary stores read every line of it before writing it.
//! On x86_64 the main loop therefore writes with non-temporal stores, which
//! skip that read: 16.8M values went from 11.5 ms to 5 ms here, and decode
//! had been the largest part (about a quarter) of a bf16 receiver's CPU time
//! (scripts/bench_transfer.py). The values are read next by the mixer,
//! from memory either way at this size. Other targets use the plain loop.

/// Exponent bits of a bf16 word: all ones is infinity or NaN.
const EXPONENT: u16 = 0x7f80;

fn word(w: &[u8]) -> u16 {
    u16::from_le_bytes([w[0], w[1]])
}

/// Widens `words` (little-endian bf16, two bytes per value) into `out`
/// (`out.len() == words.len() / 2`; extra on either side is left alone) and
/// says whether any word was not finite.
pub fn bf16_to_f32(words: &[u8], out: &mut [f32]) -> bool {
    let n = out.len().min(words.len() / 2);
    let (words, out) = (&words[..2 * n], &mut out[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        streaming::bf16_to_f32(words, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        plain(words, out)
    }
}

/// The portable loop (it vectorizes, with ordinary stores).
fn plain(words: &[u8], out: &mut [f32]) -> bool {
    let mut bad = 0u16;
    for (o, w) in out.iter_mut().zip(words.chunks_exact(2)) {
        let w = word(w);
        bad |= u16::from(w & EXPONENT == EXPONENT);
        *o = f32::from_bits(u32::from(w) << 16);
    }
    bad != 0
}

/// The index of the first word that is not finite.
pub fn first_non_finite(words: &[u8]) -> Option<usize> {
    words.chunks_exact(2).position(|w| word(w) & EXPONENT == EXPONENT)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod streaming {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi16, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi16, _mm_setzero_si128, _mm_sfence, _mm_stream_si128, _mm_unpackhi_epi16,
        _mm_unpacklo_epi16,
    };

    /// Values per step: one 16-byte load of 8 words, two 16-byte stores.
    const STEP: usize = 8;

    /// `super::bf16_to_f32` for equal-length `words` and `out`: the plain
    /// loop up to the first 16-byte aligned value and after the last whole
    /// step, streaming stores between.
    pub fn bf16_to_f32(words: &[u8], out: &mut [f32]) -> bool {
        assert_eq!(words.len(), 2 * out.len(), "a word per value");
        let lead = out.as_ptr().align_offset(16).min(out.len());
        let body = (out.len() - lead) / STEP * STEP;
        let (head, rest) = out.split_at_mut(lead);
        let (body_out, tail) = rest.split_at_mut(body);
        let (head_w, rest_w) = words.split_at(2 * lead);
        let (body_w, tail_w) = rest_w.split_at(2 * body);
        let mut bad = super::plain(head_w, head);
        // SAFETY: SSE2 is part of every x86_64 CPU (it is in the target's
        // baseline), which is all `aligned_steps`' target feature asks for.
        bad |= unsafe { aligned_steps(body_w, body_out) };
        bad | super::plain(tail_w, tail)
    }

    /// Widens whole steps into a 16-byte aligned `out`.
    #[target_feature(enable = "sse2")]
    fn aligned_steps(words: &[u8], out: &mut [f32]) -> bool {
        assert!(words.len() == 2 * out.len() && out.len().is_multiple_of(STEP));
        assert!(out.as_ptr().align_offset(16) == 0 || out.is_empty());
        let mask = _mm_set1_epi16(super::EXPONENT as i16);
        let zero = _mm_setzero_si128();
        let mut seen = zero;
        for i in (0..out.len()).step_by(STEP) {
            // SAFETY: the asserts above
            // give words.len() == 2 * out.len() and out.len() a multiple of
            // STEP, so for i + STEP <= out.len() the unaligned load reads
            // words[2i..2i + 16] and the two stores write out[i..i + 4] and
            // out[i + 4..i + 8], all in bounds; out starts 16-byte aligned
            // and i is a multiple of 4 values (16 bytes), as _mm_stream_si128
            // requires.
            unsafe {
                let w = _mm_loadu_si128(words.as_ptr().add(2 * i).cast::<__m128i>());
                seen = _mm_or_si128(seen, _mm_cmpeq_epi16(_mm_and_si128(w, mask), mask));
                let dst = out.as_mut_ptr().add(i).cast::<__m128i>();
                _mm_stream_si128(dst, _mm_unpacklo_epi16(zero, w));
                _mm_stream_si128(dst.add(1), _mm_unpackhi_epi16(zero, w));
            }
        }
        // Streaming stores are weakly ordered: fence them before anyone,
        // this thread's later code or another thread, reads the values.
        _mm_sfence();
        _mm_movemask_epi8(seen) != 0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Every length and alignment, finite or not: the same values and the
        /// same verdict as the plain loop.
        #[test]
        fn streaming_matches_the_plain_loop(
            words in proptest::collection::vec(any::<u16>(), 0..200),
            offset in 0usize..8,
        ) {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut want = vec![0f32; words.len()];
            let want_bad = plain(&bytes, &mut want);
            let mut buf = vec![-1f32; words.len() + 8];
            let out = &mut buf[offset..offset + words.len()];
            let bad = bf16_to_f32(&bytes, out);
            prop_assert_eq!(bad, want_bad);
            prop_assert_eq!(bad, first_non_finite(&bytes).is_some());
            let same = out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same);
            prop_assert!(buf[..offset].iter().chain(&buf[offset + words.len()..]).all(|&x| x == -1.0));
        }
    }

    #[test]
    fn a_long_run_finds_a_bad_word_inside_the_streamed_part() {
        let mut words = vec![0x3f80u16; 10_000];
        words[7_777] = 0xff80; // -inf
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = vec![0f32; words.len()];
        assert!(bf16_to_f32(&bytes, &mut out));
        assert_eq!(first_non_finite(&bytes), Some(7_777));
        assert_eq!((out[0], out[7_777], out[9_999]), (1.0, f32::NEG_INFINITY, 1.0));
    }
}
