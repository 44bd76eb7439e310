// Bidirectional attention with a key-padding mask, bfloat16, on x86 CPUs with AMX or with
// AVX-512 BF16.
//
// Why: PyTorch's CPU flash-attention kernel works on blocks of 32 queries and pays a fixed cost
// per block; with BERT's short heads (32 wide) and sequences of ~100 tokens that overhead, not
// the arithmetic, sets its speed (~40 % of a bf16 MiniLM forward). Here one (sequence, head) is
// one piece of work: Q, K and V are packed once (K^T in dimension pairs, V in key pairs), the
// two products run either as 16 x 16 AMX tile operations (AmxProducts) or as register-blocked
// AVX-512 VDPBF16PS (Avx512Products, for CPUs without AMX), and the softmax runs in float32 with
// the flash kernel's numerics (scores and sums in fp32, probabilities rounded to bf16 for the
// product with V, the output divided by the fp32 sum), shared by both.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kRows = 16;  // queries per tile

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-1 accumulate (16 x 16 fp32), 2 holds the left operand (16 x 32 bf16), 3-4 the right
// operands (16 pairs x 16 columns): every tile is 16 rows of 64 bytes.
TileConfig attention_tiles() {
  TileConfig config;
  for (int t = 0; t < 5; ++t) { config.rows[t] = kRows; config.colsb[t] = 64; }
  return config;
}

bool amx_permitted() {
  // Linux hands out the AMX register state on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

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

struct Buffers {
  std::vector<uint16_t> q;      // Lq x D, zero rows past L
  std::vector<uint32_t> k;      // (D / 2) x Lp: K^T in dimension pairs
  std::vector<uint32_t> v;      // (Lp / 2) x D: V in key pairs
  std::vector<float> scores;    // 16 x Lp
  std::vector<uint16_t> probs;  // 16 x Lp
  std::vector<float> out;       // 16 x 32
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

// The two products on AMX tiles: the caller has loaded attention_tiles() on this thread.
struct AmxProducts {
  // Per thread, around its share of the work: the tile configuration is per thread and shared
  // with oneDNN / PyTorch's own AMX kernels, which may cache it, so put back whatever was
  // configured before.
  struct Thread {
    TileConfig previous, mine = attention_tiles();
    Thread() { _tile_storeconfig(&previous); _tile_loadconfig(&mine); }
    ~Thread() { if (previous.palette_id != 0) _tile_loadconfig(&previous); else _tile_release(); }
  };

  // buf.scores (16 queries from i0 x Lp keys) = Q K^T, 32 keys and 32 dimensions per step
  static void scores(Buffers& buf, int64_t i0, int /*rows*/, int64_t Lp, int64_t D) {
    for (int64_t j0 = 0; j0 < Lp; j0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t d0 = 0; d0 < D; d0 += 32) {
        _tile_loadd(2, &buf.q[i0 * D + d0], D * 2);
        _tile_loadd(3, &buf.k[(d0 / 2) * Lp + j0], Lp * 4);
        _tile_loadd(4, &buf.k[(d0 / 2) * Lp + j0 + 16], Lp * 4);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, &buf.scores[j0], Lp * 4);
      _tile_stored(1, &buf.scores[j0 + 16], Lp * 4);
    }
  }

  // buf.out (16 queries x dimensions d0..d0+31) = probs V, 32 keys per step
  static void weighted_values(Buffers& buf, int64_t d0, int /*rows*/, int64_t Lp, int64_t D) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t j0 = 0; j0 < Lp; j0 += 32) {
      _tile_loadd(2, &buf.probs[j0], Lp * 2);
      _tile_loadd(3, &buf.v[(j0 / 2) * D + d0], D * 4);
      _tile_loadd(4, &buf.v[(j0 / 2) * D + d0 + 16], D * 4);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, &buf.out[0], 32 * 4);
    _tile_stored(1, &buf.out[16], 32 * 4);
  }
};

// Two bf16 side by side (a dimension pair of a query, a key pair of probabilities) in all 16
// 32-bit lanes.
inline __m512bh broadcast_pair(const uint16_t* pair) {
  uint32_t bits;
  std::memcpy(&bits, pair, 4);
  return (__m512bh)_mm512_set1_epi32(int(bits));
}

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

// The same two products with AVX-512 BF16 (VDPBF16PS: 16 fp32 lanes += the dot product of a
// bf16 pair), for CPUs without AMX: 8 queries x 32 keys (or dimensions) in 16 accumulators, the
// packed K^T / V rows loaded once per 8 queries and the query's (probabilities') pair broadcast.
// Only the first `rows` queries of the 16 are needed (rounded up to 8).
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

