// The attention products with AVX-512 BF16 (VDPBF16PS: Cooper Lake, Zen 4 and later), for CPUs
// without AMX. This whole file is compiled for AVX-512 BF16 (the pragma), and only
// attention_op.cpp calls into it, after checking the CPU.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#endif
#include <immintrin.h>

#include "attention_job.h"

namespace embedpipe {
namespace avx512 {

#include "attention_head.h"

// 8 rows x 32 columns of a @ b in fp32: row r of `a` holds bf16 pairs (pair t at a + r * a_row
// + 2t), and b + t * b_step holds the 32 columns' pair t (two 512-bit registers of 16 pairs).
inline void product_8x32(const uint16_t* a, int64_t a_row, const uint32_t* b, int64_t b_step,
                         int64_t steps, float* out, int64_t out_row) {
  __m512 acc[8][2];
  for (int r = 0; r < 8; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < steps; ++t) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + t * b_step);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + t * b_step + 16);
    for (int r = 0; r < 8; ++r) {
      const __m512bh pair = broadcast_pair(a + r * a_row + 2 * t);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], pair, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], pair, b1);
    }
  }
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(out + r * out_row, acc[r][0]);
    _mm512_storeu_ps(out + r * out_row + 16, acc[r][1]);
  }
}

// 8 queries x 32 keys (or dimensions) in 16 accumulators, the packed K^T / V rows loaded once per
// 8 queries and the query's (probabilities') pair broadcast. Only the first `rows` queries of
// the 16 are needed (rounded up to 8).
struct Avx512Products {
  struct Thread {};

  // scores (rows x Lp) = Q K^T: the query's dimension pairs against K^T's packed pair rows
  static void scores(Buffers& buf, int64_t i0, int rows, int64_t Lp, int64_t D) {
    for (int r0 = 0; r0 < rows; r0 += 8)
      for (int64_t j0 = 0; j0 < Lp; j0 += 32)
        product_8x32(&buf.q[(i0 + r0) * D], D, &buf.k[j0], Lp, D / 2, &buf.scores[r0 * Lp + j0], Lp);
  }

  // out (rows x 32) = probs V for dimensions d0..d0+31: probability key pairs against V's
  static void weighted_values(Buffers& buf, int64_t d0, int rows, int64_t Lp, int64_t D) {
    for (int r0 = 0; r0 < rows; r0 += 8)
      product_8x32(&buf.probs[r0 * Lp], Lp, &buf.v[d0], D, Lp / 2, &buf.out[r0 * 32], 32);
  }
};

void attend_heads(const HeadJob& job, int64_t begin, int64_t end) {
  attend_range<Avx512Products>(job, begin, end);
}

}  // namespace avx512
}  // namespace embedpipe

#if defined(__clang__)
#pragma clang attribute pop
#endif
