// Makes `tgate_kernels._C` importable as a Python module.
//
// The extension exposes no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL registrations in the other translation units, after which the
// kernels are reachable through torch.ops.tgate.*.  A bare module init is enough for
// that, and keeps pybind11 out of the build.

#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "C++ CPU kernels for tgate_kernels; registered with the PyTorch dispatcher on import.",
      -1,  // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
