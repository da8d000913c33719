// kncore::rank1_update_ / rank1_undo_ : W += alpha U V^T in place, with an undo
// record that restores W bit-exactly.
//
// Count first (4096 x 11008, bench/bench_rank1.py): a bare W.addr_(u, v) reads
// and writes W once (2 x 180 MB in fp32) and is bandwidth bound. Keeping a copy
// of W as the record (ROME's weights_copy) adds a third stream plus page faults
// on a fresh 180 MB buffer: clone + addr_ measured 6-10x a bare addr_. So the
// record keeps only what cannot be recomputed. Undo recomputes
// W' = fl(W_new - delta); for most elements W' has W's original bits. Where it
// does not (the sum moved up a binade and lost W's last bit, |delta| >> |W|,
// -0.0, nan), the update, which still sees the original, records it. Two forms:
//   sparse: (flat index, original bits) per miss, or whole rows where that is
//     smaller. Cheap while misses are rare (small edits: 0.3% of elements at
//     RMS(delta) = 0.1% of RMS(W)); each costs ~4 ns to find and store.
//   dense: one int8 per element, code = bits(W) - bits(W') as integers (the
//     distance in ulps, nearly always -1, 0 or 1), or -128 where it does not
//     fit, and those few are listed sparsely. Real ROME edits have
//     RMS(delta) = 14-18% of RMS(W) and ~10% misses; dense costs a quarter
//     of W's fp32 bytes, written in the same pass with streaming stores.
// A sample of rows, run first, picks the form (dense_above() says where).
// The dense codes live in buffers that are kept for reuse when a record dies
// (RecordPool): a fresh 45 MB buffer costs more in page faults than the update.
//
// Exactness needs the forward and undo to evaluate delta and the two roundings
// identically: the same inline functions serve both, and the file is compiled
// with -ffp-contract=off (a fused multiply-add would round differently; so our
// results equal W + outer(u, v), not addr_'s fused ones, within 1 rounding).
//
// A checksum of W_new (per-row 32-bit sums of the bits, weighted by 2i+1) is
// computed in the same pass; undo refuses a W whose checksum changed.
#include "kncore.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

// The row loops are memory-bound only with wide vectors: at SSE2 width the
// update took 3.2x the CPU time of W.addr_ (4096 x 11008 fp32, one thread,
// bench/bench_rank1.py), whose ATen kernel uses AVX-512. GCC builds them for
// several x86-64 levels and picks one at load time (ifunc). All levels give the
// same bits: IEEE add/sub/mul at any width, and no FMA (-ffp-contract=off).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define KN_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KN_SIMD_CLONES
#endif
#if defined(__GNUC__)
#define KN_INLINE inline __attribute__((always_inline))
#else
#define KN_INLINE inline
#endif

