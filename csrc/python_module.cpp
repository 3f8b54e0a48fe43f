// The Python extension module ropekit._C. Importing it runs the static TORCH_LIBRARY registrations; it exposes
// nothing itself (everything is reached through torch.ops.ropekit), so it needs no pybind11 and is ABI-stable.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
