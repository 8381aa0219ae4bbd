// Torch glue of the masked PGD step: checks, the partials scratch buffer, alpha / epsilon as
// device scalars (never read on the host), the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "adv_step.h"
#include "ops.h"
#include "torch_utils.h"

namespace modkern {

namespace {

void check_3d(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "modkern._C adv_step: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "modkern._C adv_step: ", name, " is on ", t.device(), ", delta on ",
              like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "modkern._C adv_step: ", name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
}

// alpha / epsilon given as a 0-dim tensor: on delta's device it is passed by pointer as fp32 (an
// asynchronous cast when needed, kept alive by the caller; never read on the host); a CPU 0-dim
// tensor is read on the host (no device synchronization) and passed by value.
std::optional<at::Tensor> device_scalar(const std::optional<at::Tensor>& t, const at::Tensor& like, double* value) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->dim() == 0, "modkern._C adv_step: alpha / epsilon tensors must be 0-dim");
  if (t->device().is_cpu()) {
    *value = t->item<double>();
    return std::nullopt;
  }
  TORCH_CHECK(t->device() == like.device(), "modkern._C adv_step: alpha / epsilon tensors must be on delta's device");
  return t->scalar_type() == at::kFloat ? *t : t->to(at::kFloat);
}

}  // namespace

at::Tensor adv_step(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& mask, at::Tensor out,
                    double alpha, const std::optional<at::Tensor>& alpha_t, double epsilon,
                    const std::optional<at::Tensor>& epsilon_t, int64_t step, int64_t norm) {
  TORCH_CHECK(delta.dim() == 3, "modkern._C adv_step: delta must be [B, L, H], got ", delta.sizes());
  check_3d("delta", delta, delta);
  check_3d("grad", grad, delta);
  check_3d("out", out, delta);
  TORCH_CHECK(out.scalar_type() == delta.scalar_type(), "modkern._C adv_step: out must have delta's dtype");
  TORCH_CHECK(mask.is_cuda() && mask.device() == delta.device() && mask.scalar_type() == at::kBool && mask.dim() == 2 &&
                  mask.size(0) == delta.size(0) && mask.size(1) == delta.size(1),
              "modkern._C adv_step: mask must be a bool [B, L] tensor on delta's device");
  TORCH_CHECK(step >= kStepRaw && step <= kStepLinf, "modkern._C adv_step: bad step code ", step);
  TORCH_CHECK(norm >= kNormNone && norm <= kNormL2Token, "modkern._C adv_step: bad norm code ", norm);

  const c10::cuda::CUDAGuard guard(delta.device());
  const int64_t B = delta.size(0), L = delta.size(1), H = delta.size(2);
  const std::optional<at::Tensor> a32 = device_scalar(alpha_t, delta, &alpha);
  const std::optional<at::Tensor> e32 = device_scalar(epsilon_t, delta, &epsilon);
  at::Tensor partials;
  if (adv_step_needs_partials(static_cast<int>(step), static_cast<int>(norm)) && B * L * H > 0) {
    partials = at::empty({B, adv_step_num_chunks(L), 4}, delta.options().dtype(at::kFloat));
  }

  AdvStepArgs a;
  a.delta_dtype = to_dtype(delta.scalar_type());
  a.grad_dtype = to_dtype(grad.scalar_type());
  a.delta = delta.data_ptr();
  a.grad = grad.data_ptr();
  a.mask = mask.data_ptr<bool>();
  a.out = out.data_ptr();
  a.partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  a.alpha_ptr = a32.has_value() ? a32->data_ptr<float>() : nullptr;
  a.eps_ptr = e32.has_value() ? e32->data_ptr<float>() : nullptr;
  a.alpha = static_cast<float>(alpha);
  a.eps = static_cast<float>(epsilon);
  a.B = B;
  a.L = L;
  a.H = H;
  a.sdb = delta.stride(0);
  a.sdl = delta.stride(1);
  a.sdh = delta.stride(2);
  a.sgb = grad.stride(0);
  a.sgl = grad.stride(1);
  a.sgh = grad.stride(2);
  a.smb = mask.stride(0);
  a.sml = mask.stride(1);
  a.sob = out.stride(0);
  a.sol = out.stride(1);
  a.soh = out.stride(2);
  a.step = static_cast<int>(step);
  a.norm = static_cast<int>(norm);
  check_cuda(launch_adv_step(a, c10::cuda::getCurrentCUDAStream()), "adv_step");
  return out;
}

}  // namespace modkern