namespace kncore {
namespace {

// Element formats: raw bits <-> maths type. All conversions round to nearest even.
struct F32 {
  using bits_t = uint32_t;
  using acc_t = float;
  static float load(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
  static uint32_t store(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
  static uint32_t fold(uint32_t b) { return b; }
};
struct F64 {
  using bits_t = uint64_t;
  using acc_t = double;
  static double load(uint64_t b) { double f; std::memcpy(&f, &b, 8); return f; }
  static uint64_t store(double f) { uint64_t b; std::memcpy(&b, &f, 8); return b; }
  static uint32_t fold(uint64_t b) { return uint32_t(b) + uint32_t(b >> 32); }
};
struct BF16 {  // same rounding as c10::BFloat16(float), written branch-free so it vectorises
  using bits_t = uint16_t;
  using acc_t = float;
  static float load(uint16_t b) { return F32::load(uint32_t(b) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = F32::store(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return uint16_t(f != f ? 0x7FC0u : r);
  }
  static uint32_t fold(uint16_t b) { return b; }
};
struct F16 {
  using bits_t = uint16_t;
  using acc_t = float;
  static float load(uint16_t b) { return static_cast<float>(c10::Half(b, c10::Half::from_bits())); }
  static uint16_t store(float f) { return c10::Half(f).x; }
  static uint32_t fold(uint16_t b) { return b; }
};

// The single definition of an element's new value and of its recovery.
template <class T>
KN_INLINE typename T::bits_t add_delta(typename T::bits_t w, typename T::acc_t dl) {
  return T::store(T::load(w) + dl);
}
template <class T>
KN_INLINE typename T::bits_t sub_delta(typename T::bits_t w, typename T::acc_t dl) {
  return T::store(T::load(w) - dl);
}

// delta of row i: rank 1 -> au * v[j] (au = alpha*U[i]); rank k -> dbuf[j],
// built as sum_t (alpha*U[i,t]) * V^T[t,j] in increasing t (same order in undo).
template <typename acc_t>
struct RowDelta {
  const acc_t* aU;  // [m, k]
  const acc_t* VT;  // [k, n]
  int64_t k, n;
  std::vector<acc_t> buf;
  const acc_t* row(int64_t i) {
    if (k == 1) return nullptr;
    buf.resize(n);
    const acc_t a0 = aU[i * k];
    for (int64_t j = 0; j < n; ++j) buf[j] = a0 * VT[j];
    for (int64_t t = 1; t < k; ++t) {
      const acc_t at = aU[i * k + t];
      const acc_t* vt = VT + t * n;
      for (int64_t j = 0; j < n; ++j) buf[j] = buf[j] + at * vt[j];
    }
    return buf.data();
  }
};

// Exceptions found by the update, per thread. The vectors persist between calls
// (thread_local): growing fresh ones cost more than finding the exceptions
// (reallocation copies and page faults: ~20 ns per exception at 2% of 45M).
struct Arena {
  std::vector<int64_t> exc_idx, row_idx;
  std::vector<uint64_t> exc_bits, row_bits;
};

// Updates one row in a single streaming pass, in blocks of 256 elements: the
// block's original bits are kept in L1 while the new ones are written, with a
// byte per element saying whether undo's recomputation would miss the
// original. A block with misses packs the bytes into a bit mask and records
// the misses from it. Returns the row's checksum term. (Blocks of 64: up to 20%
// slower at 10% exceptions; writing rows to a buffer and copying them back:
// 1.85x addr_ with none.)
template <class T, bool kRank1>
KN_INLINE uint32_t update_row(typename T::bits_t* w, int64_t n, typename T::acc_t au,
                              const typename T::acc_t* v, const typename T::acc_t* db, int64_t flat0,
                              Arena& arena) {
  using bits_t = typename T::bits_t;
  constexpr int64_t B = 256;
  uint32_t sum = 0;
  for (int64_t j0 = 0; j0 < n; j0 += B) {
    const int64_t len = std::min(B, n - j0);
    bits_t* wb = w + j0;
    bits_t orig[B];
    alignas(64) uint8_t flag[B] = {0};
    for (int64_t q = 0; q < len; ++q) {
      const auto dl = kRank1 ? au * v[j0 + q] : db[j0 + q];
      const bits_t o = wb[q];
      const bits_t x = add_delta<T>(o, dl);
      flag[q] = sub_delta<T>(x, dl) != o;
      orig[q] = o;
      wb[q] = x;
      sum += T::fold(x);
    }
    uint64_t word[B / 8];
    std::memcpy(word, flag, B);
    uint64_t any = 0;
    for (int k = 0; k < B / 8; ++k) any |= word[k];
    if (any) {
      for (int64_t q0 = 0; q0 < B; q0 += 64) {
        uint64_t mask = 0;  // bit q <- flag[q0 + q]: multiplying 0/1 bytes gathers them into the top byte
        for (int k = 0; k < 8; ++k) mask |= ((word[q0 / 8 + k] * 0x0102040810204080ULL) >> 56) << (8 * k);
        for (; mask; mask &= mask - 1) {
          const int64_t q = q0 + __builtin_ctzll(mask);
          arena.exc_idx.push_back(flat0 + j0 + q);
          arena.exc_bits.push_back(orig[q]);
        }
      }
    }
  }
  return sum;
}

template <class T>
KN_INLINE void restore_row(typename T::bits_t* w, int64_t n, typename T::acc_t au, const typename T::acc_t* v,
                 const typename T::acc_t* db) {
  if (db == nullptr) {
    for (int64_t j = 0; j < n; ++j) w[j] = sub_delta<T>(w[j], au * v[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) w[j] = sub_delta<T>(w[j], db[j]);
  }
}

// Copies a block's codes out of L1 with non-temporal stores where the target is
// 16-byte aligned: the record is not read again soon, and a plain store would
// first read each line of it (a fifth of the memory traffic in fp32).
// Callers issue stream_fence() before the record is read.
KN_INLINE void stream_out(int8_t* dst, const int8_t* src, int64_t len) {
  if (len <= 0) return;  // (never; tells GCC's -Wstringop-overflow so)
#if defined(__x86_64__) || defined(_M_X64)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t q = 0;
    for (; q + 16 <= len; q += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + q), _mm_load_si128(reinterpret_cast<const __m128i*>(src + q)));
    std::memcpy(dst + q, src + q, len - q);
    return;
  }
#endif
  std::memcpy(dst, src, len);
}
inline void stream_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// Dense form of update_row: every element also gets its int8 code, bits(W) -
// bits(W') as integers (wrapping; exact for any bits), or -128 where that does
// not fit in [-127, 127]; those are listed in the arena like sparse misses.
template <class T, bool kRank1>
KN_INLINE uint32_t update_row_dense(typename T::bits_t* w, int64_t n, typename T::acc_t au,
                                    const typename T::acc_t* v, const typename T::acc_t* db, int8_t* code,
                                    int64_t flat0, Arena& arena) {
  using bits_t = typename T::bits_t;
  using sbits_t = std::make_signed_t<bits_t>;
  constexpr int64_t B = 256;
  uint32_t sum = 0;
  for (int64_t j0 = 0; j0 < n; j0 += B) {
    const int64_t len = std::min(B, n - j0);
    bits_t* wb = w + j0;
    alignas(64) int8_t cb[B];
    bits_t orig[B];
    uint8_t escaped = 0;
    for (int64_t q = 0; q < len; ++q) {
      const auto dl = kRank1 ? au * v[j0 + q] : db[j0 + q];
      const bits_t o = wb[q];
      const bits_t x = add_delta<T>(o, dl);
      const bits_t d = bits_t(o - sub_delta<T>(x, dl));
      const bool fits = bits_t(d + bits_t(127)) <= bits_t(254);
      cb[q] = fits ? int8_t(sbits_t(d)) : int8_t(-128);
      escaped |= uint8_t(!fits);
      orig[q] = o;
      wb[q] = x;
      sum += T::fold(x);
    }
    stream_out(code + j0, cb, len);
    if (escaped) {
      for (int64_t q = 0; q < len; ++q) {
        if (cb[q] == -128) {
          arena.exc_idx.push_back(flat0 + j0 + q);
          arena.exc_bits.push_back(orig[q]);
        }
      }
    }
  }
  return sum;
}

// Undo of the dense form: W = bits(W') + code (the -128 ones are then
// overwritten from the exception list).
template <class T>
KN_INLINE void restore_row_dense(typename T::bits_t* w, int64_t n, typename T::acc_t au,
                                 const typename T::acc_t* v, const typename T::acc_t* db, const int8_t* code) {
  using bits_t = typename T::bits_t;
  using sbits_t = std::make_signed_t<bits_t>;
  if (db == nullptr) {
    for (int64_t j = 0; j < n; ++j) w[j] = bits_t(sub_delta<T>(w[j], au * v[j]) + bits_t(sbits_t(code[j])));
  } else {
    for (int64_t j = 0; j < n; ++j) w[j] = bits_t(sub_delta<T>(w[j], db[j]) + bits_t(sbits_t(code[j])));
  }
}

// Misses (elements undo's recomputation would not give back) in one row,
// without writing: the sample that picks the record's form.
template <class T>
KN_INLINE int64_t count_misses(const typename T::bits_t* w, int64_t n, typename T::acc_t au,
                               const typename T::acc_t* v, const typename T::acc_t* db) {
  int64_t misses = 0;
  for (int64_t j = 0; j < n; ++j) {
    const auto dl = db ? db[j] : au * v[j];
    misses += sub_delta<T>(add_delta<T>(w[j], dl), dl) != w[j];
  }
  return misses;
}

template <class T>
KN_INLINE uint32_t row_sum(const typename T::bits_t* w, int64_t n) {
  uint32_t sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += T::fold(w[j]);
  return sum;
}

// Entry points compiled per ISA (see KN_SIMD_CLONES); one overload per format.
#define KN_ROW_KERNELS(T)                                                                            \
  KN_SIMD_CLONES uint32_t update_row_simd(T, T::bits_t* w, int64_t n, T::acc_t au, const T::acc_t* v, \
                                          const T::acc_t* db, int64_t flat0, Arena& arena) {        \
    return db ? update_row<T, false>(w, n, au, v, db, flat0, arena)                                 \
              : update_row<T, true>(w, n, au, v, db, flat0, arena);                                 \
  }                                                                                                \
  KN_SIMD_CLONES void restore_row_simd(T, T::bits_t* w, int64_t n, T::acc_t au, const T::acc_t* v, \
                                       const T::acc_t* db) {                                       \
    restore_row<T>(w, n, au, v, db);                                                               \
  }                                                                                                \
  KN_SIMD_CLONES uint32_t update_row_dense_simd(T, T::bits_t* w, int64_t n, T::acc_t au, const T::acc_t* v, \
                                                const T::acc_t* db, int8_t* code, int64_t flat0,            \
                                                Arena& arena) {                                             \
    return db ? update_row_dense<T, false>(w, n, au, v, db, code, flat0, arena)                            \
              : update_row_dense<T, true>(w, n, au, v, db, code, flat0, arena);                            \
  }                                                                                                        \
  KN_SIMD_CLONES void restore_row_dense_simd(T, T::bits_t* w, int64_t n, T::acc_t au, const T::acc_t* v,   \
                                             const T::acc_t* db, const int8_t* code) {                     \
    restore_row_dense<T>(w, n, au, v, db, code);                                                          \
  }                                                                                                        \
  KN_SIMD_CLONES int64_t count_misses_simd(T, const T::bits_t* w, int64_t n, T::acc_t au,                  \
                                           const T::acc_t* v, const T::acc_t* db) {                        \
    return count_misses<T>(w, n, au, v, db);                                                               \
  }                                                                                                        \
  KN_SIMD_CLONES uint32_t row_sum_simd(T, const T::bits_t* w, int64_t n) { return row_sum<T>(w, n); }
KN_ROW_KERNELS(F32)
KN_ROW_KERNELS(F64)
KN_ROW_KERNELS(BF16)
KN_ROW_KERNELS(F16)
#undef KN_ROW_KERNELS

// ---- fp32 rows in AVX-512
// The loops above, auto-vectorised, keep every block's original bits in a
// stack buffer for the rare elements the record must list, and build the int8
// codes one lane at a time. Here 16 lanes are tested before they are stored,
// so a miss is recorded from the register that still holds the original, and
// 64 codes are packed with two saturating packs and one permute. Measured on
// the 2-core CPU (4096 x 11008, standalone loop): dense form 12.9 -> 11.4 ms,
// sparse form at 0.1% misses 9.6 ms, against 8.3 ms for a bare update; the op
// 1.32-1.46x -> 1.24-1.37x a bare addr_ (bench/results/bench_rank1_*_b9838a4.md). The
// arithmetic is the same IEEE mul, add and sub, unfused, so the records equal
// the portable loops' (tests/test_rank1_update.py runs both) and the portable
// undo restores them. rank1_avx512(0) switches them off (tests, comparisons).
#if KN_AVX512_CODE
KN_AVX512_WARNINGS_OFF

// The lanes of `lanes` go to the arena with their original bits from `o`.
KN_AVX512_TARGET inline void record_lanes(uint32_t lanes, __m512i o, int64_t flat, Arena& arena) {
  alignas(64) uint32_t ob[16];
  _mm512_store_si512(ob, o);
  for (; lanes; lanes &= lanes - 1) {
    const int q = __builtin_ctz(lanes);
    arena.exc_idx.push_back(flat + q);
    arena.exc_bits.push_back(ob[q]);
  }
}

template <bool kRank1>
KN_AVX512_TARGET inline __m512 delta16(__m512 au, const float* v, const float* db, int64_t j) {
  return kRank1 ? _mm512_mul_ps(au, _mm512_loadu_ps(v + j)) : _mm512_loadu_ps(db + j);
}

// update_row<F32> in AVX-512 (the portable row runs the tail, under 16 elements).
template <bool kRank1>
KN_AVX512_TARGET uint32_t update_row_f32_avx512(uint32_t* w, int64_t n, float au_s, const float* v,
                                                const float* db, int64_t flat0, Arena& arena) {
  const __m512 au = _mm512_set1_ps(au_s);
  __m512i sum = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 dl = delta16<kRank1>(au, v, db, j);
    const __m512i o = _mm512_loadu_si512(w + j);
    const __m512 x = _mm512_add_ps(_mm512_castsi512_ps(o), dl);
    const __mmask16 miss = _mm512_cmpneq_epi32_mask(o, _mm512_castps_si512(_mm512_sub_ps(x, dl)));
    if (__builtin_expect(miss != 0, 0)) record_lanes(miss, o, flat0 + j, arena);
    _mm512_storeu_si512(w + j, _mm512_castps_si512(x));
    sum = _mm512_add_epi32(sum, _mm512_castps_si512(x));
  }
  uint32_t s = uint32_t(_mm512_reduce_add_epi32(sum));
  if (j < n) s += update_row_simd(F32{}, w + j, n - j, au_s, v + j, kRank1 ? nullptr : db + j, flat0 + j, arena);
  return s;
}

// update_row_dense<F32> in AVX-512, 64 elements (one line of codes) at a time.
template <bool kRank1>
KN_AVX512_TARGET uint32_t update_row_dense_f32_avx512(uint32_t* w, int64_t n, float au_s, const float* v,
                                                      const float* db, int8_t* code, int64_t flat0,
                                                      Arena& arena) {
  const __m512 au = _mm512_set1_ps(au_s);
  const __m512i c127 = _mm512_set1_epi32(127), c254 = _mm512_set1_epi32(254);
  // the packs interleave 128-bit lanes; this permute puts the 64 codes back in order
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i sum = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    __m512i d[4];
    __mmask64 escaped = 0;
    for (int k = 0; k < 4; ++k) {
      const __m512 dl = delta16<kRank1>(au, v, db, j + 16 * k);
      const __m512i o = _mm512_loadu_si512(w + j + 16 * k);
      const __m512 x = _mm512_add_ps(_mm512_castsi512_ps(o), dl);
      d[k] = _mm512_sub_epi32(o, _mm512_castps_si512(_mm512_sub_ps(x, dl)));  // bits(W) - bits(W')
      const __mmask16 out = _mm512_cmpgt_epu32_mask(_mm512_add_epi32(d[k], c127), c254);  // not in [-127, 127]
      if (__builtin_expect(out != 0, 0)) record_lanes(out, o, flat0 + j + 16 * k, arena);
      escaped |= __mmask64(out) << (16 * k);
      _mm512_storeu_si512(w + j + 16 * k, _mm512_castps_si512(x));
      sum = _mm512_add_epi32(sum, _mm512_castps_si512(x));
    }
    __m512i c = _mm512_packs_epi16(_mm512_packs_epi32(d[0], d[1]), _mm512_packs_epi32(d[2], d[3]));
    c = _mm512_mask_blend_epi8(escaped, _mm512_permutexvar_epi32(order, c), _mm512_set1_epi8(-128));
    if ((reinterpret_cast<uintptr_t>(code + j) & 63) == 0) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(code + j), c);  // see stream_out
    } else {
      _mm512_storeu_si512(code + j, c);
    }
  }
  uint32_t s = uint32_t(_mm512_reduce_add_epi32(sum));
  if (j < n)
    s += update_row_dense_simd(F32{}, w + j, n - j, au_s, v + j, kRank1 ? nullptr : db + j, code + j, flat0 + j,
                               arena);
  return s;
}
KN_AVX512_WARNINGS_ON
#endif  // KN_AVX512_CODE

Avx512Switch& avx512_rows() {
  static Avx512Switch on;
  return on;
}

// One row of the update: code == nullptr for the sparse form.
template <class T>
KN_INLINE uint32_t update_row_any(bool avx512, typename T::bits_t* w, int64_t n, typename T::acc_t au,
                                  const typename T::acc_t* v, const typename T::acc_t* db, int8_t* code,
                                  int64_t flat0, Arena& arena) {
#if KN_AVX512_CODE
  if constexpr (std::is_same_v<T, F32>) {
    if (avx512) {
      if (code != nullptr) {
        return db ? update_row_dense_f32_avx512<false>(w, n, au, v, db, code, flat0, arena)
                  : update_row_dense_f32_avx512<true>(w, n, au, v, db, code, flat0, arena);
      }
      return db ? update_row_f32_avx512<false>(w, n, au, v, db, flat0, arena)
                : update_row_f32_avx512<true>(w, n, au, v, db, flat0, arena);
    }
  }
#endif
  (void)avx512;
  return code != nullptr ? update_row_dense_simd(T{}, w, n, au, v, db, code, flat0, arena)
                         : update_row_simd(T{}, w, n, au, v, db, flat0, arena);
}

// Exception indices are int32 when W has fewer than 2^31 elements (6 bytes per
// bf16 exception instead of 10).
at::ScalarType exception_index_type(const at::Tensor& W) {
  return W.numel() < (int64_t(1) << 31) ? at::kInt : at::kLong;
}

// Rows per parallel task: enough work to amortise a task (~64K elements).
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(n, 1)); }

