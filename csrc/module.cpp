// Python entry point of kncore._C. Importing the module loads this shared
// library, whose static initialisers register the TORCH_LIBRARY ops of
// csrc/<op>.cpp (torch.ops.kncore.*). The module itself only reports how it
// was built; it includes only Python.h and a macro header, so it compiles in a second.
#include <Python.h>
#include <torch/version.h>  // macros only

#define KN_STR2(x) #x
#define KN_STR(x) KN_STR2(x)
#define KNCORE_TORCH_VERSION \
  KN_STR(TORCH_VERSION_MAJOR) "." KN_STR(TORCH_VERSION_MINOR) "." KN_STR(TORCH_VERSION_PATCH)

static PyObject* build_info(PyObject*, PyObject*) {
#ifdef _OPENMP
  const int openmp = 1;
#else
  const int openmp = 0;
#endif
#ifdef KNCORE_WITH_CUDA
  const int cuda = 1;
#else
  const int cuda = 0;
#endif
  return Py_BuildValue("{s:s,s:O,s:O,s:s}", "torch", KNCORE_TORCH_VERSION, "openmp",
                       openmp ? Py_True : Py_False, "cuda_sources", cuda ? Py_True : Py_False,
                       "compiler", __VERSION__);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How kncore._C was compiled (dict)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                    "kncore C++ ops (registered as torch.ops.kncore.*)", -1,
                                    methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
