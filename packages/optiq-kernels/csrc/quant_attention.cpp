// Fused decode attention over a packed (affine-quantized) KV cache, on the CPU.
//
// MLX's CPU backend has no fused dequantize-GEMV: reading an N-bit KV cache costs a
// conversion of every code to fp32 (single-threaded elementwise ops) before BLAS, and
// its exp runs at ~20 ns per element. This primitive reads the packed codes directly,
// keeps everything for one KV head and a slice of positions in cache, and splits the
// positions over a few threads (flash-decoding style: each slice keeps its own max,
// sum and weighted values; the slices are merged at the end).

#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>

#include "mlx/primitives.h"
#include "packed.h"

namespace optiq {
namespace {

constexpr int kChunk = 1024;  // positions per task

// A [B, H, L, W] operand: byte strides of batch, head and position (0 = broadcast).
struct Operand {
  const char* ptr = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;

  template <typename T>
  const T* at(int b, int h, int64_t l) const {
    return reinterpret_cast<const T*>(ptr + b * sb + h * sh + l * sl);
  }
};

Operand operand(const mx::array& a) {
  const int64_t size = mx::size_of(a.dtype());
  const auto& st = a.strides();
  const int n = a.ndim();
  return Operand{a.data<char>(), int64_t(st[n - 4]) * size, int64_t(st[n - 3]) * size, int64_t(st[n - 2]) * size};
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^k * p(f), relative error
// ~2e-7; plain arithmetic, so the loops calling it vectorize (libm's expf does not).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float k = std::floor(t);
  const float f = t - k;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
}

struct Problem {
  int B, H, R, D, Dv, gs, k_bits, v_bits;
  int64_t L;
  Operand q, kw, ks, kb, vw, vs, vb;
  int64_t q_row;  // byte stride of the query rows
  const float* mask_data;
  bool has_mask;
  bool hadamard;  // K/V stored rotated: rotate the queries in, the output back
};

// Partial result of one (batch, head, slice of positions).
struct Partial {
  std::vector<float> max, sum, acc;  // [R], [R], [R * Dv]
};

// Scales or biases of positions [l0, l1) as floats: [n, groups].
template <typename S>
void gather_floats(const Operand& a, int b, int h, int64_t l0, int64_t l1, int groups, float* out) {
  rows_as_float<S>(a.at<char>(b, h, l0), a.sl, l1 - l0, groups, out);
}

// A position's packed codes; 3/5/6-bit rows are copied into `pad` first (codes8 reads a
// few bytes past a chunk of eight codes).
template <int BITS>
inline const uint8_t* packed_row(const Operand& a, int b, int h, int64_t l, int n, uint8_t* pad) {
  const uint8_t* row = a.at<uint8_t>(b, h, l);
  if constexpr (word_aligned(BITS)) return row;
  std::memcpy(pad, row, size_t(n) * BITS / 8);
  return pad;
}

// scores[r, l - l0] = sum over groups of s * (q_r . codes) + b * sum(q_r), rows r0 .. r0+MR.
template <int GS, int BITS, int MR>
OPTIQ_MULTIVERSION void slice_scores(const Problem& P, int b, int h, int64_t l0, int64_t l1, int r0, const float* q,
                                     const float* qsum, const float* k_s, const float* k_z, float* scores) {
  const int D = P.D, G = D / GS;
  const int64_t n = l1 - l0;
  std::vector<uint8_t> pad(size_t(D) * BITS / 8 + 8);
  for (int64_t l = l0; l < l1; ++l) {
    const uint8_t* row = packed_row<BITS>(P.kw, b, h, l, D, pad.data());
    const float* s = k_s + (l - l0) * G;
    const float* z = k_z + (l - l0) * G;
    float total[MR] = {};
    for (int g = 0; g < G; ++g) {
      v8f acc[MR] = {};
      for (int e = 0; e < GS; e += 8) {
        const v8f c = codes8<BITS>(row, g * GS + e);
        for (int r = 0; r < MR; ++r) acc[r] += load_f32x8(q + size_t(r0 + r) * D + g * GS + e) * c;
      }
      for (int r = 0; r < MR; ++r) total[r] += s[g] * hsum(acc[r]) + z[g] * qsum[size_t(r0 + r) * G + g];
    }
    for (int r = 0; r < MR; ++r) scores[(r0 + r) * n + (l - l0)] = total[r];
  }
}

// acc[r] += sum_l p[r, l] * (s_l * codes_l + b_l) for rows r0 .. r0+MR, the bias per group.
template <int GS, int BITS, int MR>
OPTIQ_MULTIVERSION void slice_values(const Problem& P, int b, int h, int64_t l0, int64_t l1, int r0, const float* p,
                                     const float* v_s, const float* v_z, float* acc) {
  const int Dv = P.Dv, G = Dv / GS;
  const int64_t n = l1 - l0;
  std::vector<uint8_t> pad(size_t(Dv) * BITS / 8 + 8);
  std::vector<float> bias(MR * G, 0.0f);
  for (int64_t l = l0; l < l1; ++l) {
    const uint8_t* row = packed_row<BITS>(P.vw, b, h, l, Dv, pad.data());
    const float* s = v_s + (l - l0) * G;
    const float* z = v_z + (l - l0) * G;
    float pl[MR];
    for (int r = 0; r < MR; ++r) pl[r] = p[(r0 + r) * n + (l - l0)];
    for (int g = 0; g < G; ++g) {
      float w[MR];
      for (int r = 0; r < MR; ++r) {
        w[r] = pl[r] * s[g];
        bias[size_t(r) * G + g] += pl[r] * z[g];
      }
      for (int e = 0; e < GS; e += 8) {
        const v8f c = codes8<BITS>(row, g * GS + e);
        for (int r = 0; r < MR; ++r) {
          float* a = acc + size_t(r0 + r) * Dv + g * GS + e;
          store_f32x8(a, load_f32x8(a) + w[r] * c);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int d = 0; d < Dv; ++d) acc[size_t(r0 + r) * Dv + d] += bias[size_t(r) * G + d / GS];
}

// Calls f(r0, MR) over rows [0, R) in blocks of 4, 2 and 1 (MR a compile-time constant).
template <typename F>
void for_row_blocks(int R, F&& f) {
  int r = 0;
  for (; r + 4 <= R; r += 4) f.template operator()<4>(r);
  for (; r + 2 <= R; r += 2) f.template operator()<2>(r);
  for (; r < R; ++r) f.template operator()<1>(r);
}

// softmax numerators in place over one slice: scores -> exp(scores + mask - max).
OPTIQ_MULTIVERSION void slice_softmax(const Problem& P, int b, int h, int64_t l0, int64_t n, float* scores, Partial& out) {
  for (int r = 0; r < P.R; ++r) {
    float* sr = scores + r * n;
    if (P.has_mask) {  // contiguous [B, H, R, L]
      const float* m = P.mask_data + ((int64_t(b) * P.H + h) * P.R + r) * P.L + l0;
      for (int64_t i = 0; i < n; ++i) sr[i] += m[i];
    }
    float top = -INFINITY;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, sr[i]);
    if (top == -INFINITY) {  // every position of this slice is masked out: no weight
      std::fill(sr, sr + n, 0.0f);
      continue;
    }
    for (int64_t i = 0; i < n; ++i) sr[i] = exp_nonpositive(sr[i] - top);
    float s8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int j = 0; j < 8; ++j) s8[j] += sr[i + j];
    float sum = ((s8[0] + s8[1]) + (s8[2] + s8[3])) + ((s8[4] + s8[5]) + (s8[6] + s8[7]));
    for (; i < n; ++i) sum += sr[i];
    out.max[r] = top;
    out.sum[r] = sum;
  }
}

// Calls f.template operator()<BITS>() with the width as a compile-time constant.
template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return f.template operator()<2>();
    case 3: return f.template operator()<3>();
    case 4: return f.template operator()<4>();
    case 5: return f.template operator()<5>();
    case 6: return f.template operator()<6>();
    case 8: return f.template operator()<8>();
  }
  throw std::invalid_argument("[optiq.kernels] bits must be one of 2, 3, 4, 5, 6, 8");
}

template <typename S>
void run_slice(const Problem& P, int b, int h, int64_t l0, int64_t l1, const float* q, const float* qsum,
               Partial& out) {
  const int64_t n = l1 - l0;
  const int Gk = P.D / P.gs, Gv = P.Dv / P.gs;
  std::vector<float> k_s(n * Gk), k_z(n * Gk), v_s(n * Gv), v_z(n * Gv), scores(size_t(P.R) * n);
  gather_floats<S>(P.ks, b, h, l0, l1, Gk, k_s.data());
  gather_floats<S>(P.kb, b, h, l0, l1, Gk, k_z.data());
  gather_floats<S>(P.vs, b, h, l0, l1, Gv, v_s.data());
  gather_floats<S>(P.vb, b, h, l0, l1, Gv, v_z.data());
  out.max.assign(P.R, -INFINITY);
  out.sum.assign(P.R, 0.0f);
  out.acc.assign(size_t(P.R) * P.Dv, 0.0f);
  with_group_size(P.gs, [&]<int GS>() {
    with_bits(P.k_bits, [&]<int KB>() {
      for_row_blocks(P.R, [&]<int MR>(int r0) {
        slice_scores<GS, KB, MR>(P, b, h, l0, l1, r0, q, qsum, k_s.data(), k_z.data(), scores.data());
      });
    });
    slice_softmax(P, b, h, l0, n, scores.data(), out);
    with_bits(P.v_bits, [&]<int VB>() {
      for_row_blocks(P.R, [&]<int MR>(int r0) {
        slice_values<GS, VB, MR>(P, b, h, l0, l1, r0, scores.data(), v_s.data(), v_z.data(), out.acc.data());
      });
    });
  });
}

// x <- x @ R in place, R block-diagonal with one normalized Sylvester Hadamard block per
// group (a fast Walsh-Hadamard transform; R is its own inverse).
void hadamard_groups(float* x, int n, int gs) {
  const float norm = 1.0f / std::sqrt(float(gs));
  for (int g = 0; g < n; g += gs) {
    float* v = x + g;
    for (int h = 1; h < gs; h *= 2)
      for (int i = 0; i < gs; i += 2 * h)
        for (int j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
    for (int d = 0; d < gs; ++d) v[d] *= norm;
  }
}

template <typename S>
void run(const Problem& P, float* out) {
  const int R = P.R, D = P.D, Dv = P.Dv, gs = P.gs, Gk = D / gs;
  const int64_t slices = std::max<int64_t>(1, (P.L + kChunk - 1) / kChunk);
  const int64_t tasks = int64_t(P.B) * P.H * slices;
  std::vector<Partial> parts(tasks);
  // Queries (contiguous) and their per-group sums.
  std::vector<float> qrows(size_t(P.B) * P.H * R * D), qsum(size_t(P.B) * P.H * R * Gk);
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.H; ++h)
      for (int r = 0; r < R; ++r) {
        const float* src = reinterpret_cast<const float*>(P.q.ptr + b * P.q.sb + h * P.q.sh + r * P.q_row);
        const size_t row = (size_t(b) * P.H + h) * R + r;
        float* qr = qrows.data() + row * D;
        for (int d = 0; d < D; ++d) qr[d] = src[d];
        if (P.hadamard) hadamard_groups(qr, D, gs);
        for (int g = 0; g < Gk; ++g) {
          float s = 0.0f;
          for (int d = 0; d < gs; ++d) s += qr[g * gs + d];
          qsum[row * Gk + g] = s;
        }
      }
  parallel_for(tasks, [&](int64_t t) {
    const int64_t c = t % slices, bh = t / slices;
    const int b = int(bh / P.H), h = int(bh % P.H);
    const int64_t l0 = c * kChunk, l1 = std::min(P.L, l0 + kChunk);
    const size_t row = size_t(bh) * R;
    run_slice<S>(P, b, h, l0, l1, qrows.data() + row * D, qsum.data() + row * Gk, parts[t]);
  });

  // Merge the slices.
  std::vector<float> merged(Dv);
  for (int64_t bh = 0; bh < int64_t(P.B) * P.H; ++bh)
    for (int r = 0; r < R; ++r) {
      float m = -INFINITY;
      for (int64_t c = 0; c < slices; ++c) m = std::max(m, parts[bh * slices + c].max[r]);
      float* dst = out + (size_t(bh) * R + r) * Dv;
      if (m == -INFINITY) {  // fully masked row
        std::fill(dst, dst + Dv, 0.0f);
        continue;
      }
      float sum = 0.0f;
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t c = 0; c < slices; ++c) {
        const Partial& p = parts[bh * slices + c];
        const float w = std::exp(p.max[r] - m);
        sum += w * p.sum[r];
        const float* acc = p.acc.data() + size_t(r) * Dv;
        for (int d = 0; d < Dv; ++d) merged[d] += w * acc[d];
      }
      const float inv = 1.0f / sum;
      for (int d = 0; d < Dv; ++d) dst[d] = merged[d] * inv;
      if (P.hadamard) hadamard_groups(dst, Dv, gs);
    }
}

