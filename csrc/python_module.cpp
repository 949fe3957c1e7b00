// Minimal CPython module init so the op library is importable as linkbreaker_ext._C
// (pattern from PyTorch's extension-cpp example). Importing it runs the static
// TORCH_LIBRARY registrations; the ops are then reachable as torch.ops.linkbreaker.*.
// Only built by setup.py (the CMake library is a plain shared library).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", /* name of module */
      "LinkBreaker guard-head ops; use torch.ops.linkbreaker.*", /* doc */
      -1, /* size of per-interpreter state of the module */
      nullptr, /* methods */
  };
  return PyModule_Create(&module_def);
}
}
