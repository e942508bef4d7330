// The cube operator library: the schemas of the custom-op contract (SPEC.md), which every
// backend (csrc/cpu, csrc/cuda) implements with TORCH_LIBRARY_IMPL, and the Python module stub
// that makes `import cube_kernels._C` load them.
#include <Python.h>

#include <string>

#include <torch/library.h>
#include <torch/version.h>

#include "cpu/cell.h"
#include "cpu/loops.h"

#define CUBE_STR_(x) #x
#define CUBE_STR(x) CUBE_STR_(x)

namespace {

// "torch=X.Y.Z;cuda=0|1;cpu_isa=avx2|baseline;bf16_gemm=0|1": the torch this binary was
// compiled against (cube_kernels/_extension.py refuses to run a _C built for another torch: its
// ABI is not stable across releases), whether it has the CUDA kernels, the instruction set the
// CPU kernels picked on this machine and whether bf16 states run the bf16 micro-kernel here.
std::string build_info() {
  std::string info = "torch=" CUBE_STR(TORCH_VERSION_MAJOR) "." CUBE_STR(
      TORCH_VERSION_MINOR) "." CUBE_STR(TORCH_VERSION_PATCH);
#ifdef WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  return info + ";cpu_isa=" + cube::cpu_isa() +
         ";bf16_gemm=" + (cube::bf16_micro_kernel() ? "1" : "0");
}

}  // namespace

TORCH_LIBRARY(cube, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("gather_gate(Tensor u, Tensor vn, Tensor w_sp, Tensor b_sp, str neighbourhood, "
        "str boundary) -> Tensor",
        tags);
  m.def("gather_gate_backward(Tensor grad_h, Tensor u, Tensor vn, Tensor w_sp, Tensor b_sp, "
        "str neighbourhood, str boundary) -> (Tensor, Tensor, Tensor, Tensor)",
        tags);
  m.def("update(Tensor x, Tensor h, Tensor w_out, Tensor b_out, int seed, int step, "
        "float fire_rate) -> Tensor",
        tags);
  m.def("update_backward(Tensor grad, Tensor h, Tensor w_out, int seed, int step, "
        "float fire_rate) -> (Tensor, Tensor, Tensor)",
        tags);
  m.def("gate_input(Tensor proj, Tensor b_in, Tensor ln2_weight, Tensor ln2_bias) "
        "-> (Tensor, Tensor)",
        tags);
  m.def("gate_input_backward(Tensor grad_u, Tensor grad_vn, Tensor proj, Tensor b_in, "
        "Tensor ln2_weight, Tensor ln2_bias) -> (Tensor, Tensor, Tensor, Tensor)",
        tags);
  m.def("rollout(Tensor x, Tensor? inject, Tensor ln1_weight, Tensor ln1_bias, Tensor w_in, "
        "Tensor b_in, Tensor ln2_weight, Tensor ln2_bias, Tensor w_sp, Tensor b_sp, "
        "Tensor w_out, Tensor b_out, int steps, int seed, str neighbourhood, str boundary, "
        "float fire_rate, int? alive_channel, float alive_threshold, bool all_states) "
        "-> (Tensor, Tensor)",
        tags);
  m.def("rollout_backward(Tensor grad, Tensor x, Tensor outs, Tensor? keep, Tensor? inject, "
        "Tensor ln1_weight, Tensor ln1_bias, Tensor w_in, Tensor b_in, Tensor ln2_weight, "
        "Tensor ln2_bias, Tensor w_sp, Tensor b_sp, Tensor w_out, Tensor b_out, int seed, "
        "str neighbourhood, str boundary, float fire_rate, int? alive_channel, "
        "float alive_threshold) -> Tensor[]",
        tags);
  m.def("build_info() -> str", &build_info);
}

// The ops register themselves when the shared library is loaded; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "cube_kernels._C",
                               "Loads the cube:: operators into torch.ops.cube.", -1, nullptr};
  return PyModule_Create(&module);
}
