// Torch-level entry points of modkern._C (declared here, bound in bindings.cpp). Each mirrors the
// function of the same role in modkern/torch_backend/<family>.py; the Python wrappers in
// modkern/cuda_backend/<family>.py call them.
#pragma once

#include <optional>
#include <tuple>

#include <torch/extension.h>

namespace modkern {

// Divergence family (fused_js / fused_kl). kind: 0 js, 1 kl_forward, 2 kl_reverse, 3 kl_symmetric.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward(
    const at::Tensor& p, const at::Tensor& q, const std::optional<at::Tensor>& ref_index,
    const std::optional<at::Tensor>& mask, int64_t kind, double beta, double inv_temperature, bool need_grad_p,
    bool need_grad_q);

std::tuple<at::Tensor, at::Tensor> divergence_backward(
    const at::Tensor& grad_rows, const at::Tensor& p, const at::Tensor& q, const std::optional<at::Tensor>& ref_index,
    const std::optional<at::Tensor>& mask, const at::Tensor& stats, const at::Tensor& saved_grad_p,
    const at::Tensor& saved_grad_q, int64_t kind, double beta, double inv_temperature, bool need_grad_p,
    bool need_grad_q);

// Launch-shape overrides of the divergence forward (0 / -1 = automatic), process-wide; and what
// the last forward launch chose (a dict), for tests that force every code path and for tuning.
void divergence_set_tuning(int64_t cluster, int64_t cache, int64_t threads);
pybind11::dict divergence_last_launch();

// Masked PGD step (masked_adv_step): writes delta' into out (which may be delta) and returns it.
// step: 0 raw, 1 sign, 2 l2, 3 l2_token, 4 linf; norm: 0 none, 1 linf, 2 l2, 3 l2_token.
at::Tensor adv_step(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& mask, at::Tensor out,
                    double alpha, const std::optional<at::Tensor>& alpha_t, double epsilon,
                    const std::optional<at::Tensor>& epsilon_t, int64_t step, int64_t norm);

// perturb: out = embeds + delta * mask (fp32 math, embeds' dtype); grad_delta = grad_out * mask in
// grad_delta's dtype. Contiguous [..., H] tensors, bool mask with one entry per row; outputs
// preallocated by the caller.
at::Tensor perturb_forward(const at::Tensor& embeds, const at::Tensor& delta, const at::Tensor& mask, at::Tensor out);
at::Tensor perturb_backward(const at::Tensor& grad_out, const at::Tensor& mask, at::Tensor grad_delta);

// Properties the launchers size their grids with.
pybind11::dict device_info(int64_t device);

}  // namespace modkern
