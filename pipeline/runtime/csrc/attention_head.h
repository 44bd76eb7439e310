// One (sequence, head) of bidirectional attention with a key-padding mask, bfloat16, for CPUs with
// AVX-512 BF16 (and AMX): included by attention_avx512.cpp and attention_amx.cpp inside their own
// namespace, after their `#pragma GCC target`, so each copy is compiled for its ISA and named
// after it. No torch and no STL here (see attention_job.h).
//
// Why: PyTorch's CPU flash-attention kernel works on blocks of 32 queries and pays a fixed cost
// per block; with BERT's short heads (32 wide) and sequences of ~100 tokens that overhead, not
// the arithmetic, sets its speed (~40 % of a bf16 MiniLM forward). Here one (sequence, head) is
// one piece of work: Q, K and V are packed once (K^T in dimension pairs, V in key pairs), the
// two products run either as 16 x 16 AMX tile operations (AmxProducts) or as register-blocked
// AVX-512 VDPBF16PS (Avx512Products), and the softmax runs in float32 with the flash kernel's
// numerics (scores and sums in fp32, probabilities rounded to bf16 for the product with V, the
// output divided by the fp32 sum), shared by both.

constexpr int kRows = 16;  // queries per block

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// e^x for x <= 0, to ~4e-5 relative (the probabilities are rounded to bf16, 4e-3, next): 2^n
// from the exponent bits of a shifted sum, times a degree-4 polynomial of the remainder. x is
// clamped at -87 (2^-126): callers zero the lanes of masked keys themselves.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 shifter = _mm512_set1_ps(12582912.0f + 127.0f);  // 1.5 * 2^23, plus the bias
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter);
  const __m512 n = _mm512_sub_ps(t, shifter);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945f), x);
  __m512 p = _mm512_set1_ps(1.0f / 24);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23));
  return _mm512_mul_ps(p, two_n);
}

// In place: rows[i][j] <-> rows[j][i] for 16 x 16 32-bit elements.
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4g + k] now holds, in each 128-bit lane l, row (4l + ...) pieces: regroup lanes
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Per-thread scratch, sized once for the longest sequence of the call (plain new[] / delete[]).
struct Buffers {
  uint16_t* q;       // Lq x D, zero rows past L
  uint32_t* k;       // (D / 2) x Lp: K^T in dimension pairs
  uint32_t* v;       // (Lp / 2) x D: V in key pairs
  float* scores;     // 16 x Lp
  uint16_t* probs;   // 16 x Lp
  float* out;        // 16 x 32
  Buffers(int64_t Lq, int64_t Lp, int64_t D)
      : q(new uint16_t[Lq * D]), k(new uint32_t[(D / 2) * Lp]), v(new uint32_t[(Lp / 2) * D]),
        scores(new float[kRows * Lp]), probs(new uint16_t[kRows * Lp]), out(new float[kRows * 32]) {}
  ~Buffers() { delete[] q; delete[] k; delete[] v; delete[] scores; delete[] probs; delete[] out; }
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;
};

struct Head {
  const uint16_t* q; const uint16_t* k; const uint16_t* v;
  int64_t q_row, k_row, v_row;  // element strides between positions
};

// The keys of one sequence: kept ones are below `end`; `bias` (0 or -inf per key) is null when
// every key below `end` is kept (right padding, what embedpipe's batches have).
struct Keys {
  int64_t end;
  const float* bias;
};

inline __mmask16 lanes_below(int64_t j, int64_t end) {
  return j + 16 <= end ? __mmask16(0xFFFF) : j >= end ? __mmask16(0) : __mmask16((1u << (end - j)) - 1);
}

// Two bf16 side by side (a dimension pair of a query, a key pair of probabilities) in all 16
// 32-bit lanes.
inline __m512bh broadcast_pair(const uint16_t* pair) {
  uint32_t bits;
  __builtin_memcpy(&bits, pair, 4);
  return (__m512bh)_mm512_set1_epi32(int(bits));
}

