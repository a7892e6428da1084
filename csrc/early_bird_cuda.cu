// Native early-bird mask update (SPEC §3), CUDA implementation (compiled only where torch has CUDA).
// Contract and schema: see early_bird.cpp. One launch, one block of 1024 threads:
//   1. radix select per ratio on the float bits of |gamma| (4 passes of 8-bit digits, shared-memory
//      histograms; bits of non-negative floats order like the values, NaN above inf),
//   2. packing with __ballot_sync (warp w's lanes hold channels 32w..32w+31, so the ballot IS word w),
//   3. XOR with the H history words and __popc, counts summed in shared memory,
//   4. dist = count / total in float64 (correctly rounded, equal to the Python reference).
// Like the Triton kernel it is a single block: a threshold needs a global histogram, and BN channel
// sets are a few thousand channels. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10 only: no cuBLAS/cuSPARSE headers needed
#include <torch/library.h>

#include <tuple>

namespace ebkernels_native {

void check_early_bird_args(const at::Tensor& gammas, const at::Tensor& ks, const at::Tensor& ring, int64_t slot);

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ unsigned abs_key(const float* g, int i) {
  return __float_as_uint(g[i]) & 0x7FFFFFFFu;
}

__global__ void __launch_bounds__(kThreads)
early_bird_update_kernel(const float* __restrict__ g, const int* __restrict__ ks, float* __restrict__ thr,
                         int* __restrict__ ring, int* __restrict__ out, double* __restrict__ dist, int total,
                         int n_words, int n_ratios, int hist_len, int slot) {
  __shared__ unsigned hist[256];
  __shared__ unsigned sh_prefix;
  __shared__ int sh_k;
  extern __shared__ unsigned long long counts[];  // [hist_len]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int r = 0; r < n_ratios; ++r) {
    if (tid == 0) {
      sh_prefix = 0u;
      sh_k = ks[r];
    }
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      const unsigned above = pass == 0 ? 0u : ~((1u << (shift + 8)) - 1u);  // bits already selected
      if (tid < 256) hist[tid] = 0u;
      __syncthreads();
      const unsigned prefix = sh_prefix;
      for (int i = tid; i < total; i += kThreads) {
        const unsigned key = abs_key(g, i);
        if ((key & above) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {  // 256 bins: a serial scan is cheaper than another barrier round
        int k = sh_k;
        unsigned d = 0;
        while (d < 255u && k >= static_cast<int>(hist[d])) {  // d < 255 guards a bad ks[r]
          k -= hist[d];
          ++d;
        }
        sh_prefix = prefix | (d << shift);
        sh_k = k;
      }
      __syncthreads();
    }
    const float t = __uint_as_float(sh_prefix);
    if (tid == 0) thr[r] = t;
    for (int h = tid; h < hist_len; h += kThreads) counts[h] = 0ull;
    __syncthreads();

    int* ring_r = ring + static_cast<long long>(r) * hist_len * n_words;
    for (int w = warp; w < n_words; w += kWarps) {
      const int i = w * 32 + lane;
      const bool keep = i < total && fabsf(g[i]) > t;  // NaN > t is false: never kept
      const unsigned word = __ballot_sync(0xffffffffu, keep);
      for (int h = lane; h < hist_len; h += 32) {
        if (h != slot) {
          const unsigned old = static_cast<unsigned>(ring_r[static_cast<long long>(h) * n_words + w]);
          atomicAdd(&counts[h], static_cast<unsigned long long>(__popc(old ^ word)));
        }
      }
      if (lane == 0) {
        out[static_cast<long long>(r) * n_words + w] = static_cast<int>(word);
        ring_r[static_cast<long long>(slot) * n_words + w] = static_cast<int>(word);
      }
    }
    __syncthreads();
    for (int h = tid; h < hist_len; h += kThreads) {
      dist[r * hist_len + h] = static_cast<double>(counts[h]) / static_cast<double>(total);
    }
    __syncthreads();  // counts and hist are reused by the next ratio
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> early_bird_update_cuda(const at::Tensor& gammas,
                                                                      const at::Tensor& ks, const at::Tensor& ring,
                                                                      int64_t slot) {
  check_early_bird_args(gammas, ks, ring, slot);
  const c10::cuda::CUDAGuard guard(gammas.device());
  const int64_t total = gammas.numel();
  const int64_t R = ring.size(0), H = ring.size(1), W = ring.size(2);
  TORCH_CHECK(H <= 4096, "early_bird_update: ring holds ", H, " masks per ratio; accepted: at most 4096");
  auto packed = at::empty({R, W}, ring.options());
  auto dist = at::empty({R, H}, gammas.options().dtype(at::kDouble));
  auto thr = at::empty({R}, gammas.options());
  // ks values are checked on the host by the Python wrapper (reading them here would synchronise)
  auto stream = c10::cuda::getCurrentCUDAStream();
  early_bird_update_kernel<<<1, kThreads, H * sizeof(unsigned long long), stream>>>(
      gammas.data_ptr<float>(), ks.data_ptr<int>(), thr.data_ptr<float>(), ring.data_ptr<int>(),
      packed.data_ptr<int>(), dist.data_ptr<double>(), static_cast<int>(total), static_cast<int>(W),
      static_cast<int>(R), static_cast<int>(H), static_cast<int>(slot));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, dist, thr};
}

}  // namespace
}  // namespace ebkernels_native

TORCH_LIBRARY_IMPL(ebkernels_native, CUDA, m) {
  m.impl("early_bird_update", &ebkernels_native::early_bird_update_cuda);
}
