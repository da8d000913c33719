// kncore::cov_accumulate_ : C += X^T X (lower triangle only), s += sum(X), n += rows.
//
// Count first (d = 3072, 4096 rows, fp32, 2-core EPYC, bench/bench_cov.py):
// X^T X is 2*rows*d^2 FLOPs; the lower triangle needs half. C.addmm_(X.T, X)
// runs at the machine's matmul peak (~200 GFLOP/s), so the gain must come from
// skipping the upper half while keeping every gemm near peak: the ceiling is
// 2x minus the diagonal leaves computed whole (leaf/(2d)).
//
// How:
// * Recursive halving of [0, d): the off-diagonal rectangle of each node is
//   one gemm (cut into tiles) on views of C, no copy; only the diagonal
//   leaves (<= 64 wide) are computed whole.
// * Small gemms on column slices of a row-major X ran at 60-70% of peak (a
//   128-column slice of 4096 rows touches 4096 pages: TLB misses); on rows of
//   X^T they ran at 93%+. So X is first packed, in row chunks, into a buffer
//   XT [d, r] in the accumulator dtype; the same pass converts bf16/fp16 to
//   fp32/fp64 and gathers the rows the mask keeps.
// * The tiles are dealt to the threads (largest first), each running its
//   gemms on one core, in one parallel region (see triangle_parallel).
// Measured with one thread (CPU time, so other load on the machine does not
// count): 1.85x addmm_ at d = 3072, 1.89x at d = 6400. On a later CPU (Xeon
// with AVX-512, where MKL's sgemm reaches ~97% of the FMA peak) the same code
// ran at 1.64x at d = 3072; so an fp32 accumulator on a CPU with AVX-512 now
// takes "the triangle in AVX-512" below (1.84-2.03x at d = 3072-16384 over
// three runs, bench/results/bench_cov_cpu-2core_*.md). The per-block gemms serve
// fp64 accumulators and CPUs without AVX-512.
//
// On CUDA (or with composite=true) the same recursion runs on a transposed
// view of X, letting cuBLAS read it strided; there is no TLB problem to fix.
#include "kncore.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace kncore {
namespace {

constexpr int64_t kSplitAlign = 32;  // split points are multiples of this
constexpr int64_t kLeafCpu = 64;     // vs 128: +1% at d = 3072 and 6400 (one thread, CPU time)
constexpr int64_t kLeafGpu = 512;    // not measured (no GPU yet); small gemms underfill a GPU
constexpr int64_t kPackBytes = 16 << 20;  // XT chunk: 8-64 MiB measured within 1% at d = 3072/6400
constexpr int64_t kMinChunkRows = 1024;  // C is re-read per chunk: at d = 16384 fp64, 256-row chunks
                                         // would add ~10% of memory traffic (estimate, not measured)
constexpr int64_t kKeepBytes = 64 << 20;  // largest XT buffer kept between calls

// The XT buffer is kept between calls (per thread): a fresh 16 MiB buffer is
// mmap'ed by glibc every time (it sits at the dynamic mmap threshold) and its
// page faults cost as much as packing X into it.
at::Tensor workspace(int64_t numel, at::ScalarType dtype) {
  if (numel * c10::elementSize(dtype) > kKeepBytes) return at::empty({numel}, at::TensorOptions().dtype(dtype));
  thread_local at::Tensor ws;
  if (!ws.defined() || ws.scalar_type() != dtype || ws.numel() < numel) {
    ws = at::Tensor();  // free the old one first
    ws = at::empty({numel}, at::TensorOptions().dtype(dtype));
  }
  return ws.narrow(0, 0, numel);
}

// Blocks C[r0:r1, c0:c1] += XT[r0:r1] XT[c0:c1]^T covering the lower triangle
// of C[lo:hi, lo:hi]: recursive halving; the off-diagonal rectangle of each
// node is cut into tiles of at most `tile` a side, diagonal leaves (<= leaf
// wide) are computed whole.
struct Block {
  int64_t r0, r1, c0, c1;
  double flops() const { return double(r1 - r0) * double(c1 - c0); }
};

void triangle_blocks(int64_t lo, int64_t hi, int64_t leaf, int64_t tile, std::vector<Block>& out) {
  if (hi - lo <= leaf) {
    out.push_back({lo, hi, lo, hi});
    return;
  }
  const int64_t mid = lo + ((hi - lo) / 2 + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  for (int64_t r = mid; r < hi; r += tile)
    for (int64_t c = lo; c < mid; c += tile) out.push_back({r, std::min(hi, r + tile), c, std::min(mid, c + tile)});
  triangle_blocks(lo, mid, leaf, tile, out);
  triangle_blocks(mid, hi, leaf, tile, out);
}

void gemm_block(at::Tensor& C, const at::Tensor& XT, const Block& b) {
  C.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1).addmm_(XT.slice(0, b.r0, b.r1), XT.slice(0, b.c0, b.c1).t());
}

// GPU: the blocks one after another, cuBLAS fills the device.
void triangle_sequential(at::Tensor& C, const at::Tensor& XT, int64_t leaf) {
  std::vector<Block> blocks;
  triangle_blocks(0, C.size(0), leaf, C.size(0), blocks);
  for (const Block& b : blocks) gemm_block(C, XT, b);
}

// CPU: one parallel region. The threads take blocks, largest first, from a
// shared counter (so a descheduled thread holds back no fixed share) and run
// each gemm on one core. Letting the BLAS thread every gemm instead measured
// 0.5-1.3x addmm_ at d = 3072 on the shared 2-core machine, against 1.6-1.75x
// for this: each small gemm then ends in a thread barrier.
void triangle_parallel(at::Tensor& C, const at::Tensor& XT, int64_t leaf) {
  const int64_t d = C.size(0), threads = std::max(1, at::get_num_threads());
  // Tiles small enough to share out, large enough to run near peak.
  const double ideal = double(d) / std::sqrt(4.0 * double(threads));
  const int64_t tile = std::clamp<int64_t>(int64_t(ideal) / kSplitAlign * kSplitAlign, 256, 1024);
  std::vector<Block> blocks;
  triangle_blocks(0, d, leaf, tile, blocks);
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.flops() > b.flops(); });
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (size_t i = next++; i < blocks.size(); i = next++) gemm_block(C, XT, blocks[i]);
  });
}