// Buffers of dense records, kept for reuse when their record dies: the next
// edit of a same-sized weight then writes to memory that is already mapped
// (a fresh 45 MB buffer costs ~11k page faults, more than the update itself).
// Holds at most kPoolBuffers buffers and kPoolBytes bytes; rank1_pool_release()
// frees them.
class RecordPool {
 public:
  static RecordPool& get() {
    static RecordPool* pool = new RecordPool;  // never destroyed: tensors may outlive static destructors
    return *pool;
  }
  at::Tensor empty_codes(int64_t numel, const at::TensorOptions& opts) {
    const size_t bytes = round_up(size_t(std::max<int64_t>(numel, 1)));
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].first == bytes) {
          p = free_[i].second;
          held_ -= bytes;
          free_.erase(free_.begin() + i);
          break;
        }
      }
    }
    if (p == nullptr) {
      p = std::aligned_alloc(align_for(bytes), bytes);
      TORCH_CHECK(p != nullptr, "rank1_update_: out of memory for a ", bytes, "-byte undo record");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (bytes >= (size_t(4) << 20)) madvise(p, bytes, MADV_HUGEPAGE);  // fewer faults on first touch
#endif
    }
    return at::from_blob(p, {numel}, [bytes](void* q) { RecordPool::get().give_back(q, bytes); },
                         opts.dtype(at::kChar));
  }
  int64_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t freed = int64_t(held_);
    for (auto& b : free_) std::free(b.second);
    free_.clear();
    held_ = 0;
    return freed;
  }
  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(held_);
  }

 private:
  static constexpr size_t kHuge = size_t(2) << 20;  // large buffers are huge-page aligned
  static constexpr size_t kPoolBuffers = 4;
  static constexpr size_t kPoolBytes = size_t(1) << 30;
  static size_t align_for(size_t b) { return b >= 2 * kHuge ? kHuge : 64; }
  static size_t round_up(size_t b) { return (b + align_for(b) - 1) / align_for(b) * align_for(b); }
  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_.size() < kPoolBuffers && held_ + bytes <= kPoolBytes) {
        free_.emplace_back(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;
  size_t held_ = 0;
};

// The sampled miss fraction above which the dense form is used.
// fp32/fp64: for speed. On the 2-core CPU (bench/bench_rank1.py, fp32 4096 x
// 11008) the sparse form costs ~4 ns per miss: 1.4x a bare addr_ at 0.3% misses,
// 1.8x at 2%, 2.4x at 10%; the dense form 1.25-1.5x at any rate.
// 16-bit: torch's addr_ is slow there (0.5-0.8x for the sparse form at 10%
// misses), so dense only where it is also smaller: 1 byte per element against
// 6 bytes (int32 index + value) per miss.
template <class T>
double dense_above(int64_t idx_bytes) {
  return sizeof(typename T::bits_t) == 2 ? 1.0 / double(idx_bytes + 2) : 0.005;
}

template <class T>
bool prefer_dense(const typename T::bits_t* wp, int64_t m, int64_t n, const typename T::acc_t* up,
                  const typename T::acc_t* vp, int64_t k, int64_t idx_bytes) {
  // at least 16 rows and 64K elements (all of a small W), spread over W
  const int64_t rows = std::min<int64_t>(m, std::max<int64_t>(16, ((int64_t(1) << 16) + n - 1) / n));
  RowDelta<typename T::acc_t> rd{up, vp, k, n, {}};
  int64_t misses = 0;
  for (int64_t s = 0; s < rows; ++s) {
    const int64_t i = s * m / rows;
    misses += count_misses_simd(T{}, wp + i * n, n, k == 1 ? up[i] : typename T::acc_t(0), vp, rd.row(i));
  }
  return double(misses) > dense_above<T>(idx_bytes) * double(rows * n);
}

struct Piece {  // what one parallel task found: ranges of its thread's arena
  int64_t begin;
  Arena* arena;
  size_t exc0, exc1, row0, row1;
  uint64_t checksum;
};

template <class T>
Record update_cpu(at::Tensor& W, const at::Tensor& aU, const at::Tensor& VT) {
  using bits_t = typename T::bits_t;
  using acc_t = typename T::acc_t;
  const int64_t m = W.size(0), n = W.size(1), k = aU.size(1);
  const int64_t es = W.element_size();
  const at::ScalarType idx_type = exception_index_type(W);
  const int64_t idx_bytes = c10::elementSize(idx_type);
  bits_t* wp = reinterpret_cast<bits_t*>(W.data_ptr());
  const acc_t* up = aU.data_ptr<acc_t>();
  const acc_t* vp = VT.data_ptr<acc_t>();
  const bool dense = prefer_dense<T>(wp, m, n, up, vp, k, idx_bytes);
  const bool avx512 = avx512_rows().on();
  at::Tensor code = dense ? RecordPool::get().empty_codes(m * n, W.options()) : at::empty({0}, W.options().dtype(at::kChar));
  int8_t* cp = code.data_ptr<int8_t>();

  thread_local Arena thread_arena;  // each pool thread has its own
  std::vector<Arena*> used;
  std::mutex mu;
  std::vector<Piece> pieces;
  at::parallel_for(0, m, grain_rows(n), [&](int64_t b, int64_t e) {
    Arena& ar = thread_arena;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (std::find(used.begin(), used.end(), &ar) == used.end()) {
        used.push_back(&ar);
        ar.exc_idx.clear(), ar.exc_bits.clear(), ar.row_idx.clear(), ar.row_bits.clear();
      }
    }
    Piece p{b, &ar, ar.exc_idx.size(), 0, ar.row_idx.size(), 0, 0};
    RowDelta<acc_t> rd{up, vp, k, n, {}};
    for (int64_t i = b; i < e; ++i) {
      bits_t* w = wp + i * n;
      const acc_t* db = rd.row(i);
      const acc_t au = k == 1 ? up[i] : acc_t(0);
      if (dense) {
        p.checksum += uint64_t(update_row_any<T>(avx512, w, n, au, vp, db, cp + i * n, i * n, ar)) *
                      uint64_t(2 * i + 1);
        continue;
      }
      const size_t before = ar.exc_idx.size();
      p.checksum += uint64_t(update_row_any<T>(avx512, w, n, au, vp, db, nullptr, i * n, ar)) * uint64_t(2 * i + 1);
      const int64_t bad = ar.exc_idx.size() - before;
      if (bad * (idx_bytes + es) > n * es) {
        // The whole original row is smaller than its exception list. Rebuild it:
        // recomputation gives every element but the listed ones.
        ar.row_idx.push_back(i);
        const size_t at_row = ar.row_bits.size();
        for (int64_t j = 0; j < n; ++j) ar.row_bits.push_back(sub_delta<T>(w[j], db ? db[j] : au * vp[j]));
        for (size_t q = before; q < ar.exc_idx.size(); ++q) {
          ar.row_bits[at_row + (ar.exc_idx[q] - i * n)] = ar.exc_bits[q];
        }
        ar.exc_idx.resize(before);
        ar.exc_bits.resize(before);
      }
    }
    if (dense) stream_fence();
    p.exc1 = ar.exc_idx.size();
    p.row1 = ar.row_idx.size();
    std::lock_guard<std::mutex> lock(mu);
    pieces.push_back(p);
  });
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.begin < b.begin; });

  int64_t n_exc = 0, n_rows = 0;
  uint64_t checksum = 0;
  for (const auto& p : pieces) {
    n_exc += p.exc1 - p.exc0;
    n_rows += p.row1 - p.row0;
    checksum += p.checksum;
  }
  auto exc_idx = at::empty({n_exc}, W.options().dtype(idx_type));
  auto exc_val = at::empty({n_exc}, W.options());
  auto row_idx = at::empty({n_rows}, W.options().dtype(at::kLong));
  auto row_val = at::empty({n_rows, n}, W.options());
  int64_t* ri = row_idx.data_ptr<int64_t>();
  bits_t* ev = reinterpret_cast<bits_t*>(exc_val.data_ptr());
  bits_t* rv = reinterpret_cast<bits_t*>(row_val.data_ptr());
  int64_t at_exc = 0;
  for (const auto& p : pieces) {
    const Arena& ar = *p.arena;
    const auto i0 = ar.exc_idx.begin() + p.exc0, i1 = ar.exc_idx.begin() + p.exc1;
    if (idx_type == at::kInt) {
      std::copy(i0, i1, exc_idx.data_ptr<int32_t>() + at_exc);
    } else {
      std::copy(i0, i1, exc_idx.data_ptr<int64_t>() + at_exc);
    }
    at_exc += p.exc1 - p.exc0;
    for (size_t q = p.exc0; q < p.exc1; ++q) *ev++ = bits_t(ar.exc_bits[q]);
    ri = std::copy(ar.row_idx.begin() + p.row0, ar.row_idx.begin() + p.row1, ri);
    for (size_t q = p.row0 * n; q < p.row1 * n; ++q) *rv++ = bits_t(ar.row_bits[q]);
  }
  auto cs = at::scalar_tensor(int64_t(checksum), W.options().dtype(at::kLong));
  return {code, exc_idx, exc_val, row_idx, row_val, cs};
}

