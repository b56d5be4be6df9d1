// The Python module metalm_fast._C. Importing it loads this shared library, whose
// static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks (one per op file in
// csrc/cpu) register the CPU kernels under torch.ops.metalm. The module itself
// has no Python attributes.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "metalm-fast C++ CPU kernels (registered in torch.ops.metalm)",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
