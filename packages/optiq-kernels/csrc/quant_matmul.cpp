// x @ W.T for a few rows of x and an affine-quantized W, on the CPU (decode-time linears).
//
// MLX's CPU quantized_matmul runs ~1.3 G multiply-adds/s on one core for a single row,
// ~3x slower than an fp32 BLAS GEMV of the same matrix. Here eight codes at a time are
// shifted out of their packed word into vector lanes and converted in registers,
// multiplied with up to four rows of x at once (per group s * (x . codes) + b * sum(x)),
// and the rows of W are split over a few threads.

#include <cstring>
#include <memory>

#include "mlx/primitives.h"
#include "packed.h"

namespace optiq {
namespace {

constexpr int kRowsPerTask = 64;

struct MatmulProblem {
  int M, N, K, gs, bits;
  const float* x;  // [M, K], contiguous
  const uint8_t* w;
  int64_t w_row;  // bytes between rows of W
  const char *scales, *biases;
  int64_t s_row;  // bytes between rows of scales / biases
  float* y;       // [M, N]
};

// MR rows of x against rows [n0, n1) of W: per group, acc += x . codes (codes converted
// in registers, see codes8), total += s * acc; one horizontal sum per output.
template <int GS, int BITS, int MR>
OPTIQ_MULTIVERSION void matmul_rows(const MatmulProblem& P, const float* x, const float* xsum, int m0, int n0,
                                    int n1, const float* s, const float* z) {
  constexpr int NA = MR >= 4 ? 1 : 4 / MR;  // independent sums per row (FMA latency)
  const int K = P.K, G = K / GS;
  const int64_t row_bytes = int64_t(K) * BITS / 8;
  std::vector<uint8_t> padded;
  if constexpr (!word_aligned(BITS)) padded.assign(row_bytes + 8, 0);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = P.w + n * P.w_row;
    if constexpr (!word_aligned(BITS)) {  // codes8 reads a few bytes past a chunk
      std::memcpy(padded.data(), row, row_bytes);
      row = padded.data();
    }
    const float* sn = s + (n - n0) * G;
    const float* zn = z + (n - n0) * G;
    v8f total[MR] = {};
    float bias[MR] = {};
    for (int g = 0; g < G; ++g) {
      v8f acc[MR][NA] = {};
      for (int e = 0; e < GS; e += 8) {
        const v8f c = codes8<BITS>(row, g * GS + e);
        for (int m = 0; m < MR; ++m) acc[m][(e / 8) % NA] += load_f32x8(x + size_t(m) * K + g * GS + e) * c;
      }
      for (int m = 0; m < MR; ++m) {
        v8f sum = acc[m][0];
        for (int a = 1; a < NA; ++a) sum += acc[m][a];
        total[m] += sn[g] * sum;
        bias[m] += zn[g] * xsum[size_t(m) * G + g];
      }
    }
    for (int m = 0; m < MR; ++m) P.y[size_t(m0 + m) * P.N + n] = hsum(total[m]) + bias[m];
  }
}

template <int GS, int BITS>
void matmul_tile(const MatmulProblem& P, const float* xsum, int n0, int n1, const float* s, const float* z) {
  const int G = P.K / GS;
  int m = 0;
  for (; m + 4 <= P.M; m += 4) matmul_rows<GS, BITS, 4>(P, P.x + size_t(m) * P.K, xsum + size_t(m) * G, m, n0, n1, s, z);
  for (; m + 2 <= P.M; m += 2) matmul_rows<GS, BITS, 2>(P, P.x + size_t(m) * P.K, xsum + size_t(m) * G, m, n0, n1, s, z);
  for (; m < P.M; ++m) matmul_rows<GS, BITS, 1>(P, P.x + size_t(m) * P.K, xsum + size_t(m) * G, m, n0, n1, s, z);
}

template <int GS, typename S>
void matmul_task(const MatmulProblem& P, const float* xsum, int n0, int n1) {
  const int G = P.K / GS;
  std::vector<float> s((n1 - n0) * G), z((n1 - n0) * G);
  rows_as_float<S>(P.scales + n0 * P.s_row, P.s_row, n1 - n0, G, s.data());
  rows_as_float<S>(P.biases + n0 * P.s_row, P.s_row, n1 - n0, G, z.data());
  switch (P.bits) {
    case 2: matmul_tile<GS, 2>(P, xsum, n0, n1, s.data(), z.data()); break;
    case 3: matmul_tile<GS, 3>(P, xsum, n0, n1, s.data(), z.data()); break;
    case 4: matmul_tile<GS, 4>(P, xsum, n0, n1, s.data(), z.data()); break;
    case 5: matmul_tile<GS, 5>(P, xsum, n0, n1, s.data(), z.data()); break;
    case 6: matmul_tile<GS, 6>(P, xsum, n0, n1, s.data(), z.data()); break;
    default: matmul_tile<GS, 8>(P, xsum, n0, n1, s.data(), z.data());
  }
}

// Several products (one per gathered expert, or just one), their row tiles spread over
// the threads together.
template <typename S>
void run_matmuls(const std::vector<MatmulProblem>& problems) {
  if (problems.empty()) return;
  const int gs = problems[0].gs, K = problems[0].K, N = problems[0].N, G = K / gs;
  const int64_t tiles = (N + kRowsPerTask - 1) / kRowsPerTask;
  std::vector<std::vector<float>> xsums(problems.size());  // per-group sums of x (the biases' term)
  for (size_t i = 0; i < problems.size(); ++i) {
    const MatmulProblem& P = problems[i];
    xsums[i].assign(size_t(P.M) * G, 0.0f);
    for (int m = 0; m < P.M; ++m)
      for (int k = 0; k < K; ++k) xsums[i][size_t(m) * G + k / gs] += P.x[size_t(m) * K + k];
  }
  with_group_size(gs, [&]<int GS>() {
    parallel_for(int64_t(problems.size()) * tiles, [&](int64_t t) {
      const size_t i = size_t(t / tiles);
      const int n0 = int((t % tiles) * kRowsPerTask), n1 = std::min(N, n0 + kRowsPerTask);
      matmul_task<GS, S>(problems[i], xsums[i].data(), n0, n1);
    });
  });
}

void check_rows_contiguous(const std::vector<mx::array>& in, size_t first, size_t last) {
  for (size_t i = first; i < last; ++i)
    if (in[i].strides().back() != 1 || (in[i].shape(-2) > 1 && in[i].strides()[in[i].ndim() - 2] == 0))
      throw std::invalid_argument("[optiq.kernels] quantized weights need contiguous rows");
}

// The problem for x [M, K] (contiguous fp32) against expert `e` of w [.., N, K*bits/32].
MatmulProblem problem_for(const mx::array& w, const mx::array& s, const mx::array& z, const float* x, int M,
                          int64_t e, float* y, int bits, int gs) {
  const int nd = w.ndim();
  MatmulProblem P{};
  P.M = M, P.K = int(int64_t(w.shape(-1)) * 32 / bits), P.N = w.shape(-2), P.gs = gs, P.bits = bits;
  P.x = x, P.y = y;
  const int64_t ssize = mx::size_of(s.dtype());
  P.w = w.data<uint8_t>() + (nd == 3 ? e * int64_t(w.strides()[0]) * 4 : 0);
  P.w_row = int64_t(w.strides()[nd - 2]) * 4;
  P.scales = s.data<char>() + (nd == 3 ? e * int64_t(s.strides()[0]) * ssize : 0);
  P.biases = z.data<char>() + (nd == 3 ? e * int64_t(z.strides()[0]) * ssize : 0);
  P.s_row = int64_t(s.strides()[nd - 2]) * ssize;
  return P;
}

// What the plain and the gathered matmul share: the packed format, CPU only.
class PackedMatmul : public mx::Primitive {
 public:
  PackedMatmul(mx::Stream s, int bits, int group_size, const char* op)
      : mx::Primitive(s), bits_(bits), gs_(group_size), op_(op) {}

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("[optiq.kernels] ") + op_ + " runs on the CPU only");
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const PackedMatmul&>(other);
    return bits_ == o.bits_ && gs_ == o.gs_;
  }

 protected:
  int bits_, gs_;
  const char* op_;
};