template <class T>
void restore_cpu(at::Tensor& W, const at::Tensor& aU, const at::Tensor& VT, const at::Tensor& code) {
  using bits_t = typename T::bits_t;
  using acc_t = typename T::acc_t;
  const int64_t m = W.size(0), n = W.size(1), k = aU.size(1);
  bits_t* wp = reinterpret_cast<bits_t*>(W.data_ptr());
  const acc_t* up = aU.data_ptr<acc_t>();
  const acc_t* vp = VT.data_ptr<acc_t>();
  const int8_t* cp = code.numel() > 0 ? code.data_ptr<int8_t>() : nullptr;
  at::parallel_for(0, m, grain_rows(n), [&](int64_t b, int64_t e) {
    RowDelta<acc_t> rd{up, vp, k, n, {}};
    for (int64_t i = b; i < e; ++i) {
      const acc_t* db = rd.row(i);
      const acc_t au = k == 1 ? up[i] : acc_t(0);
      if (cp != nullptr) {
        restore_row_dense_simd(T{}, wp + i * n, n, au, vp, db, cp + i * n);
      } else {
        restore_row_simd(T{}, wp + i * n, n, au, vp, db);
      }
    }
  });
}

template <class T>
uint64_t checksum_cpu(const at::Tensor& W) {
  using bits_t = typename T::bits_t;
  const int64_t m = W.size(0), n = W.size(1);
  const bits_t* wp = reinterpret_cast<const bits_t*>(W.data_ptr());
  return at::parallel_reduce(
      0, m, grain_rows(n), uint64_t(0),
      [&](int64_t b, int64_t e, uint64_t acc) {
        for (int64_t i = b; i < e; ++i) acc += uint64_t(row_sum_simd(T{}, wp + i * n, n)) * uint64_t(2 * i + 1);
        return acc;
      },
      [](uint64_t a, uint64_t b) { return a + b; });
}

