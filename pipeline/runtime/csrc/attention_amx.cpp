// The attention products on AMX tiles (Sapphire Rapids and later); the softmax and packing are
// AVX-512's. This whole file is compiled for AMX and AVX-512 BF16 (the pragma), and only
// attention_op.cpp calls into it, after checking the CPU and that Linux granted the tile state.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
#endif
#include <immintrin.h>

#include "attention_job.h"

namespace embedpipe {
namespace amx {

#include "attention_head.h"

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

// The two products on AMX tiles: Thread has loaded attention_tiles() on this thread.
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

void attend_heads(const HeadJob& job, int64_t begin, int64_t end) {
  attend_range<AmxProducts>(job, begin, end);
}

}  // namespace amx
}  // namespace embedpipe

#if defined(__clang__)
#pragma clang attribute pop
#endif
