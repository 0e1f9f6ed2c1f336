// Makes the compiled library importable as `model._C`: importing it runs the
// TORCH_LIBRARY registrations of every translation unit. No Python functions
// live here; the ops are reached through torch.ops.maskray.

#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", // name
      "maskray's compiled RoI operators (see torch.ops.maskray)", // doc
      -1, // no per-module state
      nullptr, // no methods
  };
  return PyModule_Create(&module_def);
}
}