// ---- device-generic path (CUDA, or composite=true): the same arithmetic in ATen ops.

at::ScalarType bits_type(at::ScalarType t) {
  switch (c10::elementSize(t)) {
    case 2: return at::kShort;
    case 4: return at::kInt;
    default: return at::kLong;
  }
}

// Same formula as the CPU loops: sum_i (sum_j fold(bits_ij) mod 2^32) * (2i+1) mod 2^64.
at::Tensor checksum_generic(const at::Tensor& W) {
  const int64_t es = W.element_size();
  at::Tensor b = W.view(bits_type(W.scalar_type())).to(at::kLong);
  const int64_t lo32 = 0xFFFFFFFFLL;
  if (es == 2) b = b.bitwise_and(0xFFFF);
  else if (es == 4) b = b.bitwise_and(lo32);
  else b = b.bitwise_and(lo32).add(b.bitwise_right_shift(32).bitwise_and(lo32));
  const at::Tensor rows = b.sum(1).bitwise_and(lo32);
  const at::Tensor weights = at::arange(W.size(0), W.options().dtype(at::kLong)).mul(2).add(1);
  return rows.mul(weights).sum();
}

at::Tensor delta_generic(const at::Tensor& aU, const at::Tensor& VT) {
  at::Tensor D = aU.slice(1, 0, 1) * VT.slice(0, 0, 1);
  for (int64_t t = 1; t < aU.size(1); ++t) D.add_(aU.slice(1, t, t + 1) * VT.slice(0, t, t + 1));
  return D;
}