class QuantizedMatmul : public PackedMatmul {
 public:
  QuantizedMatmul(mx::Stream s, int bits, int group_size) : PackedMatmul(s, bits, group_size, "quantized_matmul") {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    check_rows_contiguous(in, 1, 4);
    dispatch_cpu(stream(), in, outs[0], [bits = bits_, gs = gs_](const std::vector<mx::array>& in, mx::array& out) {
      const auto& x = in[0];
      const std::vector<MatmulProblem> one = {
          problem_for(in[1], in[2], in[3], x.data<float>(), x.shape(0), 0, out.data<float>(), bits, gs)};
      with_scale_type(in[2].dtype(), [&]<typename S>() { run_matmuls<S>(one); });
    });
  }

  // Gradient with respect to x (LoRA on a frozen quantized base): g @ dequantize(W).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a != 0) throw std::invalid_argument("[optiq.kernels] quantized_matmul: no gradient for the packed weights");
      grads.push_back(mx::quantized_matmul(cotangents[0], primals[1], primals[2], primals[3], false, gs_, bits_,
                                           "affine", stream()));
    }
    return grads;
  }

  const char* name() const override {
    return "OptiqQuantizedMatmul";
  }
};

class GatherQuantizedMatmul : public PackedMatmul {
 public:
  GatherQuantizedMatmul(mx::Stream s, int bits, int group_size)
      : PackedMatmul(s, bits, group_size, "gather_quantized_matmul") {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    check_rows_contiguous(in, 1, 4);
    dispatch_cpu(stream(), in, outs[0], [bits = bits_, gs = gs_](const std::vector<mx::array>& in, mx::array& out) {
      const auto &x = in[0], &w = in[1], &idx = in[4];
      const int T = x.shape(0), R = x.shape(1), K = x.shape(2), N = w.shape(1);
      const int64_t E = w.shape(0);
      const uint32_t* ids = idx.data<uint32_t>();
      float* y = out.data<float>();
      std::vector<MatmulProblem> problems;
      for (int t = 0; t < T; ++t) {
        if (int64_t(ids[t]) >= E) {  // out-of-range expert: NaNs, not a read past the pool
          std::fill(y + size_t(t) * R * N, y + size_t(t + 1) * R * N, NAN);
          continue;
        }
        problems.push_back(problem_for(w, in[2], in[3], x.data<float>() + size_t(t) * R * K, R, ids[t],
                                       y + size_t(t) * R * N, bits, gs));
      }
      with_scale_type(in[2].dtype(), [&]<typename S>() { run_matmuls<S>(problems); });
    });
  }