#if defined(__SSE2__)
// 4x4 register transposes. A scalar tiled transpose ran at ~1.7 ns/element;
// this one at ~0.5 (3072 x 1344 fp32, one core): packing then costs ~1% of the op.
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
}
inline __m128 load4(const c10::Half* p) {
  return _mm_setr_ps(float(p[0]), float(p[1]), float(p[2]), float(p[3]));
}
inline void store4(float* p, __m128 v) { _mm_storeu_ps(p, v); }
inline void store4(double* p, __m128 v) {
  _mm_storeu_pd(p, _mm_cvtps_pd(v));
  _mm_storeu_pd(p + 2, _mm_cvtps_pd(_mm_movehl_ps(v, v)));
}
template <typename in_t>
constexpr bool kTranspose4 = !std::is_same_v<in_t, double>;
#else
template <typename in_t>
constexpr bool kTranspose4 = false;
#endif

// out[c, j] = X[row(r0 + j), c] for j < r, converted to acc_t. rows == nullptr
// means row(i) = i. Threads split the columns; tiles of 64 columns x 32 rows.
template <typename in_t, typename acc_t>
void pack_transposed(const in_t* X, int64_t d, const int64_t* rows, int64_t r0, int64_t r,
                     acc_t* out) {
  constexpr int64_t TC = 64, TR = 32;
  auto src_row = [&](int64_t j) { return X + (rows ? rows[r0 + j] : r0 + j) * d; };
  at::parallel_for(0, (d + TC - 1) / TC, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * TC, c1 = std::min(d, c0 + TC);
      for (int64_t j0 = 0; j0 < r; j0 += TR) {
        const int64_t j1 = std::min(r, j0 + TR);
        int64_t j = j0;
        if constexpr (kTranspose4<in_t>) {
          for (; j + 4 <= j1; j += 4) {
            const in_t *s0 = src_row(j), *s1 = src_row(j + 1), *s2 = src_row(j + 2), *s3 = src_row(j + 3);
            int64_t c = c0;
            for (; c + 4 <= c1; c += 4) {
              __m128 a = load4(s0 + c), b = load4(s1 + c), e = load4(s2 + c), f = load4(s3 + c);
              _MM_TRANSPOSE4_PS(a, b, e, f);
              acc_t* o = out + c * r + j;
              store4(o, a);
              store4(o + r, b);
              store4(o + 2 * r, e);
              store4(o + 3 * r, f);
            }
            for (; c < c1; ++c) {
              for (int64_t q = 0; q < 4; ++q) out[c * r + j + q] = static_cast<acc_t>(src_row(j + q)[c]);
            }
          }
        }
        for (; j < j1; ++j) {
          const in_t* src = src_row(j);
          for (int64_t c = c0; c < c1; ++c) out[c * r + j] = static_cast<acc_t>(src[c]);
        }
      }
    }
  });
}