// One (sequence, head): out[i, :] = softmax(scale * q_i . K^T over kept keys) V for every query
// i < L. Queries are padded to a multiple of 16, keys to a multiple of 32 past the last kept key;
// padded and masked keys get probability 0. Products: AmxProducts or Avx512Products.
template <class Products>
void attend_head(const Head& h, const Keys& keys, int64_t L, int64_t D, float scale,
                 uint16_t* out, int64_t out_row, Buffers& buf) {
  const int64_t Lq = (L + 15) / 16 * 16, Lp = (keys.end + 31) / 32 * 32, P = D / 2;
  buf.q.assign(Lq * D, 0);
  for (int64_t i = 0; i < L; ++i) std::memcpy(&buf.q[i * D], h.q + i * h.q_row, D * 2);
  // K^T in dimension pairs, 16 keys x 16 pairs at a time (a 16 x 16 transpose of 32-bit pairs)
  buf.k.assign(P * Lp, 0);
  for (int64_t j0 = 0; j0 < keys.end; j0 += 16) {
    const int n = int(std::min<int64_t>(16, keys.end - j0));
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      __m512i rows[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = j < n ? _mm512_loadu_si512(h.k + (j0 + j) * h.k_row + 2 * p0) : _mm512_setzero_si512();
      transpose16x16(rows);
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(&buf.k[(p0 + p) * Lp + j0], rows[p]);
    }
  }
  // V in key pairs: (V[2m, d], V[2m + 1, d]) side by side, 32 dimensions at a time
  buf.v.assign(Lp / 2 * D, 0);
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
  buf.scores.resize(kRows * Lp);
  buf.probs.resize(kRows * Lp);
  buf.out.resize(kRows * 32);
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());

  for (int64_t i0 = 0; i0 < Lq; i0 += kRows) {
    // the queries of this block that exist; their outputs are the only ones stored
    const int rows = int(std::min<int64_t>(kRows, L - i0));
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

}  // namespace

namespace {

// query, key, value: (batch, heads, length, head_dim) bfloat16 with head_dim contiguous and a
// multiple of 32; key_mask: (batch, length), true = attend. Returns (batch, length, heads,
// head_dim) bfloat16, the layout the model reshapes to (batch, length, hidden) next. `name`: the
// op's, for its error messages.
template <class Products>
at::Tensor attention(const char* name, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, const at::Tensor& key_mask, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
              value.scalar_type() == at::kBFloat16, name, ": bfloat16 inputs only");
  TORCH_CHECK(query.dim() == 4 && key.sizes() == query.sizes() && value.sizes() == query.sizes(),
              name, ": query, key and value must be (batch, heads, length, dim) alike");
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3);
  TORCH_CHECK(D % 32 == 0, name, ": head_dim must be a multiple of 32");
  TORCH_CHECK(scale > 0, name, ": scale must be positive");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              name, ": head_dim must be contiguous");
  TORCH_CHECK(key_mask.dim() == 2 && key_mask.size(0) == B && key_mask.size(1) == L,
              name, ": key_mask must be (batch, length)");
  auto out = at::empty({B, L, H, D}, query.options());
  if (out.numel() == 0) return out;
  const auto keep = key_mask.to(at::kBool).contiguous();
  const bool* kept = keep.data_ptr<bool>();
  // Per sequence: one past its last kept key, and a bias row (0 / -inf) only if a key before
  // that is masked. Lp: keys padded to a multiple of 32.
  const int64_t Lp = (L + 31) / 32 * 32;
  std::vector<int64_t> ends(B, 0), counts(B, 0);
  std::vector<float> bias(B * Lp, -std::numeric_limits<float>::infinity());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < L; ++j) {
      if (kept[b * L + j]) { bias[b * Lp + j] = 0.0f; ends[b] = j + 1; ++counts[b]; }
    }
    TORCH_CHECK(ends[b] > 0, name, ": a sequence has no key to attend to");
  }

  const auto* q = reinterpret_cast<const uint16_t*>(query.data_ptr<at::BFloat16>());
  const auto* k = reinterpret_cast<const uint16_t*>(key.data_ptr<at::BFloat16>());
  const auto* v = reinterpret_cast<const uint16_t*>(value.data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    typename Products::Thread thread;  // AMX: its tile configuration, restored after
    Buffers buf;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / H, hd = w % H;
      const Head head{q + b * query.stride(0) + hd * query.stride(1),
                      k + b * key.stride(0) + hd * key.stride(1),
                      v + b * value.stride(0) + hd * value.stride(1),
                      query.stride(2), key.stride(2), value.stride(2)};
      const bool holes = counts[b] < ends[b];  // a masked key before the last kept one
      const Keys keys{ends[b], holes ? &bias[b * Lp] : nullptr};
      attend_head<Products>(head, keys, L, D, float(scale), o + b * L * H * D + hd * D, H * D, buf);
    }
  });
  return out;
}

}  // namespace

// The products on AMX tiles (Sapphire Rapids and later).
at::Tensor padded_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& key_mask, double scale) {
  TORCH_CHECK(amx_permitted(), "padded_attention: the kernel refused AMX state");
  return attention<AmxProducts>("padded_attention", query, key, value, key_mask, scale);
}

// The products with AVX-512 BF16 (VDPBF16PS: Cooper Lake, Zen 4 and later), no AMX needed.
at::Tensor padded_attention_avx512(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& key_mask, double scale) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"),
              "padded_attention_avx512: this CPU has no AVX-512 BF16");
  return attention<Avx512Products>("padded_attention_avx512", query, key, value, key_mask, scale);
}

TORCH_LIBRARY(embedpipe, m) {
  m.def("padded_attention(Tensor query, Tensor key, Tensor value, Tensor key_mask, float scale) -> Tensor");
  m.def("padded_attention_avx512(Tensor query, Tensor key, Tensor value, Tensor key_mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(embedpipe, CPU, m) {
  m.impl("padded_attention", &padded_attention);
  m.impl("padded_attention_avx512", &padded_attention_avx512);
}
