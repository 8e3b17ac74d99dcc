// pybind11 bindings of conmim._C. Everything crosses as integers (data pointers, strides, dtype tags, a CUDA
// stream handle) so this module never includes torch headers and works with any torch version. The loss takes one
// named struct, LossCall (loss_call.h), filled by conmim/native.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/ema.h"
#include "cpu/patch_contrast.h"
#include "loss_call.h"
#ifdef CONMIM_WITH_CUDA
#include "cuda/ema.h"
#include "cuda/patch_contrast.h"
#endif

namespace py = pybind11;
using conmim::LossCall;

namespace {

std::string cuda_archs() {
#ifdef CONMIM_WITH_CUDA
  return CONMIM_CUDA_ARCHS_STR;
#else
  return "";
#endif
}

// Shape checks every loss entry point shares (the Python side validates the rest: conmim/_validate.py).
template <void (*Kernel)(const LossCall&)>
void loss_entry(const LossCall& a) {
  if (a.B < 0 || a.N <= 0 || a.D <= 0)
    throw std::invalid_argument("conmim._C: a loss call needs B >= 0, N > 0 and D > 0, got B=" +
                                std::to_string(a.B) + ", N=" + std::to_string(a.N) + ", D=" + std::to_string(a.D));
  Kernel(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "conmim compiled kernels (CPU: C++/OpenMP; CUDA when built with nvcc)";
  m.attr("with_cuda") =
#ifdef CONMIM_WITH_CUDA
      true;
#else
      false;
#endif
  m.def("cuda_archs", &cuda_archs, "CUDA architectures the CUDA kernels were compiled for ('' if none)");
  // The dtype tags of common.h, by torch dtype name: conmim/_ext.py builds its table from this one.
  py::dict tags;
  tags["float32"] = static_cast<int>(conmim::kFloat32);
  tags["bfloat16"] = static_cast<int>(conmim::kBFloat16);
  tags["float16"] = static_cast<int>(conmim::kFloat16);
  tags["float64"] = static_cast<int>(conmim::kFloat64);
  m.attr("dtype_tags") = tags;

  // module_local: a second build of this module (the tests' CPU execution of the CUDA kernels) loads beside it.
  py::class_<LossCall>(m, "LossCall", py::module_local(),
                       "One call of the patch-contrast loss (csrc/loss_call.h documents the fields)")
      .def(py::init<>())
      .def_readwrite("student", &LossCall::student)
      .def_readwrite("teacher", &LossCall::teacher)
      .def_readwrite("student_dtype", &LossCall::student_dtype)
      .def_readwrite("teacher_dtype", &LossCall::teacher_dtype)
      .def_readwrite("student_stride", &LossCall::student_stride)
      .def_readwrite("teacher_stride", &LossCall::teacher_stride)
      .def_readwrite("B", &LossCall::B)
      .def_readwrite("N", &LossCall::N)
      .def_readwrite("D", &LossCall::D)
      .def_readwrite("mask", &LossCall::mask)
      .def_readwrite("mask_stride", &LossCall::mask_stride)
      .def_readwrite("order", &LossCall::order)
      .def_readwrite("counts", &LossCall::counts)
      .def_readwrite("positive_index", &LossCall::positive_index)
      .def_readwrite("positive_stride", &LossCall::positive_stride)
      .def_readwrite("inv_tau", &LossCall::inv_tau)
      .def_readwrite("normalize", &LossCall::normalize)
      .def_readwrite("exact_logits", &LossCall::exact_logits)
      .def_readwrite("loss", &LossCall::loss)
      .def_readwrite("lse", &LossCall::lse)
      .def_readwrite("grad", &LossCall::grad)
      .def_readwrite("grad_stride", &LossCall::grad_stride)
      .def_readwrite("d_student", &LossCall::d_student)
      .def_readwrite("d_teacher", &LossCall::d_teacher)
      .def_readwrite("row_stats", &LossCall::row_stats)
      .def_readwrite("nthreads", &LossCall::nthreads)
      .def_readwrite("stream", &LossCall::stream);

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("patch_contrast_fwd_cpu", &loss_entry<conmim::cpu::patch_contrast_forward>, nogil);
  m.def("patch_contrast_bwd_cpu", &loss_entry<conmim::cpu::patch_contrast_backward>, nogil);
  m.def("ema_update_cpu", &conmim::cpu::ema_update, py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("student"), py::arg("student_dtype"), py::arg("numel"), py::arg("momentum"), py::arg("nthreads"),
        nogil);

#ifdef CONMIM_WITH_CUDA
  m.def("patch_contrast_fwd_cuda", &loss_entry<conmim::cuda::patch_contrast_forward>, nogil);
  m.def("patch_contrast_bwd_cuda", &loss_entry<conmim::cuda::patch_contrast_backward>, nogil);
  namespace cc = conmim::cuda;
  m.attr("cuda_max_dim") = cc::kMaxDim;
  m.attr("cuda_max_batch") = cc::kMaxGridY;
  py::enum_<cc::LossKernel>(m, "LossKernel", py::module_local())
      .value("forward", cc::LossKernel::kForward)
      .value("backward", cc::LossKernel::kBackward);
  py::class_<cc::SmemPlan>(m, "SmemPlan", py::module_local(),
                           "Shared memory of one loss kernel's block (csrc/cuda/patch_contrast.h)")
      .def_readonly("q_resident", &cc::SmemPlan::q_resident)
      .def_readonly("static_bytes", &cc::SmemPlan::static_bytes)
      .def_readonly("dynamic_bytes", &cc::SmemPlan::dynamic_bytes)
      .def_readonly("opt_in", &cc::SmemPlan::opt_in);
  m.def("cuda_smem_plan", &cc::smem_plan, py::arg("kernel"), py::arg("D"), py::arg("student_dtype"),
        py::arg("teacher_dtype"), py::arg("optin_limit"),
        "The shared-memory plan the CUDA loss launchers follow on a device with optin_limit bytes per block");
  m.def("ema_update_cuda", &conmim::cuda::ema_update, py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("student"), py::arg("student_dtype"), py::arg("numel"), py::arg("momentum"),
        py::arg("momentum_ptr"), py::arg("stream"), nogil);
#endif
}
