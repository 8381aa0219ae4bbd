// Torch glue of the divergence kernels: argument checks, output allocation, the current stream,
// and the on-device CSR of shared reference rows. No host synchronization.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

#include "divergence.h"
#include "ops.h"
#include "torch_utils.h"

namespace modkern {

namespace {

std::mutex g_tuning_mutex;
DivTuning g_tuning;
DivLaunchInfo g_last_launch;

void check_logits(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "modkern._C: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, "modkern._C: ", name, " must be 2-D [rows, V], got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "modkern._C: ", name, " must have unit stride along V");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) > 0, "modkern._C: ", name, " must not be expanded along rows");
}

void check_rows(const char* name, const at::Tensor& t, int64_t rows, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "modkern._C: ", name, " is on ", t.device(), " but the logits are on ",
              like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "modkern._C: ", name, " must have shape (", rows, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "modkern._C: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "modkern._C: ", name, " must be contiguous");
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

at::Tensor empty_grad(const at::Tensor& like, bool wanted) {
  return wanted ? at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, like.options());
}

// dst = src * grad_rows[:, None] (0 on masked-out rows), in src's dtype.
at::Tensor scale_rows(const at::Tensor& src, const at::Tensor& grad_rows, const std::optional<at::Tensor>& mask,
                      cudaStream_t stream) {
  check_logits("saved gradient", src);
  at::Tensor dst = empty_grad(src, true);
  ScaleRowsArgs a;
  a.dtype = to_dtype(src.scalar_type());
  a.src = src.data_ptr();
  a.dst = dst.data_ptr();
  a.scale = grad_rows.data_ptr<float>();
  a.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  a.rows = src.size(0);
  a.vocab = src.size(1);
  a.stride_src = row_stride(src);
  a.stride_dst = row_stride(dst);
  check_cuda(launch_divergence_scale_rows(a, stream), "divergence scale_rows");
  return dst;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward(
    const at::Tensor& p, const at::Tensor& q, const std::optional<at::Tensor>& ref_index,
    const std::optional<at::Tensor>& mask, int64_t kind, double beta, double inv_temperature, bool need_grad_p,
    bool need_grad_q) {
  check_logits("p", p);
  check_logits("q", q);
  TORCH_CHECK(p.device() == q.device(), "modkern._C: p and q must be on one device");
  TORCH_CHECK(p.scalar_type() == q.scalar_type(), "modkern._C: p and q must have the same dtype");
  TORCH_CHECK(p.size(1) == q.size(1), "modkern._C: p and q must have the same vocabulary size");
  TORCH_CHECK(kind >= 0 && kind <= 3, "modkern._C: kind must be 0..3, got ", kind);
  const int64_t rows = q.size(0);
  if (ref_index.has_value()) {
    check_rows("ref_index", *ref_index, rows, at::kLong, q);
  } else {
    TORCH_CHECK(p.size(0) == rows, "modkern._C: p and q must have the same number of rows without ref_index");
  }
  if (mask.has_value()) check_rows("mask", *mask, rows, at::kBool, q);

  const c10::cuda::CUDAGuard guard(q.device());
  const bool write_gp = need_grad_p && !ref_index.has_value();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32);
  at::Tensor stats = at::empty({rows, kStatsWidth}, f32);
  at::Tensor grad_p = empty_grad(p, write_gp);
  at::Tensor grad_q = empty_grad(q, need_grad_q);

  DivForwardArgs a;
  a.dtype = to_dtype(q.scalar_type());
  a.p = p.data_ptr();
  a.q = q.data_ptr();
  a.ref = ref_index.has_value() ? ref_index->data_ptr<int64_t>() : nullptr;
  a.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.grad_p = write_gp ? grad_p.data_ptr() : nullptr;
  a.grad_q = need_grad_q ? grad_q.data_ptr() : nullptr;
  a.rows = rows;
  a.vocab = q.size(1);
  a.stride_p = row_stride(p);
  a.stride_q = row_stride(q);
  a.stride_gp = write_gp ? row_stride(grad_p) : 0;
  a.stride_gq = need_grad_q ? row_stride(grad_q) : 0;
  a.kind = static_cast<int>(kind);
  a.beta = static_cast<float>(beta);
  a.inv_t = static_cast<float>(inv_temperature);

  DivTuning tuning;
  {
    std::lock_guard<std::mutex> lock(g_tuning_mutex);
    tuning = g_tuning;
  }
  DivLaunchInfo info;
  check_cuda(launch_divergence_forward(a, tuning, c10::cuda::getCurrentCUDAStream(), &info), "divergence_forward");
  if (rows > 0) {
    std::lock_guard<std::mutex> lock(g_tuning_mutex);
    g_last_launch = info;
  }
  return {loss, stats, grad_p, grad_q};
}

