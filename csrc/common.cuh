// Device helpers shared by modkern's CUDA kernels. No torch include: every .cu file of csrc/
// compiles standalone with nvcc (see csrc/README.md).
//
//  * element types: float, __nv_bfloat16, __half; all math in fp32 (to_float / from_float round
//    to nearest even on the way back),
//  * Pack<T, N>: N elements loaded / stored as one 16-byte access when N * sizeof(T) == 16
//    (ld.global.nc.v4 / st.global.cs.v4), element by element otherwise (unaligned rows),
//  * warp-shuffle + shared-memory reductions of K values at once, extended across a thread-block
//    cluster through distributed shared memory on sm_90 (cluster size 1 elsewhere).
#pragma once

#include <cooperative_groups.h>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace modkern {

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Elements per 16-byte access.
template <typename T>
__host__ __device__ constexpr int vec16() { return static_cast<int>(16 / sizeof(T)); }

// ---------------------------------------------------------------------------------------------
// Packs: N consecutive elements, one 16-byte memory instruction when they fill 16 bytes.
// ---------------------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T e[N];
};

// The integer type of one memory instruction moving a whole pack (16, 8 or 4 bytes), if any.
template <int BYTES>
struct RawWord {
  using type = void;
};
template <>
struct RawWord<16> {
  using type = uint4;
};
template <>
struct RawWord<8> {
  using type = uint2;
};
template <>
struct RawWord<4> {
  using type = unsigned int;
};

template <typename T, int N>
using RawOf = typename RawWord<static_cast<int>(sizeof(T) * N)>::type;

template <typename T, int N>
__host__ __device__ constexpr bool is_word() {
  return sizeof(T) * N == 16 || sizeof(T) * N == 8 || sizeof(T) * N == 4;
}

template <typename T, int N, typename W>
union PackBits {
  W u;
  Pack<T, N> p;
};

// Global load through the read-only path; LAST marks the last read of the data (ld.global.cs,
// evict first). One instruction per pack when it spans 4, 8 or 16 bytes (the caller guarantees
// the alignment), element by element otherwise.
template <typename T, int N, bool LAST = false>
__device__ __forceinline__ Pack<T, N> ld_global(const T* ptr) {
  if constexpr (is_word<T, N>()) {
    using W = RawOf<T, N>;
    PackBits<T, N, W> b;
    b.u = LAST ? __ldcs(reinterpret_cast<const W*>(ptr)) : __ldg(reinterpret_cast<const W*>(ptr));
    return b.p;
  } else {
    Pack<T, N> out;
#pragma unroll
    for (int i = 0; i < N; ++i) out.e[i] = ptr[i];
    return out;
  }
}

// Streaming global store (st.global.cs: outputs are not read again by the kernel, keep L2 for
// the inputs).
template <typename T, int N>
__device__ __forceinline__ void st_global(T* ptr, const Pack<T, N>& v) {
  if constexpr (is_word<T, N>()) {
    using W = RawOf<T, N>;
    PackBits<T, N, W> b;
    b.p = v;
    __stcs(reinterpret_cast<W*>(ptr), b.u);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) ptr[i] = v.e[i];
  }
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> ld_shared(const T* ptr) {
  return *reinterpret_cast<const Pack<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void st_shared(T* ptr, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(ptr) = v;
}

template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& v, float scale, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(v.e[i]) * scale;
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> pack(const float (&x)[N]) {
  Pack<T, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) out.e[i] = from_float<T>(x[i]);
  return out;
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> zero_pack() {
  float z[N];
#pragma unroll
  for (int i = 0; i < N; ++i) z[i] = 0.f;
  return pack<T, N>(z);
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90+). Elsewhere a "cluster" is the block itself.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned cluster_nblocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1u;
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0u;
#endif
}

// Barrier over every thread of every block of the cluster (release / acquire on shared memory).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// Address of the same shared variable in block `rank` of the cluster.
template <typename T>
__device__ __forceinline__ T* cluster_map(T* ptr, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(ptr, rank);
#else
  (void)rank;
  return ptr;
#endif
}

// ---------------------------------------------------------------------------------------------
// Reductions of K floats at once. An Op provides identity(v) and combine(acc, other); combine must
// be commutative so that every lane of a xor-butterfly ends with the same bits.
// ---------------------------------------------------------------------------------------------

template <int K>
struct SumOp {
  __device__ __forceinline__ static void identity(float (&v)[K]) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = 0.f;
  }
  __device__ __forceinline__ static void combine(float (&acc)[K], const float (&o)[K]) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] += o[k];
  }
};

// exp(m_old - m_new) for a running max that may still be -inf (then its sum is 0 anyway).
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == neg_inf() ? 0.f : __expf(m_old - m_new);
}

// K/2 (max, sum of exp(x - max)) pairs: values [2j] are maxima, [2j + 1] the sums.
template <int K>
struct LseOp {
  static_assert(K % 2 == 0, "LseOp reduces (max, sum) pairs");
  __device__ __forceinline__ static void identity(float (&v)[K]) {
#pragma unroll
    for (int k = 0; k < K; k += 2) {
      v[k] = neg_inf();
      v[k + 1] = 0.f;
    }
  }
  __device__ __forceinline__ static void combine(float (&acc)[K], const float (&o)[K]) {
#pragma unroll
    for (int k = 0; k < K; k += 2) {
      const float m = fmaxf(acc[k], o[k]);
      acc[k + 1] = acc[k + 1] * rescale(acc[k], m) + o[k + 1] * rescale(o[k], m);
      acc[k] = m;
    }
  }
};

template <int K, class Op>
__device__ __forceinline__ void warp_reduce(float (&v)[K]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float o[K];
#pragma unroll
    for (int k = 0; k < K; ++k) o[k] = __shfl_xor_sync(0xffffffffu, v[k], off);
    Op::combine(v, o);
  }
}

// Reduce v over the block, then over the cluster; every thread of every block of the cluster
// returns the same bits (cluster peers are combined in rank order).
//
// warp_buf: shared float[32][K]; slot: shared float[K] that peers read through DSMEM. The caller
// alternates between two slots for consecutive reductions: a slot is rewritten only after the
// next reduction's barrier, which every peer reaches after reading it. blockDim.x must be a
// multiple of 32. Must be reached by every thread of every block of the cluster.
template <int K, class Op>
__device__ __forceinline__ void block_cluster_reduce(float (&v)[K], float (*warp_buf)[K], float* slot,
                                                     unsigned csize) {
  warp_reduce<K, Op>(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_buf[warp][k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
    float w[K];
    if (lane < nwarps) {
#pragma unroll
      for (int k = 0; k < K; ++k) w[k] = warp_buf[lane][k];
    } else {
      Op::identity(w);
    }
    warp_reduce<K, Op>(w);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) slot[k] = w[k];
    }
  }
  if (csize == 1) {
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = slot[k];
    return;
  }
  cluster_sync();
  const float* s0 = cluster_map(slot, 0);
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = s0[k];
  for (unsigned r = 1; r < csize; ++r) {
    const float* sr = cluster_map(slot, r);
    float o[K];
#pragma unroll
    for (int k = 0; k < K; ++k) o[k] = sr[k];
    Op::combine(v, o);
  }
}

}  // namespace modkern
