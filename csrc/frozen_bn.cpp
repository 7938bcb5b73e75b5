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
}

// `import frozennorm._C` loads this shared library, which registers the ops above. The
// module itself is empty: the ops are reached through torch.ops.frozennorm.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "frozennorm's compiled ops (see torch.ops.frozennorm)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