class QuantizedDecodeAttention : public mx::Primitive {
 public:
  QuantizedDecodeAttention(mx::Stream s, int k_bits, int v_bits, int group_size, bool has_mask, bool hadamard)
      : mx::Primitive(s), k_bits_(k_bits), v_bits_(v_bits), gs_(group_size), has_mask_(has_mask),
        hadamard_(hadamard) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    for (size_t i = 1; i < 7; ++i)
      if (in[i].strides().back() != 1 && in[i].shape().back() != 1)
        throw std::invalid_argument("[optiq.kernels] packed K/V operands need a contiguous last axis");
    dispatch_cpu(stream(), in, outs[0], [kb = k_bits_, vb = v_bits_, gs = gs_, hm = has_mask_, hd = hadamard_](
                                             const std::vector<mx::array>& in, mx::array& out) {
      const auto& q = in[0];
      Problem P{};
      P.B = q.shape(0), P.H = q.shape(1), P.R = q.shape(2), P.D = q.shape(3), P.Dv = out.shape(3);
      P.L = in[1].shape(2), P.gs = gs, P.k_bits = kb, P.v_bits = vb;
      P.q = operand(q), P.q_row = int64_t(q.strides()[2]) * 4;
      P.kw = operand(in[1]), P.ks = operand(in[2]), P.kb = operand(in[3]);
      P.vw = operand(in[4]), P.vs = operand(in[5]), P.vb = operand(in[6]);
      P.has_mask = hm;
      P.hadamard = hd;
      P.mask_data = hm ? in[7].data<float>() : nullptr;
      float* o = out.data<float>();
      with_scale_type(in[2].dtype(), [&]<typename S>() { run<S>(P, o); });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[optiq.kernels] quantized_decode_attention runs on the CPU only");
  }

  const char* name() const override {
    return "OptiqQuantizedDecodeAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedDecodeAttention&>(other);
    return k_bits_ == o.k_bits_ && v_bits_ == o.v_bits_ && gs_ == o.gs_ && has_mask_ == o.has_mask_ &&
           hadamard_ == o.hadamard_;
  }

 private:
  int k_bits_, v_bits_, gs_;
  bool has_mask_, hadamard_;
};

void check_packed(const mx::array& w, const mx::array& s, const mx::array& z, const char* what, int bits,
                  int gs, int B, int H, int64_t L) {
  const std::string n(what);
  check(w.ndim() == 4 && s.ndim() == 4 && z.ndim() == 4, n + " codes, scales and biases must be [B, H, L, *]");
  check(w.dtype() == mx::uint32, n + " codes must be uint32 (as mx.quantize packs them)");
  check(s.dtype() == z.dtype() && (s.dtype() == mx::float16 || s.dtype() == mx::bfloat16 || s.dtype() == mx::float32),
        n + " scales and biases must share one float dtype");
  check(w.shape(0) == B && w.shape(1) == H && w.shape(2) == L, n + " codes do not match the queries' batch/heads or the keys' length");
  const int64_t dim = int64_t(w.shape(3)) * 32 / bits;
  check(dim % gs == 0 && s.shape(3) == dim / gs && z.shape(3) == dim / gs, n + " scales/biases do not match codes and group size");
  check(s.shape(0) == B && s.shape(1) == H && s.shape(2) == L && z.shape(2) == L, n + " scales/biases do not match the codes");
}

}  // namespace

