// The Python module moe._C: importing it runs the TORCH_LIBRARY registrations of this library.
// The ops themselves are reached through torch.ops.moe.*.
#include <Python.h>

static struct PyModuleDef moe_c_module = {PyModuleDef_HEAD_INIT, "_C", "moe C++/CUDA ops (torch.ops.moe.*)", -1,
                                          nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moe_c_module); }
