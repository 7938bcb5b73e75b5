// Schemas of the frozennorm ops, and the Python module `frozennorm._C` whose import loads
// this library and so registers the ops and their CPU/CUDA kernels.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <thread>

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
  // The backward when the affine parameters (or the statistics) train: in one pass over
  // grad_output, input (the forward's input) and saved (as frozen_bn_act_backward's; None
  // for identity), ga = grad_output * act'(saved) rounded to the data dtype, and returns
  // (ga * scale if input_grad else empty, ga if residual_grad else empty,
  //  sum of ga per channel, sum of ga * (input - running_mean) per channel), the sums in the
  // compute dtype (float32; float64 for float64 data or scale), deterministic.
  m.def(
      "frozen_bn_affine_backward(Tensor grad_output, Tensor input, Tensor? saved, "
      "Tensor running_mean, Tensor scale, int activation, bool input_grad, bool residual_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

// _C.parallel_workers(n): how many distinct threads ran the chunks of an at::parallel_for
// over n items, compiled exactly as the CPU kernels' loops are. at::parallel_for is inline
// code: in a library built without the flags of torch's parallel backend (-fopenmp for an
// OpenMP torch) it silently runs on one thread. The tests check this against
// torch.get_num_threads().
PyObject* parallel_workers(PyObject* /*self*/, PyObject* arg) {
  const long long n = PyLong_AsLongLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  std::set<std::thread::id> ids;
  std::mutex lock;
  Py_BEGIN_ALLOW_THREADS
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    ids.insert(std::this_thread::get_id());
  });
  Py_END_ALLOW_THREADS
  return PyLong_FromSize_t(ids.size());
}

PyMethodDef methods[] = {
    {"parallel_workers", parallel_workers, METH_O,
     "Distinct threads that ran an at::parallel_for over n items (a build check)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import frozennorm._C` loads this shared library, which registers the ops above; the ops
// are reached through torch.ops.frozennorm. The module holds only a build check.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "frozennorm's compiled ops (see torch.ops.frozennorm)", -1,
      methods};
  return PyModule_Create(&module_def);
}
