// The Python extension module omoe_kernels._C (built by setup.py). Importing it loads the
// shared library, whose TORCH_LIBRARY blocks register the ops; the module itself is empty.
// The CMake build leaves this file out: its library is loaded with torch.ops.load_library.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
