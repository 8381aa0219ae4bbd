// Torch glue of modkern.perturb: checks and the current stream; the outputs are allocated by the
// Python wrapper (modkern/cuda_backend/perturb.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "perturb.h"
#include "torch_utils.h"

namespace modkern {

namespace {

void check_rows_of(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "modkern._C perturb: ", name, " must be on ", like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "modkern._C perturb: ", name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "modkern._C perturb: ", name, " must be contiguous");
}

void check_mask(const at::Tensor& mask, const at::Tensor& like) {
  TORCH_CHECK(like.dim() >= 1, "modkern._C perturb: tensors must have a feature dimension");
  TORCH_CHECK(mask.is_cuda() && mask.device() == like.device() && mask.scalar_type() == at::kBool &&
                  mask.is_contiguous() && mask.numel() * like.size(-1) == like.numel(),
              "modkern._C perturb: mask must be a contiguous bool tensor with one entry per row");
}

PerturbArgs rows_args(const at::Tensor& a, const at::Tensor& b_or_a, const at::Tensor& mask, const at::Tensor& out,
                      bool has_b) {
  PerturbArgs args;
  args.a_dtype = to_dtype(a.scalar_type());
  args.b_dtype = to_dtype(has_b ? b_or_a.scalar_type() : out.scalar_type());
  args.a = a.data_ptr();
  args.b = has_b ? b_or_a.data_ptr() : nullptr;
  args.mask = mask.data_ptr<bool>();
  args.out = out.data_ptr();
  args.H = a.size(-1);
  args.N = args.H > 0 ? a.numel() / args.H : 0;
  return args;
}

}  // namespace

at::Tensor perturb_forward(const at::Tensor& embeds, const at::Tensor& delta, const at::Tensor& mask, at::Tensor out) {
  TORCH_CHECK(embeds.is_cuda() && embeds.is_contiguous(),
              "modkern._C perturb: embeds must be a contiguous CUDA tensor");
  check_rows_of("delta", delta, embeds);
  check_rows_of("out", out, embeds);
  TORCH_CHECK(out.scalar_type() == embeds.scalar_type(), "modkern._C perturb: out must have embeds' dtype");
  check_mask(mask, embeds);
  const c10::cuda::CUDAGuard guard(embeds.device());
  const PerturbArgs args = rows_args(embeds, delta, mask, out, true);
  check_cuda(launch_perturb_forward(args, c10::cuda::getCurrentCUDAStream()), "perturb_forward");
  return out;
}

at::Tensor perturb_backward(const at::Tensor& grad_out, const at::Tensor& mask, at::Tensor grad_delta) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.is_contiguous(),
              "modkern._C perturb: grad_out must be a contiguous CUDA tensor");
  check_rows_of("grad_delta", grad_delta, grad_out);
  check_mask(mask, grad_out);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const PerturbArgs args = rows_args(grad_out, grad_out, mask, grad_delta, false);
  check_cuda(launch_perturb_backward(args, c10::cuda::getCurrentCUDAStream()), "perturb_backward");
  return grad_delta;
}

}  // namespace modkern