template <typename acc_t>
void pack_dispatch(const at::Tensor& X, const int64_t* rows, int64_t r0, int64_t r, acc_t* out) {
  const int64_t d = X.size(1);
  switch (X.scalar_type()) {
    case at::kFloat: return pack_transposed(X.data_ptr<float>(), d, rows, r0, r, out);
    case at::kDouble: return pack_transposed(X.data_ptr<double>(), d, rows, r0, r, out);
    case at::kBFloat16: return pack_transposed(X.data_ptr<c10::BFloat16>(), d, rows, r0, r, out);
    case at::kHalf: return pack_transposed(X.data_ptr<c10::Half>(), d, rows, r0, r, out);
    default: TORCH_CHECK_TYPE(false, "cov_accumulate_: unsupported X dtype ", X.scalar_type());
  }
}

// ---- fp32 accumulator: the triangle in AVX-512 (CPU)
// On a CPU where MKL's sgemm runs at ~97% of the FMA peak (the 2-core Xeon of
// bench/bench_cov.py, 2026-12), the per-block gemms above lose to it on every
// small block (a 256 x 256 block ran at ~90% of a large gemm, a 64 x 64 leaf
// at ~55%) and reached 1.58-1.65x addmm_ at d = 3072, under the 1.85x target.
// This path computes the lower triangle with one register-blocked kernel
// instead: tiles of 12 rows x 32 columns of C, so only the tiles that cross
// the diagonal compute some upper elements (unspecified, as above).
// * X is packed in chunks of rows (kPackMaxBytes, in blocks of kc rows),
//   twice: J panels [kc][32] (32 columns of each row, the vector operand)
//   and I panels [kc][12] (12 columns, the broadcast operand). Rows of
//   row-major X are copied, not transposed; bf16 and fp16 are widened and
//   masked rows gathered in the same pass, which also adds the column sums
//   to s.
// * A tile keeps its 12 x 32 sums in 24 zmm registers over kc rows, then adds
//   them to C. The I panel stays in L1, the J panels of a block of columns in
//   L2 (kJBlockBytes), streamed in the kernel's inner loop.
// * Work items (a block of columns x a few I panels) go to the threads
//   largest first from a shared counter, as in triangle_parallel.
// Measured on that CPU (2 threads, d = 3072, 4096 rows): the kernel alone
// runs at ~200 GFLOP/s per core on data in L1 (a standalone loop), the op's
// tiles at ~92% of that over the whole triangle, and the copying takes ~5%.
// rows x cols of the sums are the usual fp32 dot products with FMA, summed
// in chunks of kc: error as a blocked gemm's (tests: within 2x torch's).
#if KN_AVX512_CODE
KN_AVX512_WARNINGS_OFF

constexpr int64_t kMR = 12;                // rows of a tile (broadcast operand)
constexpr int64_t kNR = 32;                // columns of a tile (two zmm)
// rows of X per kernel call: each tile sums kc products in a register before adding to C.
// kc = 256 gave up to 2.2x the error of torch's addmm_ on a 2-core AMD EPYC with
// AVX-512 (d = 12-33, 255-257 rows; MKL blocks k more finely there), past the
// tests' bar of 2x; kc = 128 gave at most 0.70x of that bar over 20 draws of
// every shape the test uses. (On the Xeon, 192 and 384 ran alike with 256.)
constexpr int64_t kKC = 128;
constexpr int64_t kJBlockBytes = 1 << 20;  // J panels of a work item's columns: L2
constexpr int64_t kItemPanels = 8;         // I panels per work item (16 and 32 measured alike at d = 3072)
constexpr int64_t kPackMaxBytes = 8 << 20;  // both formats of one chunk of rows (16 MiB: alike)

