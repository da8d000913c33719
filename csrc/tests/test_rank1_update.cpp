// C++ unit tests of kncore::rank1_update_ / rank1_undo_: same numbers as the
// float32/float64 maths, bit-exact undo, refusal of a modified W.
#include <random>

#include "check.h"
#include "kncore.h"

using kncore_test::check_throws;

namespace {

at::Tensor bits(const at::Tensor& t) {
  const auto bt = t.element_size() == 2 ? at::kShort : t.element_size() == 4 ? at::kInt : at::kLong;
  return t.view(bt).clone();
}

// Random weight with the values that make undo hard: tiny, -0.0, nan, inf.
at::Tensor weight(int64_t m, int64_t n, at::ScalarType dt) {
  at::Tensor W = at::randn({m, n}, at::kDouble) * 0.05;
  auto flat = W.view({-1});
  flat.slice(0, 0, m * n, 7).mul_(1e-4);
  flat[1] = -0.0;
  flat[2] = std::numeric_limits<double>::quiet_NaN();
  flat[3] = std::numeric_limits<double>::infinity();
  return W.to(dt);
}

// scale sets the delta's size: 1 gives misses nearly everywhere (the dense
// form on the CPU), 1e-9 few (the sparse form, for all but float64).
void check_exact(at::ScalarType dt, int64_t k, bool composite, double scale) {
  const int64_t m = 37, n = 123;
  at::Tensor W = weight(m, n, dt);
  const at::Tensor W0 = W.clone();
  const at::Tensor U = at::randn({m, k}) * scale, V = at::randn({n, k});
  const double alpha = 0.75;
  auto [code, ei, ev, ri, rv, cs] = kncore::rank1_update_(W, U, V, alpha, composite);
  KN_CHECK(code.numel() == 0 || (!composite && code.numel() == m * n));
  if (!composite && scale >= 1) KN_CHECK(code.numel() == m * n);

  // Same numbers as round(float(W) + sum_t (alpha U_t) V_t^T) (nan where that is nan).
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor aU = U.to(acc) * alpha, VT = V.to(acc).t();
  at::Tensor D = aU.slice(1, 0, 1) * VT.slice(0, 0, 1);
  for (int64_t t = 1; t < k; ++t) D = D + aU.slice(1, t, t + 1) * VT.slice(0, t, t + 1);
  const at::Tensor expect = (W0.to(acc) + D).to(dt);
  const at::Tensor same = (W == expect) | (at::isnan(W) & at::isnan(expect));
  KN_CHECK(same.all().item<bool>());

  KN_CHECK(kncore::rank1_checksum(W, false).item<int64_t>() == kncore::rank1_checksum(W, true).item<int64_t>());
  kncore::rank1_undo_(W, U, V, alpha, code, ei, ev, ri, rv, cs, composite);
  const bool exact = at::equal(bits(W), bits(W0));
  if (!exact)
    std::fprintf(stderr, "%s k=%ld composite=%d scale=%g: undo not bit-exact\n", c10::toString(dt), (long)k,
                 composite, scale);
  KN_CHECK(exact);
}

}  // namespace

int main() {
  const uint64_t seed = kncore_test::seed();
  std::printf("seed %llu\n", (unsigned long long)seed);
  at::manual_seed(seed);

  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble})
    for (int64_t k : {1, 3})
      for (bool composite : {false, true})
        for (double scale : {1.0, 1e-9}) check_exact(dt, k, composite, scale);
  // fp32 again with the portable rows where the AVX-512 ones ran above
  const bool avx512 = kncore::rank1_avx512(-1);
  if (avx512) {
    KN_CHECK(!kncore::rank1_avx512(0));
    for (int64_t k : {1, 3})
      for (double scale : {1.0, 1e-9}) check_exact(at::kFloat, k, false, scale);
    KN_CHECK(kncore::rank1_avx512(1));
  }
  std::printf("fp32 AVX-512 rows: %s\n", avx512 ? "tested against the portable ones" : "not on this CPU");

  // A W changed after the update is refused, and left as it is.
  {
    at::Tensor W = weight(8, 9, at::kFloat);
    const at::Tensor u = at::randn({8}), v = at::randn({9});
    auto [code, ei, ev, ri, rv, cs] = kncore::rank1_update_(W, u, v, 1.0);
    W[2][3] = 5.0;
    const at::Tensor before = W.clone();
    check_throws<c10::Error>("modified W", [&] { kncore::rank1_undo_(W, u, v, 1.0, code, ei, ev, ri, rv, cs); }, "checksum");
    KN_CHECK(at::equal(bits(W), bits(before)));
  }

  // Errors name the problem.
  at::Tensor W = at::randn({4, 6});
  check_throws<c10::TypeError>("int W", [&] { at::Tensor Wi = W.to(at::kInt); kncore::rank1_update_(Wi, at::randn({4}), at::randn({6}), 1.0); }, "W must be");
  check_throws<c10::ValueError>("shapes", [&] { kncore::rank1_update_(W, at::randn({6}), at::randn({4}), 1.0); }, "expected u [4]");
  check_throws<c10::ValueError>("strided W", [&] { at::Tensor Wt = W.t(); kncore::rank1_update_(Wt, at::randn({6}), at::randn({4}), 1.0); }, "contiguous");
  return kncore_test::report("test_rank1_update");
}