Record update_generic(at::Tensor& W, const at::Tensor& aU, const at::Tensor& VT) {
  const at::Tensor D = delta_generic(aU, VT);
  const at::Tensor Wnew = W.to(D.scalar_type()).add(D).to(W.scalar_type());
  const at::Tensor back = Wnew.to(D.scalar_type()).sub(D).to(W.scalar_type());
  const auto bt = bits_type(W.scalar_type());
  const at::Tensor exc_idx =
      back.view(bt).ne(W.view(bt)).view({-1}).nonzero().view({-1}).to(exception_index_type(W));
  const at::Tensor exc_val = W.view({-1}).index_select(0, exc_idx);
  W.copy_(Wnew);
  auto row_idx = at::empty({0}, W.options().dtype(at::kLong));
  auto row_val = at::empty({0, W.size(1)}, W.options());
  return {at::empty({0}, W.options().dtype(at::kChar)), exc_idx, exc_val, row_idx, row_val, checksum_generic(W)};
}

// ---- argument handling shared by update and undo

void check_w(const at::Tensor& W, const char* op) {
  const auto t = W.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
                   ": W must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK_VALUE(W.dim() == 2, op, ": W must be 2-D, got shape ", W.sizes());
  TORCH_CHECK_VALUE(W.is_contiguous(), op,
                    ": W must be contiguous (kncore.ops.rank1_update_ also takes W.t() of a "
                    "contiguous weight)");
}

