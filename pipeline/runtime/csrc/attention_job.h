// What the attention op hands an ISA's code: plain pointers and sizes, no torch or STL types, so
// the ISA translation units (attention_avx512.cpp, attention_amx.cpp), compiled for instructions
// the CPU may lack, share no inline or template code with the rest of the library. (The linker
// keeps one copy of each inline function; had an ISA unit emitted, say, std::vector<float>'s
// methods with AVX-512 in them, the baseline code could end up calling that copy.)
#pragma once

#include <cstdint>

namespace embedpipe {

struct HeadJob {
  const uint16_t* q;  // bfloat16 bits, (batch, heads, length, dim) with the strides below
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;      // (batch, length, heads, dim), contiguous
  int64_t heads, length, dim;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, position (elements)
  const int64_t* ends;    // per sequence: one past its last kept key
  const int64_t* counts;  // per sequence: kept keys
  const float* bias;      // per sequence, padded_keys values: 0 kept, -inf masked
  int64_t padded_keys;    // length rounded up to a multiple of 32
  float scale;
};

// (sequence, head) work items begin..end-1 of `job`, on the calling thread. Each is defined in its
// ISA's translation unit and may only be called on a CPU that has that ISA (attention_op.cpp
// checks).
namespace avx512 { void attend_heads(const HeadJob& job, int64_t begin, int64_t end); }
namespace amx { void attend_heads(const HeadJob& job, int64_t begin, int64_t end); }

}  // namespace embedpipe