mx::array quantized_decode_attention(const mx::array& q, const mx::array& k_codes, const mx::array& k_scales,
                                     const mx::array& k_biases, const mx::array& v_codes, const mx::array& v_scales,
                                     const mx::array& v_biases, std::optional<mx::array> mask, int k_bits,
                                     int v_bits, int group_size, bool hadamard) {
  check_bits(k_bits);
  check_bits(v_bits);
  check_group_size(group_size);
  check(q.ndim() == 4, "queries must be [B, H_kv, rows, head_dim]");
  const int B = q.shape(0), H = q.shape(1), R = q.shape(2), D = q.shape(3);
  const int64_t L = k_codes.shape(2);
  check(L > 0, "the cache is empty");
  check(D % group_size == 0, "group_size must divide head_dim");
  check(int64_t(k_codes.shape(3)) * 32 / k_bits == D, "key codes do not match the queries' head_dim");
  check_packed(k_codes, k_scales, k_biases, "key", k_bits, group_size, B, H, L);
  check_packed(v_codes, v_scales, v_biases, "value", v_bits, group_size, B, H, L);
  const int Dv = int(int64_t(v_codes.shape(3)) * 32 / v_bits);

  auto s = mx::default_stream(mx::Device::cpu);
  // Queries and mask: fp32 and contiguous (small). The cache operands are read in place
  // through their strides (a slice of a larger buffer, as caches hand them out).
  auto prep = [&](const mx::array& a) { return mx::contiguous(mx::astype(a, mx::float32, s), false, s); };
  std::vector<mx::array> inputs = {prep(q), k_codes, k_scales, k_biases, v_codes, v_scales, v_biases};
  if (mask) {
    check(mask->ndim() == 4, "mask must be [B or 1, H_kv or 1, rows, L] (additive)");
    inputs.push_back(prep(mx::broadcast_to(*mask, {B, H, R, int(L)}, s)));
  }
  return mx::array({B, H, R, Dv}, mx::float32,
                   std::make_shared<QuantizedDecodeAttention>(s, k_bits, v_bits, group_size, mask.has_value(), hadamard),
                   std::move(inputs));
}

}  // namespace optiq
