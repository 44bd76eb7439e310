// embedpipe's attention ops for torch: embedpipe::padded_attention (AMX products) and
// embedpipe::padded_attention_avx512 (AVX-512 BF16 products). This file is compiled for the
// baseline x86-64 the library is built for, so loading the library runs nothing a CPU lacks; each
// op checks the CPU before it calls into its ISA's translation unit (attention_amx.cpp,
// attention_avx512.cpp) and refuses with a message otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "attention_job.h"

namespace {

using Attend = void (*)(const embedpipe::HeadJob&, int64_t, int64_t);

bool has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

bool amx_permitted() {
  // Linux hands out the AMX register state on request (ARCH_REQ_XCOMP_PERM, XTILEDATA); a CPU or
  // kernel without AMX refuses.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// query, key, value: (batch, heads, length, head_dim) bfloat16 with head_dim contiguous and a
// multiple of 32; key_mask: (batch, length), true = attend. Returns (batch, length, heads,
// head_dim) bfloat16, the layout the model reshapes to (batch, length, hidden) next. `name`: the
// op's, for its error messages.
at::Tensor attention(const char* name, Attend attend, const at::Tensor& query, const at::Tensor& key,
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
  const embedpipe::HeadJob job{
      reinterpret_cast<const uint16_t*>(query.data_ptr<at::BFloat16>()),
      reinterpret_cast<const uint16_t*>(key.data_ptr<at::BFloat16>()),
      reinterpret_cast<const uint16_t*>(value.data_ptr<at::BFloat16>()),
      reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()),
      H, L, D,
      {query.stride(0), query.stride(1), query.stride(2)},
      {key.stride(0), key.stride(1), key.stride(2)},
      {value.stride(0), value.stride(1), value.stride(2)},
      ends.data(), counts.data(), bias.data(), Lp, float(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) { attend(job, begin, end); });
  return out;
}

}  // namespace

at::Tensor padded_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& key_mask, double scale) {
  TORCH_CHECK(has_avx512_bf16() && __builtin_cpu_supports("amx-tile") &&
              __builtin_cpu_supports("amx-bf16"), "padded_attention: this CPU has no AMX bf16");
  TORCH_CHECK(amx_permitted(), "padded_attention: the kernel refused AMX state");
  return attention("padded_attention", embedpipe::amx::attend_heads, query, key, value, key_mask, scale);
}

at::Tensor padded_attention_avx512(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& key_mask, double scale) {
  TORCH_CHECK(has_avx512_bf16(), "padded_attention_avx512: this CPU has no AVX-512 BF16");
  return attention("padded_attention_avx512", embedpipe::avx512::attend_heads, query, key, value,
                   key_mask, scale);
}

TORCH_LIBRARY(embedpipe, m) {
  m.def("padded_attention(Tensor query, Tensor key, Tensor value, Tensor key_mask, float scale) -> Tensor");
  m.def("padded_attention_avx512(Tensor query, Tensor key, Tensor value, Tensor key_mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(embedpipe, CPU, m) {
  m.impl("padded_attention", &padded_attention);
  m.impl("padded_attention_avx512", &padded_attention_avx512);
}

// A Python extension module too (`pipeline.runtime._attention_kernel` in the wheel), so that
// setuptools builds and installs it; importing it registers the ops above and nothing more.
PyMODINIT_FUNC PyInit__attention_kernel(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attention_kernel", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