KN_AVX512_TARGET inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
KN_AVX512_TARGET inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {  // bf16 -> fp32 is a 16-bit shift
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
KN_AVX512_TARGET inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
// Panels of a [d, d] triangle: J panels of kNR columns, I panels of kMR rows.
inline int64_t j_panels(int64_t d) { return (d + kNR - 1) / kNR; }
inline int64_t i_panels(int64_t d) { return (d + kMR - 1) / kMR; }

// The first n of 16 lanes.
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Packs rows r0..r0+kb of X (through `rows` when masked), columns 96t to
// 96t+95 (3 J panels, 8 I panels), into J and I, zero past column d, and adds
// those columns' sums to s. Each block of kc rows is stored whole,
// [kb/kc][nq][kc][32] and [kb/kc][np][kc][12], so the panels one kernel loop
// streams are contiguous (with panels kb rows long, the loop's 32 panels sat
// 128 KiB apart, in the same L2 sets: 1.67x addmm_, not 1.73x). Row by row:
// each row's 96 columns are read from memory once (a panel at a time, they
// were read 11 times: the copy took 1.3x longer), and rows kAhead ahead are
// prefetched (the copy waits on the memory's latency row after row: the op
// went from 1.83-1.84x addmm_ to 1.86-1.89x, medians of 9 interleaved pairs).
constexpr int64_t kPackCols = 96;  // a multiple of kNR and kMR
template <typename in_t>
KN_AVX512_TARGET void pack_columns(const in_t* X, int64_t d, const int64_t* rows, int64_t r0, int64_t kb,
                                   float* J, float* I, float* s, int64_t t) {
  constexpr int64_t kQ = kPackCols / kNR, kP = kPackCols / kMR;
  const int64_t nq = j_panels(d), np = i_panels(d);
  const int64_t c0 = t * kPackCols;
  auto row = [=](int64_t k) { return X + (rows ? rows[r0 + k] : r0 + k) * d + c0; };  // columns c0.. of row k
  __mmask16 mj[2 * kQ], mi[kP];
  for (int64_t v = 0; v < 2 * kQ; ++v) mj[v] = lanes(d - c0 - 16 * v);
  for (int64_t v = 0; v < kP; ++v) mi[v] = lanes(std::min(kMR, d - c0 - kMR * v));
  const int64_t nj = std::min(kQ, nq - t * kQ), ni = std::min(kP, np - t * kP);
  __m512 sum[2 * kQ];
  for (int64_t v = 0; v < 2 * kQ; ++v) sum[v] = _mm512_setzero_ps();
  constexpr int64_t kAhead = 8;  // rows: their lines are fetched while this one is copied
  for (int64_t k = 0; k < kb; ++k) {
    const in_t* src = row(k);
    if (k + kAhead < kb) {
      const char* next = reinterpret_cast<const char*>(row(k + kAhead));
      const int64_t bytes = std::min(kPackCols, d - c0) * int64_t(sizeof(in_t));
      for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    const int64_t blk = k / kKC, kk = k % kKC;
    float* oj = J + ((blk * nq + t * kQ) * kKC + kk) * kNR;
    for (int64_t q = 0; q < nj; ++q) {
      const __m512 a = load16(src + kNR * q, mj[2 * q]), b = load16(src + kNR * q + 16, mj[2 * q + 1]);
      _mm512_store_ps(oj + q * kKC * kNR, a);
      _mm512_store_ps(oj + q * kKC * kNR + 16, b);
      sum[2 * q] = _mm512_add_ps(sum[2 * q], a);
      sum[2 * q + 1] = _mm512_add_ps(sum[2 * q + 1], b);
    }
    float* oi = I + ((blk * np + t * kP) * kKC + kk) * kMR;
    for (int64_t p = 0; p < ni; ++p)  // (the row's lines are in L1 now)
      _mm512_mask_storeu_ps(oi + p * kKC * kMR, lanes(kMR), load16(src + kMR * p, mi[p]));
  }
  for (int64_t v = 0; v < 2 * nj; ++v)
    _mm512_mask_storeu_ps(s + c0 + 16 * v, mj[v], _mm512_add_ps(_mm512_maskz_loadu_ps(mj[v], s + c0 + 16 * v), sum[v]));
}

// C[0:rows, 0:32] += sum_k A[k][0:12]^T B[k][0:32] (A: an I panel, B: a J panel).
template <bool kFull>
KN_AVX512_TARGET inline void tile_12x32(int64_t kc, const float* A, const float* B, float* C, int64_t ldc,
                                        int64_t rows, __mmask16 m0, __mmask16 m1) {
  __m512 c0[kMR], c1[kMR];
  for (int r = 0; r < kMR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {  // C's lines arrive while the sums are made
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + 16), _MM_HINT_T0);
  }
  // B's rows 32 ahead (past the panel's end: the next panel, which follows it);
  // an address, not a pointer, as it may lie past the buffer (prefetches never fault)
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(B) + 32 * kNR * sizeof(float);
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(B + k * kNR), b1 = _mm512_load_ps(B + k * kNR + 16);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + k * kNR * sizeof(float)), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + k * kNR * sizeof(float) + 64), _MM_HINT_T0);
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      const __m512 a = _mm512_set1_ps(A[k * kMR + r]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  if constexpr (kFull) {
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      float* c = C + r * ldc;
      _mm512_storeu_ps(c, _mm512_add_ps(_mm512_loadu_ps(c), c0[r]));
      _mm512_storeu_ps(c + 16, _mm512_add_ps(_mm512_loadu_ps(c + 16), c1[r]));
    }
  } else {
    for (int r = 0; r < kMR; ++r) {
      if (r >= rows) break;
      float* c = C + r * ldc;
      _mm512_mask_storeu_ps(c, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), c0[r]));
      _mm512_mask_storeu_ps(c + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + 16), c1[r]));
    }
  }
}