std::tuple<at::Tensor, at::Tensor> divergence_backward(
    const at::Tensor& grad_rows_in, const at::Tensor& p, const at::Tensor& q,
    const std::optional<at::Tensor>& ref_index,
    const std::optional<at::Tensor>& mask, const at::Tensor& stats, const at::Tensor& saved_grad_p,
    const at::Tensor& saved_grad_q, int64_t kind, double beta, double inv_temperature, bool need_grad_p,
    bool need_grad_q) {
  // p / q are read only by the shared-P path below; elsewhere they may be stride-0 stand-ins that
  // carry the logits' shape and dtype (modkern/ops/divergence.py saves no logits it does not read).
  TORCH_CHECK(p.dim() == 2 && q.dim() == 2, "modkern._C: p and q must be 2-D [rows, V]");
  TORCH_CHECK(kind >= 0 && kind <= 3, "modkern._C: kind must be 0..3, got ", kind);
  const int64_t rows = q.size(0);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad_rows = grad_rows_in.to(at::kFloat).contiguous();
  check_rows("grad_rows", grad_rows, rows, at::kFloat, q);
  if (mask.has_value()) check_rows("mask", *mask, rows, at::kBool, q);

  at::Tensor grad_q = need_grad_q ? scale_rows(saved_grad_q, grad_rows, mask, stream) : at::empty({0}, q.options());
  if (!need_grad_p) return {at::empty({0}, p.options()), grad_q};
  if (!ref_index.has_value()) return {scale_rows(saved_grad_p, grad_rows, mask, stream), grad_q};

  check_logits("p", p);
  check_logits("q", q);
  // Copies of each P row: order[start[n] : start[n] + count[n]] (stable argsort, scatter_add,
  // exclusive cumsum: all on device, no synchronization, deterministic).
  check_rows("ref_index", *ref_index, rows, at::kLong, q);
  TORCH_CHECK(stats.is_cuda() && stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == rows && stats.size(1) == kStatsWidth,
              "modkern._C: stats must be a contiguous float32 CUDA tensor [rows, 6]");
  const int64_t num_p_rows = p.size(0);
  const at::Tensor order = at::argsort(*ref_index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor count = at::zeros({num_p_rows}, ref_index->options());
  count.scatter_add_(0, *ref_index, at::ones_like(*ref_index));
  const at::Tensor start = at::cumsum(count, 0) - count;
  at::Tensor grad_p = empty_grad(p, true);

  GradPSharedArgs a;
  a.dtype = to_dtype(p.scalar_type());
  a.p = p.data_ptr();
  a.q = q.data_ptr();
  a.order = order.data_ptr<int64_t>();
  a.start = start.data_ptr<int64_t>();
  a.count = count.data_ptr<int64_t>();
  a.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  a.grad_rows = grad_rows.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.grad_p = grad_p.data_ptr();
  a.num_p_rows = num_p_rows;
  a.vocab = p.size(1);
  a.stride_p = row_stride(p);
  a.stride_q = row_stride(q);
  a.stride_gp = row_stride(grad_p);
  a.kind = static_cast<int>(kind);
  a.beta = static_cast<float>(beta);
  a.inv_t = static_cast<float>(inv_temperature);
  check_cuda(launch_divergence_grad_p_shared(a, stream), "divergence grad_p_shared");
  return {grad_p, grad_q};
}

void divergence_set_tuning(int64_t cluster, int64_t cache, int64_t threads) {
  std::lock_guard<std::mutex> lock(g_tuning_mutex);
  g_tuning.cluster = static_cast<int>(cluster);
  g_tuning.cache = static_cast<int>(cache);
  g_tuning.threads = static_cast<int>(threads);
}

pybind11::dict divergence_last_launch() {
  DivLaunchInfo info;
  {
    std::lock_guard<std::mutex> lock(g_tuning_mutex);
    info = g_last_launch;
  }
  pybind11::dict d;
  d["cluster"] = info.cluster;
  d["cached"] = info.cached;
  d["threads"] = info.threads;
  d["vec"] = info.vec;
  d["grid"] = info.grid;
  d["slice"] = info.slice;
  d["smem"] = info.smem;
  return d;
}

}  // namespace modkern
