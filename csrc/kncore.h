// Declarations of the kncore C++ ops, shared by csrc/*.cpp and the C++ unit
// tests in csrc/tests/. Each op lives in its own file (csrc/<op>.cpp) and
// registers itself with TORCH_LIBRARY_FRAGMENT(kncore, m); Python reaches
// them as torch.ops.kncore.<op> once kncore._C is imported.
//
// Only stable ATen APIs are used, so the same code builds against torch 2.11+
// and runs on CUDA tensors through ATen (cuBLAS) when torch has CUDA.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <tuple>

namespace kncore {

// AVX-512 code paths (csrc/cov_accumulate.cpp, csrc/rank1_update.cpp): built by
// GCC or clang on x86-64 (not by nvcc), each function marked KN_AVX512_TARGET,
// and taken at run time where cpu_has_avx512() (see Avx512Switch).
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(__CUDACC__)
#define KN_AVX512_CODE 1
#include <immintrin.h>
// clang 18+ wants evex512 named as well for 512-bit vectors; GCC implies it.
#if defined(__clang__) && __clang_major__ >= 18
#define KN_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,evex512")))
#else
#define KN_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif
// Around AVX-512 code: GCC 12's headers initialise "undefined" vectors from
// themselves (permutexvar, reduce_add), false -Wuninitialized warnings where
// they are inlined (-Wmaybe-uninitialized is a GCC-only group).
#if defined(__clang__)
#define KN_AVX512_WARNINGS_OFF _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#else
#define KN_AVX512_WARNINGS_OFF                                                                  \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#endif
#define KN_AVX512_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define KN_AVX512_CODE 0
#endif

// Whether this CPU (and its OS) runs AVX-512F/BW/VL code.
inline bool cpu_has_avx512() {
#if KN_AVX512_CODE
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// The on/off switch of an op's AVX-512 path: on where the CPU has AVX-512;
// tests and benches switch it off to run (and time) the portable path.
class Avx512Switch {
 public:
  bool on() const { return on_.load(std::memory_order_relaxed); }
  // enable: -1 asks, 0 switches off, 1 on (where the CPU has AVX-512); returns on().
  bool set(int64_t enable, const char* op) {
    TORCH_CHECK_VALUE(enable >= -1 && enable <= 1, op, ": enable must be -1 (ask), 0 (off) or 1 (on), got ",
                      enable);
    if (enable >= 0) on_.store(enable == 1 && cpu_has_avx512(), std::memory_order_relaxed);
    return on();
  }

 private:
  std::atomic<bool> on_{cpu_has_avx512()};
};

// C += X^T X over the rows of X that `mask` keeps (all rows when undefined),
// s += column sums of those rows, n += their number.
//   C: [d, d] float32/float64, contiguous. Only the LOWER triangle (i >= j)
//      is meaningful afterwards; entries above the diagonal are unspecified
//      (some hold partial sums). Mirror before reading: tril(C) + tril(C,-1)^T.
//   s: [d], C's dtype.   n: int64 scalar tensor (0-dim).
//   X: [rows, d] float32/bfloat16/float16/float64, contiguous.
//   mask: [rows] bool, or an undefined tensor.
// Maths in C's dtype. `composite` forces the device-generic ATen path (the one
// CUDA runs) on CPU, so tests can cover it on a machine without a GPU.
void cov_accumulate_(at::Tensor& C, at::Tensor& s, at::Tensor& n, const at::Tensor& X,
                     const c10::optional<at::Tensor>& mask, bool composite = false);
// Whether cov_accumulate_ uses its fp32 AVX-512 triangle; enable: -1 asks, 0 off, 1 on.
bool cov_avx512(int64_t enable);

// The undo record of rank1_update_: (code, exc_idx, exc_val, row_idx, row_val, checksum).
using Record = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// W += alpha * U V^T in place (U [m,k], V [n,k]; W [m,n] contiguous), maths in
// float32 for 16-bit and float32 W, float64 for float64 W. Returns the undo
// record. Undo recomputes W' = fl(W_new - delta) for every element, then:
//   code: empty (sparse form) or int8 [m*n] (dense form): bits(W) - bits(W')
//     as integers, -128 where that does not fit (those are in exc_*);
//   exc_idx/exc_val: flat indices and original values of the elements that
//     neither W' nor W' + code give back;
//   row_idx/row_val: whole original rows (sparse form), where that is cheaper
//     than listing a row's exceptions;
//   checksum (0-dim int64) fingerprints W_new so rank1_undo_ can refuse a W
//   modified in between.
Record rank1_update_(at::Tensor& W, const at::Tensor& U, const at::Tensor& V, double alpha,
                     bool composite = false);

// Restores W bit-exactly from the record returned by rank1_update_ with the
// same U, V, alpha. Throws if W's checksum no longer matches.
void rank1_undo_(at::Tensor& W, const at::Tensor& U, const at::Tensor& V, double alpha, const at::Tensor& code,
                 const at::Tensor& exc_idx, const at::Tensor& exc_val, const at::Tensor& row_idx,
                 const at::Tensor& row_val, const at::Tensor& checksum, bool composite = false);

// Dense records' buffers are pooled for reuse; these free them / report their bytes.
int64_t rank1_pool_release();
int64_t rank1_pool_held();
// Whether rank1_update_ uses its fp32 AVX-512 rows; enable: -1 asks, 0 off, 1 on.
bool rank1_avx512(int64_t enable);

// Checksum of W as rank1_update_ records it (0-dim int64).
at::Tensor rank1_checksum(const at::Tensor& W, bool composite = false);

}  // namespace kncore