struct TriItem {  // I panels p0..p1 against the J panels q0..q1 (those at or left of the diagonal)
  int64_t q0, q1, p0, p1;
  int64_t tiles;
};

std::vector<TriItem> triangle_items(int64_t d) {
  const int64_t nq = j_panels(d), np = i_panels(d);
  const int64_t qb = std::max<int64_t>(1, kJBlockBytes / (kKC * kNR * int64_t(sizeof(float))));
  std::vector<TriItem> items;
  for (int64_t q0 = 0; q0 < nq; q0 += qb) {
    const int64_t q1 = std::min(nq, q0 + qb);
    for (int64_t p0 = (q0 * kNR) / kMR; p0 < np; p0 += kItemPanels) {
      TriItem it{q0, q1, p0, std::min(np, p0 + kItemPanels), 0};
      for (int64_t p = it.p0; p < it.p1; ++p) {
        const int64_t last = std::min(d, (p + 1) * kMR) - 1;  // the panel's last row
        it.tiles += std::max<int64_t>(0, std::min(q1 - 1, last / kNR) - q0 + 1);
      }
      if (it.tiles > 0) items.push_back(it);
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const TriItem& a, const TriItem& b) { return a.tiles > b.tiles; });
  return items;
}

KN_AVX512_TARGET void triangle_item(float* C, int64_t d, const float* J, const float* I, int64_t kb,
                                    const TriItem& it) {
  const int64_t nq = j_panels(d), np = i_panels(d);
  for (int64_t k0 = 0; k0 < kb; k0 += kKC) {
    const int64_t kc = std::min(kKC, kb - k0);
    const float* Jk = J + (k0 / kKC) * nq * kKC * kNR;
    const float* Ik = I + (k0 / kKC) * np * kKC * kMR;
    for (int64_t p = it.p0; p < it.p1; ++p) {
      const int64_t i0 = p * kMR, rows = std::min(kMR, d - i0);
      const int64_t qlast = std::min(it.q1 - 1, (i0 + rows - 1) / kNR);
      const float* A = Ik + p * kKC * kMR;
      for (int64_t q = it.q0; q <= qlast; ++q) {
        const int64_t j0 = q * kNR;
        const float* B = Jk + q * kKC * kNR;
        float* c = C + i0 * d + j0;
        if (rows == kMR && j0 + kNR <= d) {
          tile_12x32<true>(kc, A, B, c, d, rows, 0, 0);
        } else {
          tile_12x32<false>(kc, A, B, c, d, rows, lanes(d - j0), lanes(d - j0 - 16));
        }
      }
    }
  }
}

