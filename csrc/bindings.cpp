// pybind11 bindings of conmim._C. Everything crosses as integers (data pointers, strides, dtype tags, a CUDA
// stream handle) so this module never includes torch headers and works with any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/ema.h"
#include "cpu/patch_contrast.h"
#ifdef CONMIM_WITH_CUDA
#include "cuda/ema.h"
#include "cuda/patch_contrast.h"
#endif

namespace py = pybind11;
using conmim::cpu::PatchContrastArgs;

namespace {

PatchContrastArgs make_args(int64_t student, const std::array<int64_t, 3>& s_stride, int64_t teacher,
                            const std::array<int64_t, 3>& t_stride, int64_t mask, const std::array<int64_t, 2>& m_stride,
                            int64_t pos, const std::array<int64_t, 2>& p_stride, int64_t B, int64_t N, int64_t D,
                            int dtype, double inv_tau, bool normalize) {
  if (B < 0 || N <= 0 || D <= 0) throw std::invalid_argument("conmim._C: need B >= 0, N > 0, D > 0");
  PatchContrastArgs a;
  a.student = student;
  a.teacher = teacher;
  a.mask = mask;
  a.pos = pos;
  for (int i = 0; i < 3; ++i) {
    a.s_stride[i] = s_stride[i];
    a.t_stride[i] = t_stride[i];
  }
  a.mask_sb = m_stride[0];
  a.mask_sn = m_stride[1];
  a.pos_sb = p_stride[0];
  a.pos_sn = p_stride[1];
  a.B = B;
  a.N = N;
  a.D = D;
  a.dtype = dtype;
  a.inv_tau = inv_tau;
  a.normalize = normalize;
  return a;
}

std::string cuda_archs() {
#ifdef CONMIM_WITH_CUDA
  return CONMIM_CUDA_ARCHS_STR;
#else
  return "";
#endif
}

}  // namespace

#ifdef CONMIM_WITH_CUDA
// The arguments the CUDA loss entry points share, in the order Python passes them.
static conmim::cuda::PatchContrastCudaArgs cuda_args(int64_t student, const std::array<int64_t, 3>& s_stride,
                                                     int64_t teacher, const std::array<int64_t, 3>& t_stride,
                                                     int64_t order, int64_t counts, int64_t pos,
                                                     const std::array<int64_t, 2>& p_stride, int64_t B, int64_t N,
                                                     int64_t D, int dtype, double inv_tau, bool normalize) {
  return conmim::cuda::PatchContrastCudaArgs{student,     teacher,     order,       counts,      pos,
                                             s_stride[0], s_stride[1], s_stride[2], t_stride[0], t_stride[1],
                                             t_stride[2], p_stride[0], p_stride[1], B,           N,
                                             D,           dtype,       inv_tau,     normalize};
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "conmim compiled kernels (CPU: C++/OpenMP; CUDA when built with nvcc)";
  m.attr("with_cuda") =
#ifdef CONMIM_WITH_CUDA
      true;
#else
      false;
#endif
  m.def("cuda_archs", &cuda_archs, "CUDA architectures the CUDA kernels were compiled for ('' if none)");

  m.def(
      "patch_contrast_fwd_cpu",
      [](int64_t student, std::array<int64_t, 3> s_stride, int64_t teacher, std::array<int64_t, 3> t_stride,
         int64_t mask, std::array<int64_t, 2> m_stride, int64_t pos, std::array<int64_t, 2> p_stride, int64_t B,
         int64_t N, int64_t D, int dtype, double inv_tau, bool normalize, int64_t loss, int64_t lse, int nthreads) {
        const auto a = make_args(student, s_stride, teacher, t_stride, mask, m_stride, pos, p_stride, B, N, D, dtype,
                                 inv_tau, normalize);
        conmim::cpu::patch_contrast_forward(a, loss, lse, nthreads);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "patch_contrast_bwd_cpu",
      [](int64_t student, std::array<int64_t, 3> s_stride, int64_t teacher, std::array<int64_t, 3> t_stride,
         int64_t mask, std::array<int64_t, 2> m_stride, int64_t pos, std::array<int64_t, 2> p_stride, int64_t B,
         int64_t N, int64_t D, int dtype, double inv_tau, bool normalize, int64_t lse, int64_t grad,
         std::array<int64_t, 2> g_stride, int64_t ds, int64_t dt, int nthreads) {
        const auto a = make_args(student, s_stride, teacher, t_stride, mask, m_stride, pos, p_stride, B, N, D, dtype,
                                 inv_tau, normalize);
        conmim::cpu::patch_contrast_backward(a, lse, grad, g_stride[0], g_stride[1], ds, dt, nthreads);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def("ema_update_cpu", &conmim::cpu::ema_update, py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("student"), py::arg("student_dtype"), py::arg("numel"), py::arg("momentum"), py::arg("nthreads"),
        py::call_guard<py::gil_scoped_release>());

#ifdef CONMIM_WITH_CUDA
  m.def("ema_update_cuda", &conmim::cuda::ema_update, py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("student"), py::arg("student_dtype"), py::arg("numel"), py::arg("momentum"),
        py::arg("momentum_ptr"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("ema_max_tensors_per_launch", &conmim::cuda::max_tensors_per_launch);

  m.def(
      "patch_contrast_fwd_cuda",
      [](int64_t student, std::array<int64_t, 3> s_stride, int64_t teacher, std::array<int64_t, 3> t_stride,
         int64_t order, int64_t counts, int64_t pos, std::array<int64_t, 2> p_stride, int64_t B, int64_t N, int64_t D,
         int dtype, double inv_tau, bool normalize, int64_t loss, int64_t lse, int64_t stream) {
        const auto a = cuda_args(student, s_stride, teacher, t_stride, order, counts, pos, p_stride, B, N, D, dtype,
                                 inv_tau, normalize);
        conmim::cuda::patch_contrast_forward(a, loss, lse, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "patch_contrast_bwd_cuda",
      [](int64_t student, std::array<int64_t, 3> s_stride, int64_t teacher, std::array<int64_t, 3> t_stride,
         int64_t order, int64_t counts, int64_t pos, std::array<int64_t, 2> p_stride, int64_t B, int64_t N, int64_t D,
         int dtype, double inv_tau, bool normalize, int64_t lse, int64_t grad, std::array<int64_t, 2> g_stride,
         int64_t ds, int64_t dt, int64_t stream) {
        const auto a = cuda_args(student, s_stride, teacher, t_stride, order, counts, pos, p_stride, B, N, D, dtype,
                                 inv_tau, normalize);
        conmim::cuda::patch_contrast_backward(a, lse, grad, g_stride[0], g_stride[1], ds, dt, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("patch_contrast_cuda_max_dim", &conmim::cuda::patch_contrast_max_dim);
#endif
}
