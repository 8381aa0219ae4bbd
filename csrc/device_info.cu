// Device queries and occupancy caches (host code only; compiled by nvcc so that the extension's
// .cpp glue needs no CUDA runtime link of its own).
#include <map>
#include <mutex>
#include <tuple>

#include "device_info.h"

namespace modkern {

namespace {

constexpr int kMaxDevices = 64;

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

cudaError_t get_device_info(int device, DeviceInfo* out) {
  static DeviceInfo cache[kMaxDevices];
  static bool filled[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(cache_mutex());
  if (!filled[device]) {
    DeviceInfo d;
    d.device = device;
    int cluster = 0;
    cudaError_t err;
    if ((err = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&d.l2_bytes, cudaDevAttrL2CacheSize, device)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
      return err;
    if ((err = cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)) !=
        cudaSuccess)
      return err;
    if ((err = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess)
      return err;
    if ((err = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, device)) != cudaSuccess)
      return err;
    if (cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, device) != cudaSuccess) {
      cudaGetLastError();  // older drivers: attribute unknown -> no clusters
      cluster = 0;
    }
    d.cluster_launch = cluster != 0 && d.cc_major >= 9;
    cache[device] = d;
    filled[device] = true;
  }
  *out = cache[device];
  return cudaSuccess;
}

cudaError_t allow_dynamic_smem(const void* func, size_t smem, int device) {
  if (smem <= 48 * 1024) return cudaSuccess;
  static std::map<std::tuple<const void*, int>, size_t> done;
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto key = std::make_tuple(func, device);
  auto it = done.find(key);
  if (it != done.end() && it->second >= smem) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess) done[key] = smem;
  return err;
}

cudaError_t max_blocks_per_sm(const void* func, int threads, size_t smem, int device, int* out) {
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  auto key = std::make_tuple(func, threads, smem, device);
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = cache.find(key);
    if (it != cache.end()) {
      *out = it->second;
      return cudaSuccess;
    }
  }
  cudaError_t err = allow_dynamic_smem(func, smem, device);
  if (err != cudaSuccess) return err;
  int n = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, func, threads, smem);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(cache_mutex());
  cache[key] = n;
  *out = n;
  return cudaSuccess;
}

cudaError_t max_active_clusters(const void* func, int threads, size_t smem, int cluster, int device, int* out) {
  static std::map<std::tuple<const void*, int, size_t, int, int>, int> cache;
  auto key = std::make_tuple(func, threads, smem, cluster, device);
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = cache.find(key);
    if (it != cache.end()) {
      *out = it->second;
      return cudaSuccess;
    }
  }
  cudaError_t err = allow_dynamic_smem(func, smem, device);
  if (err != cudaSuccess) return err;
  int n = 0;
  if (cluster <= 1) {
    DeviceInfo info;
    if ((err = get_device_info(device, &info)) != cudaSuccess) return err;
    int per_sm = 0;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, func, threads, smem)) != cudaSuccess) return err;
    n = per_sm * info.sm_count;
  } else {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(cluster, 1, 1);
    cfg.blockDim = dim3(threads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaOccupancyMaxActiveClusters(&n, func, &cfg);
    if (err != cudaSuccess) {
      // Not launchable as a cluster of this size (e.g. too much shared memory): report 0.
      cudaGetLastError();
      n = 0;
    }
  }
  std::lock_guard<std::mutex> lock(cache_mutex());
  cache[key] = n;
  *out = n;
  return cudaSuccess;
}

}  // namespace modkern