template <typename in_t>
void cov_fp32_avx512(at::Tensor& C, at::Tensor& s, const at::Tensor& X, const int64_t* rows_ptr, int64_t rows) {
  const int64_t d = C.size(0);
  const int64_t nq = j_panels(d), np = i_panels(d);
  const int64_t per_row = (nq * kNR + np * kMR) * int64_t(sizeof(float));
  // rows per chunk: a multiple of kc, as many as kPackMaxBytes holds (at least kc), in equal chunks
  const int64_t most = std::max(kKC, kPackMaxBytes / per_row / kKC * kKC);
  const int64_t n_chunks = (rows + most - 1) / most;
  const int64_t kb_max = std::min(rows, (rows + n_chunks - 1) / n_chunks);
  const int64_t kb_pad = (kb_max + kKC - 1) / kKC * kKC;  // whole blocks of kc rows
  at::Tensor buf = workspace((nq * kNR + np * kMR) * kb_pad + 64, at::kFloat);
  float* base = buf.data_ptr<float>();
  float* J = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63));
  float* I = J + nq * kNR * kb_pad;  // (a multiple of 16 floats: I stays 64-byte aligned)
  const std::vector<TriItem> items = triangle_items(d);
  const in_t* xp = X.data_ptr<in_t>();
  float* sp = s.data_ptr<float>();
  float* cp = C.data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += kb_max) {
    const int64_t kb = std::min(kb_max, rows - r0);
    at::parallel_for(0, (d + kPackCols - 1) / kPackCols, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) pack_columns(xp, d, rows_ptr, r0, kb, J, I, sp, t);
    });
    // the items go to the threads largest first, from a shared counter
    std::atomic<size_t> next{0};
    at::parallel_for(0, std::max(1, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      for (size_t t = next++; t < items.size(); t = next++) triangle_item(cp, d, J, I, kb, items[t]);
    });
  }
}
KN_AVX512_WARNINGS_ON
#endif  // fp32 triangle in AVX-512

Avx512Switch& avx512_triangle() {
  static Avx512Switch on;
  return on;
}

void check_args(const at::Tensor& C, const at::Tensor& s, const at::Tensor& n, const at::Tensor& X,
                const c10::optional<at::Tensor>& mask) {
  const auto ct = C.scalar_type(), xt = X.scalar_type();
  TORCH_CHECK_TYPE(ct == at::kFloat || ct == at::kDouble,
                   "cov_accumulate_: accumulator C must be float32 or float64, got ", ct);
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf || xt == at::kDouble,
                   "cov_accumulate_: X must be float32, bfloat16 or float16 (or float64 with a "
                   "float64 accumulator), got ", xt);
  TORCH_CHECK_TYPE(!(xt == at::kDouble && ct == at::kFloat),
                   "cov_accumulate_: float64 X with a float32 accumulator would lose precision; "
                   "use a float64 accumulator");
  TORCH_CHECK_TYPE(s.scalar_type() == ct, "cov_accumulate_: running sum s must have C's dtype ", ct,
                   ", got ", s.scalar_type());
  TORCH_CHECK_TYPE(n.scalar_type() == at::kLong, "cov_accumulate_: row count n must be int64, got ",
                   n.scalar_type());
  TORCH_CHECK_VALUE(C.dim() == 2 && C.size(0) == C.size(1),
                    "cov_accumulate_: C must be a square [d, d] matrix, got shape ", C.sizes());
  const int64_t d = C.size(0);
  TORCH_CHECK_VALUE(X.dim() == 2 && X.size(1) == d, "cov_accumulate_: X must be [rows, ", d,
                    "] to match C, got shape ", X.sizes());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == d, "cov_accumulate_: s must be [", d, "], got shape ",
                    s.sizes());
  TORCH_CHECK_VALUE(n.numel() == 1, "cov_accumulate_: n must hold one element, got shape ", n.sizes());
  TORCH_CHECK_VALUE(C.is_contiguous(), "cov_accumulate_: C must be contiguous");
  TORCH_CHECK_VALUE(s.is_contiguous(), "cov_accumulate_: s must be contiguous");
  TORCH_CHECK_VALUE(X.is_contiguous(), "cov_accumulate_: X must be contiguous (call X.contiguous())");
  TORCH_CHECK_VALUE(s.device() == C.device() && n.device() == C.device() && X.device() == C.device(),
                    "cov_accumulate_: C, s, n and X must be on one device, got C on ", C.device(),
                    ", s on ", s.device(), ", n on ", n.device(), ", X on ", X.device());
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "cov_accumulate_: mask must be bool, got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == X.size(0), "cov_accumulate_: mask must be [",
                      X.size(0), "] (one flag per row of X), got shape ", mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == X.device(), "cov_accumulate_: mask must be on X's device ",
                      X.device(), ", got ", mask->device());
  }
}

}  // namespace

