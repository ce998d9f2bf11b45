//! Streaming whole cache lines into an output that is not aligned to them (AVX-512).

use std::arch::x86_64::*;

/// Streams consecutive 64-byte vectors to an output that starts `4 * (16 - SHIFT)` bytes
/// past a line boundary, as whole aligned lines: each line is the end of one vector and the
/// start of the next, joined in a register (`valignd` by `SHIFT` elements), and leaves with
/// one streaming store. The first and last lines hold bytes outside the output; they get
/// ordinary masked stores of the output's bytes only. 16-byte streaming stores instead, which
/// leave the lines two rows share to the write-combining buffers, gained about a tenth over
/// no streaming; whole lines nearly double it (BENCHMARKS.md, "Streaming stores").
pub(crate) struct Realign<const SHIFT: i32> {
    /// The line the next vector completes.
    line: *mut u8,
    /// The last vector pushed; its end starts the next line.
    prev: __m512i,
    /// Whether `line` is the first, partial line.
    first: bool,
}

impl<const SHIFT: i32> Realign<SHIFT> {
    /// Output 32-bit elements from a line boundary to the output's first byte.
    const LEAD: u32 = 16 - SHIFT as u32;

    /// # Safety
    /// `out` is `4 * LEAD` bytes past a line boundary; AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn new(out: *mut u8) -> Self {
        Realign {
            line: out.wrapping_sub(4 * Self::LEAD as usize),
            prev: _mm512_setzero_si512(),
            first: true,
        }
    }

    /// Write the next 64 bytes of the output.
    ///
    /// # Safety
    /// The output is writable for the bytes pushed so far; AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn push(&mut self, v: __m512i) {
        let joined = _mm512_alignr_epi32::<SHIFT>(v, self.prev);
        // SAFETY: `line` is 64-byte aligned; the first line's leading elements, outside the
        // output, are masked off; every other line lies within the bytes pushed so far.
        unsafe {
            if self.first {
                let ours: __mmask16 = !((1u32 << Self::LEAD) - 1) as u16;
                _mm512_mask_storeu_epi32(self.line as *mut i32, ours, joined);
                self.first = false;
            } else {
                _mm512_stream_si512(self.line as *mut _, joined);
            }
        }
        self.prev = v;
        self.line = self.line.wrapping_add(64);
    }

    /// Write the end of the last vector into the last, partial line.
    ///
    /// # Safety
    /// At least one vector was pushed; AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn finish(self) {
        let tail = _mm512_alignr_epi32::<SHIFT>(_mm512_setzero_si512(), self.prev);
        let ours: __mmask16 = ((1u32 << Self::LEAD) - 1) as u16;
        // SAFETY: the first `LEAD` elements of `line` end the output.
        unsafe { _mm512_mask_storeu_epi32(self.line as *mut i32, ours, tail) };
    }
}
