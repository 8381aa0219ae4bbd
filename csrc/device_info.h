// Host-side device queries and launch helpers shared by the launchers (no torch include).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace modkern {

// Element types the kernels are instantiated for.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

struct DeviceInfo {
  int device = -1;
  int sm_count = 0;          // cudaDevAttrMultiProcessorCount
  int l2_bytes = 0;          // cudaDevAttrL2CacheSize
  int smem_optin = 0;        // cudaDevAttrMaxSharedMemoryPerBlockOptin (bytes per block)
  int smem_per_sm = 0;       // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int cc_major = 0;
  int cc_minor = 0;
  bool cluster_launch = false;  // cudaDevAttrClusterLaunch (sm_90+)
};

// Queried once per device with cudaDeviceGetAttribute (cheap, no synchronization), then cached.
cudaError_t get_device_info(int device, DeviceInfo* out);

// Blocks of `func` that fit on one SM with `threads` threads and `smem` bytes of dynamic shared
// memory (cudaOccupancyMaxActiveBlocksPerMultiprocessor), cached per (func, threads, smem, device).
cudaError_t max_blocks_per_sm(const void* func, int threads, size_t smem, int device, int* out);

// Clusters of `cluster` blocks of `func` that can be co-resident on the device
// (cudaOccupancyMaxActiveClusters), cached likewise. 0 means the configuration cannot launch.
cudaError_t max_active_clusters(const void* func, int threads, size_t smem, int cluster, int device, int* out);

// Raise the dynamic shared memory limit of `func` to `smem` bytes when it exceeds the default
// 48 KiB (once per function and device).
cudaError_t allow_dynamic_smem(const void* func, size_t smem, int device);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace modkern
