// Native early-bird mask update (SPEC §3), CPU implementation, schema and Meta kernel.
//
// torch.ops.ebkernels_native.early_bird_update(gammas, ks, ring, slot) -> (packed, dist, thr)
//   gammas float32 [total]; ks int32 [R] (ks[r] = floor(total * ratio_r)); ring int32 [R, H, W]
//   (W = ceil(total / 32), mutated: the new masks go to ring[:, slot]).
//   thr[r] = sort(|gamma|)[ks[r]]; keep = |gamma| > thr[r]; channel i -> word i / 32, bit i % 32;
//   dist[r, h] = popcount(packed[r] ^ ring[r, h]) / total (float64), 0 for h == slot.
// Same contract as ebkernels/ops/early_bird_mask.py (reference and Triton kernel); the Python tests
// check all of them against the sort-based reference bit for bit.
//
// The namespace ebkernels_native keeps these ops apart from the Python custom ops under ebkernels::.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

namespace ebkernels_native {

// Shared by the CPU, CUDA and Meta kernels: the argument contract, with messages naming the argument.
void check_early_bird_args(const at::Tensor& gammas, const at::Tensor& ks, const at::Tensor& ring,
                           int64_t slot) {
  TORCH_CHECK(gammas.scalar_type() == at::kFloat && gammas.dim() == 1,
              "early_bird_update: gammas must be a 1-D float32 tensor, got ", gammas.scalar_type(), " ",
              gammas.sizes());
  const int64_t total = gammas.numel();
  TORCH_CHECK(total >= 1 && total <= INT32_MAX, "early_bird_update: gammas has ", total,
              " channels; accepted: 1 to 2^31-1");
  TORCH_CHECK(ring.scalar_type() == at::kInt && ring.dim() == 3 && ring.size(1) >= 1 &&
                  ring.size(2) == (total + 31) / 32,
              "early_bird_update: ring must be int32 [R, H>=1, ", (total + 31) / 32, "] for total=", total,
              ", got ", ring.scalar_type(), " ", ring.sizes());
  TORCH_CHECK(ks.scalar_type() == at::kInt && ks.dim() == 1 && ks.size(0) == ring.size(0),
              "early_bird_update: ks must be int32 of shape (", ring.size(0), ",), got ", ks.scalar_type(),
              " ", ks.sizes());
  TORCH_CHECK(slot >= 0 && slot < ring.size(1), "early_bird_update: slot=", slot,
              " is out of range; accepted: [0, ", ring.size(1), ")");
  TORCH_CHECK(gammas.device() == ks.device() && gammas.device() == ring.device(),
              "early_bird_update: gammas (", gammas.device(), "), ks (", ks.device(), ") and ring (",
              ring.device(), ") must share a device");
  TORCH_CHECK(gammas.is_contiguous() && ks.is_contiguous() && ring.is_contiguous(),
              "early_bird_update: gammas, ks and ring must be contiguous");
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> early_bird_update_cpu(const at::Tensor& gammas,
                                                                     const at::Tensor& ks, const at::Tensor& ring,
                                                                     int64_t slot) {
  check_early_bird_args(gammas, ks, ring, slot);
  const int64_t total = gammas.numel();
  const int64_t R = ring.size(0), H = ring.size(1), W = ring.size(2);
  const float* g = gammas.data_ptr<float>();
  const int32_t* kp = ks.data_ptr<int32_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(kp[r] >= 0 && kp[r] < total, "early_bird_update: ks[", r, "]=", kp[r],
                " is out of range; accepted: [0, ", total, ")");
  }

  // |gamma| as float bits: for non-negative floats the bits order like the values (NaN above inf,
  // as torch.sort orders NaN last), so an integer selection gives the sorted position exactly.
  std::vector<uint32_t> keys(total);
  std::vector<float> absg(total);
  for (int64_t i = 0; i < total; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &g[i], sizeof(bits));
    keys[i] = bits & 0x7FFFFFFFu;
    std::memcpy(&absg[i], &keys[i], sizeof(float));
  }

  // Thresholds: nth_element in ascending k order, each on the part right of the previous one.
  std::vector<int64_t> order(R);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return kp[a] < kp[b]; });
  std::vector<float> thr_values(R);
  int64_t lo = 0;
  for (int64_t r : order) {
    const int64_t k = kp[r];
    if (k >= lo) {
      std::nth_element(keys.begin() + lo, keys.begin() + k, keys.end());
      lo = k;
    }  // else: equal to the previous k, keys[k] is already in place
    std::memcpy(&thr_values[r], &keys[k], sizeof(float));
  }

  auto packed = at::empty({R, W}, ring.options());
  auto dist = at::empty({R, H}, gammas.options().dtype(at::kDouble));
  auto thr = at::empty({R}, gammas.options());
  int32_t* out = packed.data_ptr<int32_t>();
  int32_t* hist = ring.data_ptr<int32_t>();
  double* dp = dist.data_ptr<double>();
  float* tp = thr.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float t = thr_values[r];
    tp[r] = t;
    std::vector<int64_t> counts(H, 0);
    int32_t* ring_r = hist + r * H * W;
    for (int64_t w = 0; w < W; ++w) {
      uint32_t word = 0;
      const int64_t base = w * 32;
      const int64_t n = std::min<int64_t>(32, total - base);
      for (int64_t b = 0; b < n; ++b) {
        word |= static_cast<uint32_t>(absg[base + b] > t) << b;  // NaN > t is false: never kept
      }
      for (int64_t h = 0; h < H; ++h) {
        if (h != slot) {
          counts[h] += __builtin_popcount(word ^ static_cast<uint32_t>(ring_r[h * W + w]));
        }
      }
      out[r * W + w] = static_cast<int32_t>(word);
      ring_r[slot * W + w] = static_cast<int32_t>(word);
    }
    for (int64_t h = 0; h < H; ++h) {
      dp[r * H + h] = static_cast<double>(counts[h]) / static_cast<double>(total);
    }
  }
  return {packed, dist, thr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> early_bird_update_meta(const at::Tensor& gammas,
                                                                      const at::Tensor& ks, const at::Tensor& ring,
                                                                      int64_t slot) {
  const int64_t R = ring.size(0), H = ring.size(1), W = ring.size(2);
  return {at::empty({R, W}, ring.options()), at::empty({R, H}, gammas.options().dtype(at::kDouble)),
          at::empty({R}, gammas.options())};
}

}  // namespace
}  // namespace ebkernels_native

TORCH_LIBRARY(ebkernels_native, m) {
  m.def("early_bird_update(Tensor gammas, Tensor ks, Tensor(a!) ring, int slot) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ebkernels_native, CPU, m) {
  m.impl("early_bird_update", &ebkernels_native::early_bird_update_cpu);
}

TORCH_LIBRARY_IMPL(ebkernels_native, Meta, m) {
  m.impl("early_bird_update", &ebkernels_native::early_bird_update_meta);
}

// `import ebkernels._C` runs the registrations above; the module itself needs no Python functions,
// so it is created without pybind11 (much faster to compile). The extension's only PyInit lives here.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