// (alpha * U) as [m, k] and V^T as [k, n], contiguous, in the maths dtype.
std::pair<at::Tensor, at::Tensor> factors(const at::Tensor& W, const at::Tensor& U, const at::Tensor& V,
                                          double alpha, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(U.scalar_type()) && at::isFloatingType(V.scalar_type()), op,
                   ": u/U and v/V must be floating point, got ", U.scalar_type(), " and ",
                   V.scalar_type());
  TORCH_CHECK_VALUE(U.device() == W.device() && V.device() == W.device(), op,
                    ": W, U and V must be on one device, got W on ", W.device(), ", U on ",
                    U.device(), ", V on ", V.device());
  const at::Tensor U2 = U.dim() == 1 ? U.unsqueeze(1) : U;
  const at::Tensor V2 = V.dim() == 1 ? V.unsqueeze(1) : V;
  TORCH_CHECK_VALUE(U2.dim() == 2 && V2.dim() == 2 && U2.size(0) == W.size(0) &&
                        V2.size(0) == W.size(1) && U2.size(1) == V2.size(1) && U2.size(1) >= 1,
                    op, ": for W of shape ", W.sizes(), " expected u [", W.size(0), "] or U [",
                    W.size(0), ", k] and v [", W.size(1), "] or V [", W.size(1),
                    ", k], got U ", U.sizes(), " and V ", V.sizes());
  const auto acc = W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor aU = U2.to(acc).mul(alpha).contiguous();
  at::Tensor VT = V2.to(acc).t().contiguous();
  return {aU, VT};
}

template <typename F>
auto dispatch_format(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(F32{});
    case at::kDouble: return f(F64{});
    case at::kBFloat16: return f(BF16{});
    default: return f(F16{});
  }
}

}  // namespace

Record rank1_update_(at::Tensor& W, const at::Tensor& U, const at::Tensor& V, double alpha, bool composite) {
  check_w(W, "rank1_update_");
  auto [aU, VT] = factors(W, U, V, alpha, "rank1_update_");
  if (!W.is_cpu() || composite) return update_generic(W, aU, VT);
  return dispatch_format(W.scalar_type(), [&](auto fmt) { return update_cpu<decltype(fmt)>(W, aU, VT); });
}

at::Tensor rank1_checksum(const at::Tensor& W, bool composite) {
  check_w(W, "rank1_checksum");
  if (!W.is_cpu() || composite) return checksum_generic(W);
  const uint64_t cs = dispatch_format(W.scalar_type(), [&](auto fmt) { return checksum_cpu<decltype(fmt)>(W); });
  return at::scalar_tensor(int64_t(cs), W.options().dtype(at::kLong));
}