void cov_accumulate_(at::Tensor& C, at::Tensor& s, at::Tensor& n, const at::Tensor& X,
                     const c10::optional<at::Tensor>& mask, bool composite) {
  check_args(C, s, n, X, mask);
  const int64_t d = C.size(0);
  at::Tensor idx;  // kept rows, when masked
  int64_t rows = X.size(0);
  if (mask.has_value() && mask->defined()) {
    idx = mask->nonzero().view({-1}).contiguous();
    rows = idx.numel();
  }
  if (rows == 0) return;
  n.add_(rows);
  if (d == 0) return;

  if (!X.is_cpu() || composite) {
    const at::Tensor Xk = idx.defined() ? X.index_select(0, idx) : X;
    const at::Tensor XT = Xk.to(C.scalar_type()).t();
    s.add_(XT.sum(1));
    if (X.is_cpu()) {
      triangle_parallel(C, XT, kLeafCpu);
    } else {
      triangle_sequential(C, XT, kLeafGpu);
    }
    return;
  }

#if KN_AVX512_CODE
  if (C.scalar_type() == at::kFloat && avx512_triangle().on()) {
    const int64_t* rows_ptr = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
    switch (X.scalar_type()) {
      case at::kFloat: return cov_fp32_avx512<float>(C, s, X, rows_ptr, rows);
      case at::kBFloat16: return cov_fp32_avx512<c10::BFloat16>(C, s, X, rows_ptr, rows);
      case at::kHalf: return cov_fp32_avx512<c10::Half>(C, s, X, rows_ptr, rows);
      default: break;  // (float64 X needs a float64 accumulator: refused above)
    }
  }
#endif
  const int64_t esz = C.element_size();
  const int64_t chunk = std::min(rows, std::max(kMinChunkRows, kPackBytes / (d * esz) / 64 * 64));
  at::Tensor buf = workspace(d * chunk, C.scalar_type());
  const int64_t* rows_ptr = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r = std::min(chunk, rows - r0);
    at::Tensor XT = buf.narrow(0, 0, d * r).view({d, r});
    if (C.scalar_type() == at::kFloat) {
      pack_dispatch(X, rows_ptr, r0, r, XT.data_ptr<float>());
    } else {
      pack_dispatch(X, rows_ptr, r0, r, XT.data_ptr<double>());
    }
    s.add_(XT.sum(1));
    triangle_parallel(C, XT, kLeafCpu);
  }
}

namespace {
void cov_accumulate_op(at::Tensor& C, at::Tensor& s, at::Tensor& n, const at::Tensor& X,
                       const c10::optional<at::Tensor>& mask, bool composite) {
  cov_accumulate_(C, s, n, X, mask, composite);
  // Like ATen's in-place ops. torch's ADInplaceOrView fallback only bumps
  // tensors that are also returned, and these ops return nothing.
  for (at::Tensor* t : {&C, &s, &n}) t->unsafeGetTensorImpl()->bump_version();
}
}  // namespace

bool cov_avx512(int64_t enable) { return avx512_triangle().set(enable, "cov_avx512"); }

TORCH_LIBRARY_FRAGMENT(kncore, m) {
  // the fp32 AVX-512 triangle: -1 asks, 0 switches it off (the per-block
  // gemms run), 1 on (where the CPU has AVX-512); returns whether it is used
  m.def("cov_avx512(int enable=-1) -> bool", &cov_avx512);
  m.def(
      "cov_accumulate_(Tensor(a!) C, Tensor(b!) s, Tensor(c!) n, Tensor X, Tensor? mask=None, "
      "bool composite=False) -> ()");
}

TORCH_LIBRARY_IMPL(kncore, CPU, m) { m.impl("cov_accumulate_", &cov_accumulate_op); }
// Only ATen calls: the CUDA kernel is the same function (cuBLAS via addmm_).
TORCH_LIBRARY_IMPL(kncore, CUDA, m) { m.impl("cov_accumulate_", &cov_accumulate_op); }
// No gradients: a clear error if an input that requires grad is mutated.
TORCH_LIBRARY_IMPL(kncore, Autograd, m) {
  m.impl("cov_accumulate_", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace kncore
