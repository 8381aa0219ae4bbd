// Python bindings of modkern._C. The custom ops are registered in Python (modkern/ops/*.py) and
// dispatch to these functions through modkern/cuda_backend/*.py; nothing here is visible to
// torch.compile, which treats the ops as opaque.
#include "ops.h"
#include "torch_utils.h"

namespace modkern {

pybind11::dict device_info(int64_t device) {
  DeviceInfo d;
  check_cuda(get_device_info(static_cast<int>(device), &d), "device_info");
  pybind11::dict out;
  out["device"] = d.device;
  out["sm_count"] = d.sm_count;
  out["l2_bytes"] = d.l2_bytes;
  out["smem_optin"] = d.smem_optin;
  out["smem_per_sm"] = d.smem_per_sm;
  out["cc"] = pybind11::make_tuple(d.cc_major, d.cc_minor);
  out["cluster_launch"] = d.cluster_launch;
  return out;
}

}  // namespace modkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "modkern CUDA C++ kernels (csrc/); see modkern/cuda_backend/ for the Python interface";
  m.def("divergence_forward", &modkern::divergence_forward,
        "fused_js / fused_kl forward: (loss, stats, grad_p, grad_q)",
        py::arg("p"), py::arg("q"), py::arg("ref_index"), py::arg("mask"), py::arg("kind"), py::arg("beta"),
        py::arg("inv_temperature"), py::arg("need_grad_p"), py::arg("need_grad_q"));
  m.def("divergence_backward", &modkern::divergence_backward, "fused_js / fused_kl backward: (grad_p, grad_q)",
        py::arg("grad_rows"), py::arg("p"), py::arg("q"), py::arg("ref_index"), py::arg("mask"), py::arg("stats"),
        py::arg("saved_grad_p"), py::arg("saved_grad_q"), py::arg("kind"), py::arg("beta"),
        py::arg("inv_temperature"), py::arg("need_grad_p"), py::arg("need_grad_q"));
  m.def("divergence_set_tuning", &modkern::divergence_set_tuning,
        "Force the forward's launch shape: cluster (0 auto, 1/2/4/8), cache (-1 auto, 0 stream, 1 shared "
        "memory), threads (0 auto)",
        py::arg("cluster") = 0, py::arg("cache") = -1, py::arg("threads") = 0);
  m.def("divergence_last_launch", &modkern::divergence_last_launch, "Launch shape of the last divergence forward");
  m.def("adv_step", &modkern::adv_step, "masked PGD step, written into out (may be delta); returns out",
        py::arg("delta"), py::arg("grad"), py::arg("mask"), py::arg("out"), py::arg("alpha"), py::arg("alpha_t"),
        py::arg("epsilon"), py::arg("epsilon_t"), py::arg("step"), py::arg("norm"));
  m.def("perturb_forward", &modkern::perturb_forward, "out = embeds + delta * mask (fp32 math); returns out",
        py::arg("embeds"), py::arg("delta"), py::arg("mask"), py::arg("out"));
  m.def("perturb_backward", &modkern::perturb_backward, "grad_delta = grad_out * mask; returns grad_delta",
        py::arg("grad_out"), py::arg("mask"), py::arg("grad_delta"));
  m.def("device_info", &modkern::device_info, "SM count, L2 size, shared memory and cluster support of a device",
        py::arg("device"));
}
