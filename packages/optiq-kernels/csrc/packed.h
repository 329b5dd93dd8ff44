// Shared pieces of OptiQ's CPU kernels: reading MLX's packed affine codes, threads.
//
// Storage (MLX's affine quantization, as mx.quantize writes it): along the last axis,
// groups of `group_size` elements share a scale s and a bias b (x = s * code + b);
// codes are packed little-endian into uint32 words, element j at bits [j*bits, (j+1)*bits)
// of a continuous bitstream.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sched.h>
#endif
#include <future>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/threadpool.h"

namespace optiq {

namespace mx = mlx::core;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// One portable build, with an AVX2+FMA copy of the hot loops picked at load time. (Clang
// cannot multiversion templates: its builds use the baseline ISA, SSE2 or NEON.)
#define OPTIQ_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OPTIQ_MULTIVERSION
#endif

// fp16 through the compiler's native half type where it has one (a single instruction
// with F16C/NEON); MLX's portable float16_t converts in software on x86.
#if defined(__FLT16_MAX__)
using half_t = _Float16;
#else
using half_t = mx::float16_t;
#endif

// Portable 8-wide vectors (GCC/Clang vector extensions): AVX2 in the x86-64-v3 clone,
// two SSE/NEON registers elsewhere.
using v8f = float __attribute__((vector_size(32)));
using i32x8 = int32_t __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f load_f32x8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void store_f32x8(float* p, v8f v) {
  std::memcpy(p, &v, sizeof(v));
}

__attribute__((always_inline)) inline float hsum(v8f v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

using u32x8 = uint32_t __attribute__((vector_size(32)));

constexpr bool word_aligned(int bits) {
  return bits == 2 || bits == 4 || bits == 8;
}

// Codes e0 .. e0+7 (e0 a multiple of 8) of a packed row, in natural order, as floats:
// the word(s) holding them are broadcast to eight lanes, each lane shifts its own code
// down (one variable shift, a mask, a convert). For 3/5/6 bits two 32-bit windows are
// read (codes straddle bytes); they may read up to 3 bytes past the eight codes.
template <int BITS>
__attribute__((always_inline)) inline v8f codes8(const uint8_t* row, int e0) {
  constexpr uint32_t mask = (1u << BITS) - 1;
  u32x8 v, shift;
  if constexpr (BITS == 8) {
    uint32_t a, b;
    std::memcpy(&a, row + e0, 4);
    std::memcpy(&b, row + e0 + 4, 4);
    v = u32x8{a, a, a, a, b, b, b, b};
    shift = u32x8{0, 8, 16, 24, 0, 8, 16, 24};
  } else if constexpr (BITS == 4) {
    uint32_t a;
    std::memcpy(&a, row + e0 / 2, 4);
    v = u32x8{} + a;
    shift = u32x8{0, 4, 8, 12, 16, 20, 24, 28};
  } else if constexpr (BITS == 2) {
    uint16_t a;
    std::memcpy(&a, row + e0 / 4, 2);
    v = u32x8{} + uint32_t(a);
    shift = u32x8{0, 2, 4, 6, 8, 10, 12, 14};
  } else {
    constexpr int hi_byte = 4 * BITS / 8, hi_bit = 4 * BITS % 8;
    const uint8_t* p = row + e0 * BITS / 8;
    uint32_t a, b;
    std::memcpy(&a, p, 4);
    std::memcpy(&b, p + hi_byte, 4);
    v = u32x8{a, a, a, a, b, b, b, b};
    shift = u32x8{0, BITS, 2 * BITS, 3 * BITS, hi_bit, hi_bit + BITS, hi_bit + 2 * BITS, hi_bit + 3 * BITS};
  }
  return __builtin_convertvector(reinterpret_cast<i32x8>((v >> shift) & mask), v8f);
}

// `rows` rows of scales or biases (byte stride `row_bytes`) as floats: [rows, groups].
template <typename S>
OPTIQ_MULTIVERSION void rows_as_float(const char* first, int64_t row_bytes, int64_t rows, int groups, float* out) {
  for (int64_t n = 0; n < rows; ++n) {
    const S* r = reinterpret_cast<const S*>(first + n * row_bytes);
    for (int g = 0; g < groups; ++g) out[n * groups + g] = static_cast<float>(r[g]);
  }
}

// Threads the kernels split work over (OPTIQ_KERNEL_THREADS, default: the CPUs this process may use, at most 8).
inline int thread_count() {
  static const int n = [] {
    if (const char* env = std::getenv("OPTIQ_KERNEL_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    unsigned hw = std::thread::hardware_concurrency();
#if defined(__linux__)
    cpu_set_t set;  // the CPUs this process may run on (taskset, container cpusets), not the host's
    if (sched_getaffinity(0, sizeof(set), &set) == 0) hw = unsigned(CPU_COUNT(&set));
#endif
    return int(std::clamp(hw == 0 ? 1u : hw, 1u, 8u));
  }();
  return n;
}

inline ThreadPool& pool() {
  static ThreadPool p(std::max(1, thread_count() - 1));
  return p;
}

// Run `worker(task)` for tasks [0, n) on up to thread_count() threads (this one included).
template <typename F>
void parallel_for(int64_t n, F&& worker) {
  std::atomic<int64_t> next{0};
  auto loop = [&] {
    for (int64_t t = next++; t < n; t = next++) worker(t);
  };
  const int helpers = int(std::min<int64_t>(thread_count(), n)) - 1;
  std::vector<std::future<void>> done;
  for (int i = 0; i < helpers; ++i) done.push_back(pool().enqueue(loop));
  loop();
  for (auto& f : done) f.get();
}

// Allocates `out` and queues `task(inputs, out)` on `stream`'s CPU worker, after the inputs.
template <typename F>
void dispatch_cpu(const mx::Stream& stream, const std::vector<mx::array>& in, mx::array& out, F task) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (const auto& a : in) enc.set_input_array(a);
  enc.set_output_array(out);
  enc.dispatch([in = in, out = mx::array::unsafe_weak_copy(out), task = std::move(task)]() mutable { task(in, out); });
}

// Calls f.template operator()<S>() with S the C++ type of fp16/bf16/fp32 scales.
template <typename F>
void with_scale_type(mx::Dtype dtype, F&& f) {
  switch (dtype) {
    case mx::float16: return f.template operator()<half_t>();
    case mx::bfloat16: return f.template operator()<mx::bfloat16_t>();
    default: return f.template operator()<float>();
  }
}

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("[optiq.kernels] " + msg);
}

inline void check_bits(int bits) {
  check(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
        "bits must be one of 2, 3, 4, 5, 6, 8 (got " + std::to_string(bits) + ")");
}

inline void check_group_size(int group_size) {
  check(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128");
}

// Calls f.template operator()<GS>() with the group size as a compile-time constant.
template <typename F>
decltype(auto) with_group_size(int gs, F&& f) {
  switch (gs) {
    case 32: return f.template operator()<32>();
    case 64: return f.template operator()<64>();
    case 128: return f.template operator()<128>();
  }
  throw std::invalid_argument("[optiq.kernels] group_size must be 32, 64 or 128");
}

mx::array quantized_decode_attention(const mx::array& q, const mx::array& k_codes, const mx::array& k_scales,
                                     const mx::array& k_biases, const mx::array& v_codes, const mx::array& v_scales,
                                     const mx::array& v_biases, std::optional<mx::array> mask, int k_bits,
                                     int v_bits, int group_size, bool hadamard);

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int bits, int group_size);

mx::array gather_quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                                  const mx::array& biases, const mx::array& indices, int bits, int group_size);

}  // namespace optiq