  // Gradient with respect to x: g @ dequantize(W[idx]).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a != 0) throw std::invalid_argument("[optiq.kernels] gather_quantized_matmul: gradient only for x");
      grads.push_back(mx::gather_qmm(cotangents[0], primals[1], primals[2], primals[3], std::nullopt, primals[4],
                                     false, gs_, bits_, "affine", std::nullopt, false, stream()));
    }
    return grads;
  }

  const char* name() const override {
    return "OptiqGatherQuantizedMatmul";
  }
};

}  // namespace

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int bits, int group_size) {
  check_bits(bits);
  check_group_size(group_size);
  check(x.ndim() == 2, "x must be [rows, K]");
  check(w.ndim() == 2 && scales.ndim() == 2 && biases.ndim() == 2, "w, scales and biases must be 2-D");
  check(w.dtype() == mx::uint32, "w must be uint32 (as mx.quantize packs it)");
  const int K = x.shape(1), N = w.shape(0);
  check(int64_t(w.shape(1)) * 32 / bits == K, "w's packed rows do not match x's last dimension at this bit width");
  check(K % group_size == 0 && scales.shape(1) == K / group_size && biases.shape(1) == K / group_size &&
            scales.shape(0) == N && biases.shape(0) == N,
        "scales/biases do not match w and the group size");
  check(scales.dtype() == biases.dtype() &&
            (scales.dtype() == mx::float16 || scales.dtype() == mx::bfloat16 || scales.dtype() == mx::float32),
        "scales and biases must share one float dtype");
  auto s = mx::default_stream(mx::Device::cpu);
  auto xc = mx::contiguous(mx::astype(x, mx::float32, s), false, s);
  return mx::array({x.shape(0), N}, mx::float32, std::make_shared<QuantizedMatmul>(s, bits, group_size),
                   {xc, w, scales, biases});
}

mx::array gather_quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                                  const mx::array& biases, const mx::array& indices, int bits, int group_size) {
  check_bits(bits);
  check_group_size(group_size);
  check(x.ndim() == 3, "x must be [T, rows, K]");
  check(w.ndim() == 3 && scales.ndim() == 3 && biases.ndim() == 3, "w, scales and biases must be [experts, N, *]");
  check(w.dtype() == mx::uint32, "w must be uint32 (as mx.quantize packs it)");
  check(indices.ndim() == 1 && indices.shape(0) == x.shape(0), "indices must be [T], one expert per row block of x");
  check(mx::issubdtype(indices.dtype(), mx::integer), "indices must be integers");
  const int K = x.shape(2), N = w.shape(1);
  check(int64_t(w.shape(2)) * 32 / bits == K, "w's packed rows do not match x's last dimension at this bit width");
  check(K % group_size == 0 && scales.shape(2) == K / group_size && biases.shape(2) == K / group_size &&
            scales.shape(1) == N && biases.shape(1) == N && scales.shape(0) == w.shape(0),
        "scales/biases do not match w and the group size");
  check(scales.dtype() == biases.dtype() &&
            (scales.dtype() == mx::float16 || scales.dtype() == mx::bfloat16 || scales.dtype() == mx::float32),
        "scales and biases must share one float dtype");
  auto s = mx::default_stream(mx::Device::cpu);
  auto xc = mx::contiguous(mx::astype(x, mx::float32, s), false, s);
  auto ic = mx::contiguous(mx::astype(indices, mx::uint32, s), false, s);
  return mx::array({x.shape(0), x.shape(1), N}, mx::float32,
                   std::make_shared<GatherQuantizedMatmul>(s, bits, group_size), {xc, w, scales, biases, ic});
}

}  // namespace optiq
