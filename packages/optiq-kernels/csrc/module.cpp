// Python bindings of OptiQ's CPU kernels (nanobind, sharing MLX's array type).

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "mlx/version.h"
#include "packed.h"

namespace nb = nanobind;

NB_MODULE(_ext, m) {
  m.doc() = "OptiQ CPU kernels for MLX";
  m.attr("MLX_VERSION") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
                          std::to_string(MLX_VERSION_PATCH);
  m.def("threads", &optiq::thread_count,
        "Threads the kernels split work over (OPTIQ_KERNEL_THREADS, default: the CPUs this process may use, at most 8).");
  m.def("quantized_decode_attention", &optiq::quantized_decode_attention, nb::arg("q"), nb::arg("k_codes"),
        nb::arg("k_scales"), nb::arg("k_biases"), nb::arg("v_codes"), nb::arg("v_scales"), nb::arg("v_biases"),
        nb::arg("mask").none() = nb::none(), nb::arg("k_bits"), nb::arg("v_bits"), nb::arg("group_size"),
        nb::arg("hadamard") = false,
        "softmax(q @ K^T + mask) @ V over packed K/V codes; q [B, H_kv, rows, D] already scaled. With hadamard, "
        "K/V were stored rotated by the per-group Hadamard R: q is rotated in and the output back. Returns fp32.");
  m.def("quantized_matmul", &optiq::quantized_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("bits"), nb::arg("group_size"),
        "x [rows, K] @ dequantize(w).T for an affine-quantized w [N, K*bits/32]. Returns fp32 [rows, N].");
  m.def("gather_quantized_matmul", &optiq::gather_quantized_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("indices"), nb::arg("bits"), nb::arg("group_size"),
        "x[t] [rows, K] @ dequantize(w[indices[t]]).T for a pool of experts w [E, N, K*bits/32]. "
        "Returns fp32 [T, rows, N].");
}
