// Kernel templates of modkern.perturb (no torch include). Mirrors kernels/perturb.py: one warp
// per row of H features at a time (persistent grid-stride loop over rows, sized from the SM count
// and the kernel's occupancy), the row's mask read once, 16-byte accesses of the wider type
// (8-byte ones of the narrower) when H allows, fp32 math.
#pragma once

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "perturb.h"

namespace modkern {
namespace pert {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

struct Params {
  const void* a;
  const void* b;
  const bool* mask;
  void* out;
  int64_t N, H;
};

// out = a + (mask ? b : 0) in TA (BACKWARD = false); out = (mask ? a : 0) in TB (BACKWARD = true).
template <typename TA, typename TB, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) rows_kernel(const Params prm) {
  using TO = typename std::conditional<BACKWARD, TB, TA>::type;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t nvec = prm.H / VEC;
  const TA* a = static_cast<const TA*>(prm.a);
  const TB* b = static_cast<const TB*>(prm.b);
  TO* out = static_cast<TO*>(prm.out);
  for (int64_t r = warp; r < prm.N; r += nwarps) {
    const bool sel = prm.mask[r];
    const TA* ar = a + r * prm.H;
    const TB* br = b + r * prm.H;
    TO* orow = out + r * prm.H;
    if (BACKWARD && !sel) {
      const Pack<TO, VEC> z = zero_pack<TO, VEC>();
      for (int64_t v = lane; v < nvec; v += 32) st_global<TO, VEC>(orow + v * VEC, z);
      continue;
    }
    for (int64_t base = lane; base < nvec; base += 32 * kUnroll) {
      Pack<TA, VEC> pa[kUnroll];
      Pack<TB, VEC> pb[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + 32 * u;
        if (v < nvec) {
          pa[u] = ld_global<TA, VEC, true>(ar + v * VEC);
          if (!BACKWARD && sel) pb[u] = ld_global<TB, VEC, true>(br + v * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + 32 * u;
        if (v < nvec) {
          Pack<TO, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            float x = to_float(pa[u].e[k]);
            if (!BACKWARD && sel) x += to_float(pb[u].e[k]);
            o.e[k] = from_float<TO>(x);
          }
          st_global<TO, VEC>(orow + v * VEC, o);
        }
      }
    }
  }
}

template <typename TA, typename TB, bool BACKWARD>
cudaError_t launch_rows(const PerturbArgs& args, cudaStream_t stream) {
  if (args.N == 0 || args.H == 0) return cudaSuccess;
  constexpr int VW = static_cast<int>(16 / (sizeof(TA) > sizeof(TB) ? sizeof(TA) : sizeof(TB)));
  const int64_t align_a = static_cast<int64_t>(VW * sizeof(TA));
  const int64_t align_b = static_cast<int64_t>(VW * sizeof(TB));
  using TO = typename std::conditional<BACKWARD, TB, TA>::type;
  const int64_t align_o = static_cast<int64_t>(VW * sizeof(TO));
  auto al = [](const void* p, int64_t n) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % n == 0; };
  const bool vec_ok = args.H % VW == 0 && al(args.a, align_a) && al(args.b, align_b) && al(args.out, align_o);

  Params prm = {args.a, args.b, args.mask, args.out, args.N, args.H};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  DeviceInfo dev;
  if ((err = get_device_info(device, &dev)) != cudaSuccess) return err;
  const void* fptr = vec_ok ? reinterpret_cast<const void*>(&rows_kernel<TA, TB, VW, BACKWARD>)
                            : reinterpret_cast<const void*>(&rows_kernel<TA, TB, 1, BACKWARD>);
  int per_sm = 0;
  if ((err = max_blocks_per_sm(fptr, kThreads, 0, device, &per_sm)) != cudaSuccess) return err;
  // Persistent grid: every resident warp loops over rows.
  const int64_t warps_per_block = kThreads / 32;
  const int64_t needed = (args.N + warps_per_block - 1) / warps_per_block;
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * dev.sm_count;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, resident)));
  if (vec_ok) {
    rows_kernel<TA, TB, VW, BACKWARD><<<grid, kThreads, 0, stream>>>(prm);
  } else {
    rows_kernel<TA, TB, 1, BACKWARD><<<grid, kThreads, 0, stream>>>(prm);
  }
  return cudaGetLastError();
}

}  // namespace pert

template <typename TA, typename TB>
cudaError_t perturb_forward_typed(const PerturbArgs& args, cudaStream_t stream) {
  return pert::launch_rows<TA, TB, false>(args, stream);
}

template <typename TA, typename TB>
cudaError_t perturb_backward_typed(const PerturbArgs& args, cudaStream_t stream) {
  return pert::launch_rows<TA, TB, true>(args, stream);
}

#define MODKERN_INSTANTIATE_PERTURB(TA)                                                            \
  template cudaError_t perturb_forward_typed<TA, float>(const PerturbArgs&, cudaStream_t);         \
  template cudaError_t perturb_forward_typed<TA, __nv_bfloat16>(const PerturbArgs&, cudaStream_t); \
  template cudaError_t perturb_forward_typed<TA, __half>(const PerturbArgs&, cudaStream_t);        \
  template cudaError_t perturb_backward_typed<TA, float>(const PerturbArgs&, cudaStream_t);        \
  template cudaError_t perturb_backward_typed<TA, __nv_bfloat16>(const PerturbArgs&, cudaStream_t); \
  template cudaError_t perturb_backward_typed<TA, __half>(const PerturbArgs&, cudaStream_t);

}  // namespace modkern
