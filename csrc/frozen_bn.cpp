// Schemas of the frozennorm ops, and the (empty) Python module `frozennorm._C` whose import
// loads this library and so registers the ops and their CPU/CUDA kernels.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(frozennorm, m) {
  // y = (x - running_mean) * scale + bias with scale = weight / sqrt(running_var + eps),
  // per channel (dim 1), computed in float32 (float64 for float64 data or statistics) and
  // rounded once to the input's dtype. Also returns `scale` (float32/float64, one value per
  // channel), which is all the backward needs.
  m.def(
      "frozen_bn(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor)");
  // grad_input = grad_output * scale, per channel.
  m.def("frozen_bn_backward(Tensor grad_output, Tensor scale) -> Tensor");
  // Fused epilogue: out = act(frozen_bn(input) [+ residual]) in one pass, every
  // intermediate rounded to the input's dtype where the unfused ops would store it.
  // activation: 0 identity, 1 relu, 2 relu6, 3 silu. Returns (out, scale, preact); preact
  // (what the SiLU backward needs) is written only for SiLU with save_preact, else empty.
  m.def(
      "frozen_bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, int activation, bool save_preact) "
      "-> (Tensor, Tensor, Tensor)");
  // Its backward in one pass: ga = grad_output * act'(saved) (saved: the output for
  // ReLU/ReLU6, the pre-activation for SiLU, unused for identity); returns
  // (ga * scale, ga if residual_grad else empty).
  m.def(
      "frozen_bn_act_backward(Tensor grad_output, Tensor saved, Tensor scale, int activation, "
      "bool residual_grad) -> (Tensor, Tensor)");
}

// `import frozennorm._C` loads this shared library, which registers the ops above. The
// module itself is empty: the ops are reached through torch.ops.frozennorm.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "frozennorm's compiled ops (see torch.ops.frozennorm)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