// One (sequence, head): out[i, :] = softmax(scale * q_i . K^T over kept keys) V for every query
// i < L. Queries are padded to a multiple of 16, keys to a multiple of 32 past the last kept key;
// padded and masked keys get probability 0. Products: AmxProducts or Avx512Products.
template <class Products>
void attend_head(const Head& h, const Keys& keys, int64_t L, int64_t D, float scale,
                 uint16_t* out, int64_t out_row, Buffers& buf) {
  const int64_t Lq = (L + 15) / 16 * 16, Lp = (keys.end + 31) / 32 * 32, P = D / 2;
  __builtin_memset(buf.q, 0, Lq * D * 2);
  for (int64_t i = 0; i < L; ++i) __builtin_memcpy(&buf.q[i * D], h.q + i * h.q_row, D * 2);
  // K^T in dimension pairs, 16 keys x 16 pairs at a time (a 16 x 16 transpose of 32-bit pairs)
  __builtin_memset(buf.k, 0, P * Lp * 4);
  for (int64_t j0 = 0; j0 < keys.end; j0 += 16) {
    const int n = int(min64(16, keys.end - j0));
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      __m512i rows[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = j < n ? _mm512_loadu_si512(h.k + (j0 + j) * h.k_row + 2 * p0) : _mm512_setzero_si512();
      transpose16x16(rows);
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(&buf.k[(p0 + p) * Lp + j0], rows[p]);
    }
  }
  // V in key pairs: (V[2m, d], V[2m + 1, d]) side by side, 32 dimensions at a time
  __builtin_memset(buf.v, 0, Lp / 2 * D * 4);
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t j = 0; j < keys.end; j += 2) {
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const __m512i a = _mm512_loadu_si512(h.v + j * h.v_row + d0);
      const __m512i b = j + 1 < keys.end ? _mm512_loadu_si512(h.v + (j + 1) * h.v_row + d0)
                                         : _mm512_setzero_si512();
      _mm512_storeu_si512(&buf.v[(j / 2) * D + d0], _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(&buf.v[(j / 2) * D + d0 + 16], _mm512_permutex2var_epi16(a, hi, b));
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 minus_inf = _mm512_set1_ps(-__builtin_inff());

  for (int64_t i0 = 0; i0 < Lq; i0 += kRows) {
    // the queries of this block that exist; their outputs are the only ones stored
    const int rows = int(min64(kRows, L - i0));
    Products::scores(buf, i0, rows, Lp, D);
    // softmax numerators: fp32 for the sums, bf16 for the product with V; 0 past the kept keys
    float inv_sum[kRows];
    for (int r = 0; r < rows; ++r) {
      const float* s = &buf.scores[r * Lp];
      uint16_t* pr = &buf.probs[r * Lp];
      __m512 m = minus_inf, sum = _mm512_setzero_ps();
      if (keys.bias == nullptr) {  // (scale > 0: checked by the caller)
        for (int64_t j = 0; j < Lp; j += 16)
          m = _mm512_mask_max_ps(m, lanes_below(j, keys.end), m, _mm512_loadu_ps(s + j));
        // scale > 0, so the largest scaled score is scale * the largest score
        const __m512 shift = _mm512_set1_ps(-scale * _mm512_reduce_max_ps(m));
        for (int64_t j = 0; j < Lp; j += 16) {
          const __m512 e = _mm512_maskz_mov_ps(lanes_below(j, keys.end),
              exp_ps(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), vscale, shift)));
          sum = _mm512_add_ps(sum, e);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
      } else {
        for (int64_t j = 0; j < Lp; j += 16)
          m = _mm512_max_ps(m, _mm512_fmadd_ps(_mm512_loadu_ps(s + j), vscale, _mm512_loadu_ps(keys.bias + j)));
        const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        for (int64_t j = 0; j < Lp; j += 16) {
          const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(s + j), vscale, _mm512_loadu_ps(keys.bias + j));
          const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_OQ),
                                               exp_ps(_mm512_sub_ps(x, vmax)));
          sum = _mm512_add_ps(sum, e);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
      }
      inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    // out (16 queries x 32 dimensions at a time) = probs V / sum
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      Products::weighted_values(buf, d0, rows, Lp, D);
      for (int r = 0; r < rows; ++r) {
        const __m512 inv = _mm512_set1_ps(inv_sum[r]);
        uint16_t* dst = out + (i0 + r) * out_row + d0;
        for (int c = 0; c < 32; c += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&buf.out[r * 32 + c]), inv)));
      }
    }
  }
}

// Work items begin..end-1 of `job` (item w: sequence w / heads, head w % heads) with `Products`,
// whose Thread (AMX: the tile configuration) lives around them.
template <class Products>
void attend_range(const HeadJob& job, int64_t begin, int64_t end) {
  typename Products::Thread thread;
  const int64_t L = job.length, D = job.dim, H = job.heads;
  Buffers buf((L + 15) / 16 * 16, job.padded_keys, D);
  for (int64_t w = begin; w < end; ++w) {
    const int64_t b = w / H, hd = w % H;
    const Head head{job.q + b * job.q_stride[0] + hd * job.q_stride[1],
                    job.k + b * job.k_stride[0] + hd * job.k_stride[1],
                    job.v + b * job.v_stride[0] + hd * job.v_stride[1],
                    job.q_stride[2], job.k_stride[2], job.v_stride[2]};
    const bool holes = job.counts[b] < job.ends[b];  // a masked key before the last kept one
    const Keys keys{job.ends[b], holes ? job.bias + b * job.padded_keys : nullptr};
    attend_head<Products>(head, keys, L, D, job.scale, job.out + b * L * H * D + hd * D, H * D, buf);
  }
}