void rank1_undo_(at::Tensor& W, const at::Tensor& U, const at::Tensor& V, double alpha, const at::Tensor& code,
                 const at::Tensor& exc_idx, const at::Tensor& exc_val, const at::Tensor& row_idx,
                 const at::Tensor& row_val, const at::Tensor& checksum, bool composite) {
  check_w(W, "rank1_undo_");
  auto [aU, VT] = factors(W, U, V, alpha, "rank1_undo_");
  TORCH_CHECK_VALUE(exc_val.scalar_type() == W.scalar_type() && row_val.scalar_type() == W.scalar_type(),
                    "rank1_undo_: the record's dtype ", exc_val.scalar_type(), " does not match W's ",
                    W.scalar_type());
  TORCH_CHECK_VALUE(row_val.dim() == 2 && row_val.size(1) == W.size(1) && row_val.size(0) == row_idx.numel(),
                    "rank1_undo_: the record's rows [", row_val.sizes(), "] do not fit W ", W.sizes());
  const bool dense = code.numel() > 0;
  TORCH_CHECK_VALUE(!dense || (code.scalar_type() == at::kChar && code.is_contiguous() && code.numel() == W.numel() &&
                               code.device() == W.device()),
                    "rank1_undo_: the record's codes (", code.scalar_type(), ", ", code.numel(),
                    " elements) do not fit W ", W.sizes());
  TORCH_CHECK_VALUE(!dense || (W.is_cpu() && !composite),
                    "rank1_undo_: a dense record is made and undone by the CPU kernel only");
  const at::Tensor now = rank1_checksum(W, composite);
  TORCH_CHECK(now.item<int64_t>() == checksum.item<int64_t>(),
              "rank1_undo_: W was modified after rank1_update_ (checksum mismatch); refusing to "
              "undo, since the record only restores the exact tensor it was made from");
  if (!W.is_cpu() || composite) {
    const at::Tensor D = delta_generic(aU, VT);
    W.copy_(W.to(D.scalar_type()).sub(D).to(W.scalar_type()));
  } else {
    dispatch_format(W.scalar_type(), [&](auto fmt) { restore_cpu<decltype(fmt)>(W, aU, VT, code); return 0; });
  }
  if (exc_idx.numel() > 0) W.view({-1}).index_copy_(0, exc_idx.to(at::kLong), exc_val);
  if (row_idx.numel() > 0) W.index_copy_(0, row_idx, row_val);
}

int64_t rank1_pool_release() { return RecordPool::get().release(); }
int64_t rank1_pool_held() { return RecordPool::get().held(); }
bool rank1_avx512(int64_t enable) { return avx512_rows().set(enable, "rank1_avx512"); }

namespace {
Record update_op(at::Tensor& W, const at::Tensor& U, const at::Tensor& V, double alpha, bool composite) {
  auto record = rank1_update_(W, U, V, alpha, composite);
  // Like ATen's in-place ops (torch's ADInplaceOrView fallback only bumps
  // returned tensors); the Python undo record checks W._version.
  W.unsafeGetTensorImpl()->bump_version();
  return record;
}
void undo_op(at::Tensor& W, const at::Tensor& U, const at::Tensor& V, double alpha, const at::Tensor& code,
             const at::Tensor& exc_idx, const at::Tensor& exc_val, const at::Tensor& row_idx,
             const at::Tensor& row_val, const at::Tensor& checksum, bool composite) {
  rank1_undo_(W, U, V, alpha, code, exc_idx, exc_val, row_idx, row_val, checksum, composite);
  W.unsafeGetTensorImpl()->bump_version();
}
at::Tensor checksum_op(const at::Tensor& W, bool composite) { return rank1_checksum(W, composite); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(kncore, m) {
  m.def(
      "rank1_update_(Tensor(a!) W, Tensor U, Tensor V, float alpha=1.0, bool composite=False) -> "
      "(Tensor code, Tensor exc_idx, Tensor exc_val, Tensor row_idx, Tensor row_val, Tensor checksum)");
  m.def(
      "rank1_undo_(Tensor(a!) W, Tensor U, Tensor V, float alpha, Tensor code, Tensor exc_idx, Tensor exc_val, "
      "Tensor row_idx, Tensor row_val, Tensor checksum, bool composite=False) -> ()");
  m.def("rank1_checksum(Tensor W, bool composite=False) -> Tensor");
  // the dense records' buffer pool (no tensors): bytes freed / bytes held
  m.def("rank1_pool_release() -> int", &rank1_pool_release);
  m.def("rank1_pool_held() -> int", &rank1_pool_held);
  // the fp32 AVX-512 rows: -1 asks, 0 switches them off, 1 on (where the CPU has
  // AVX-512); returns whether they are used
  m.def("rank1_avx512(int enable=-1) -> bool", &rank1_avx512);
}

TORCH_LIBRARY_IMPL(kncore, CPU, m) {
  m.impl("rank1_update_", &update_op);
  m.impl("rank1_undo_", &undo_op);
  m.impl("rank1_checksum", &checksum_op);
}
// The CUDA kernels are the device-generic ATen path above.
TORCH_LIBRARY_IMPL(kncore, CUDA, m) {
  m.impl("rank1_update_", &update_op);
  m.impl("rank1_undo_", &undo_op);
  m.impl("rank1_checksum", &checksum_op);
}

// No gradients: a clear error if W requires grad.
TORCH_LIBRARY_IMPL(kncore, Autograd, m) {
  m.impl("rank1_update_", torch::autograd::autogradNotImplementedFallback());
  m.impl("rank1_undo_", torch::autograd::autogradNotImplementedFallback());
  m.impl("rank1_checksum", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace kncore
