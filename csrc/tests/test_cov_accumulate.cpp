// C++ unit tests of kncore::cov_accumulate_ against a float64 reference
// (random inputs from a fixed seed, KNCORE_TEST_SEED to change it; printed).
#include <ATen/core/dispatch/Dispatcher.h>

#include <random>

#include "check.h"
#include "kncore.h"

using kncore_test::check_throws;

namespace {

double rel(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>() /
         std::max(b.to(at::kDouble).norm().item<double>(), 1e-300);
}

at::Tensor mirror(const at::Tensor& C) { return C.tril() + C.tril(-1).t(); }

void check_case(int64_t d, at::ScalarType xt, at::ScalarType acc, bool composite, bool masked) {
  const int64_t rows = 257 + d % 5;
  const at::Tensor X = (at::randn({rows, d}, at::kDouble) * 2 + 0.5).to(xt);
  const at::Tensor mask = at::rand({rows}) > 0.3;
  const at::Tensor A = at::randn({d, d}, at::kDouble);
  const at::Tensor C0 = (A + A.t()).to(acc);
  at::Tensor C = C0.clone(), s = at::zeros({d}, at::TensorOptions().dtype(acc));
  at::Tensor n = at::zeros({}, at::kLong);
  kncore::cov_accumulate_(C, s, n, X, masked ? c10::optional<at::Tensor>(mask) : c10::nullopt, composite);

  const at::Tensor Xk = masked ? X.index({mask}).to(at::kDouble) : X.to(at::kDouble);
  const at::Tensor exact = C0.to(at::kDouble) + Xk.t().mm(Xk);
  double bar = 1e-6;
  if (acc == at::kFloat) {  // 2x torch's own addmm_ in the inputs' precision, at least two ulps (one measured 1.21e-7)
    const at::Tensor Xl = masked ? X.index({mask}) : X;
    const at::Tensor theirs = C0.to(xt).addmm_(Xl.t(), Xl);
    bar = std::max(2 * rel(theirs, exact), 2.4e-7);
  }
  const double err = rel(mirror(C), exact);
  if (err > bar) {
    std::fprintf(stderr, "d=%ld X %s acc %s composite=%d masked=%d: error %.3g > %.3g\n", (long)d,
                 c10::toString(xt), c10::toString(acc), composite, masked, err, bar);
  }
  KN_CHECK(err <= bar);
  KN_CHECK(n.item<int64_t>() == Xk.size(0));
  KN_CHECK(rel(s, Xk.sum(0)) <= (acc == at::kDouble ? 1e-9 : 1e-4));
}

}  // namespace

int main() {
  const uint64_t seed = kncore_test::seed();
  std::printf("seed %llu\n", (unsigned long long)seed);
  at::manual_seed(seed);

  for (int64_t d : {1, 7, 123, 300})
    for (auto xt : {at::kFloat, at::kBFloat16, at::kHalf})
      for (auto acc : {at::kFloat, at::kDouble})
        for (bool composite : {false, true}) check_case(d, xt, acc, composite, /*masked=*/d % 2 == 1);
  // the fp32 accumulator again with the per-block gemms, where the AVX-512 triangle ran above
  const bool avx512 = kncore::cov_avx512(-1);
  if (avx512) {
    KN_CHECK(!kncore::cov_avx512(0));
    for (int64_t d : {1, 7, 123, 300})
      for (auto xt : {at::kFloat, at::kBFloat16, at::kHalf}) check_case(d, xt, at::kFloat, false, d % 2 == 1);
    KN_CHECK(kncore::cov_avx512(1));
  }
  std::printf("fp32 AVX-512 triangle: %s\n", avx512 ? "tested, and the per-block gemms too" : "not on this CPU");

  // Empty batches and all-false masks leave the state alone.
  {
    at::Tensor C = at::randn({5, 5}, at::kDouble), s = at::randn({5}, at::kDouble);
    at::Tensor n = at::ones({}, at::kLong);
    const at::Tensor C0 = C.clone();
    kncore::cov_accumulate_(C, s, n, at::randn({0, 5}), c10::nullopt);
    kncore::cov_accumulate_(C, s, n, at::randn({4, 5}), at::zeros({4}, at::kBool));
    KN_CHECK(at::equal(C, C0) && n.item<int64_t>() == 1);
  }

  // Registered with the dispatcher (what torch.ops.kncore.cov_accumulate_ calls).
  {
    auto op = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("kncore::cov_accumulate_", "")
                  .typed<void(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, bool)>();
    at::Tensor C = at::zeros({3, 3}), s = at::zeros({3}), n = at::zeros({}, at::kLong);
    const at::Tensor X = at::randn({4, 3});
    op.call(C, s, n, X, std::nullopt, false);
    KN_CHECK(rel(mirror(C), X.t().mm(X)) < 1e-6);
  }

  // Errors name the problem, with Python's exception types (TypeError/ValueError).
  at::Tensor C = at::zeros({4, 4}), s = at::zeros({4}), n = at::zeros({}, at::kLong);
  check_throws<c10::TypeError>("int X", [&] { kncore::cov_accumulate_(C, s, n, at::ones({2, 4}, at::kInt), c10::nullopt); }, "X must be");
  check_throws<c10::TypeError>("half C", [&] { at::Tensor h = C.to(at::kHalf); kncore::cov_accumulate_(h, s, n, at::randn({2, 4}), c10::nullopt); }, "accumulator C");
  check_throws<c10::ValueError>("wrong d", [&] { kncore::cov_accumulate_(C, s, n, at::randn({2, 5}), c10::nullopt); }, "X must be [rows, 4]");
  check_throws<c10::ValueError>("strided X", [&] { kncore::cov_accumulate_(C, s, n, at::randn({4, 2}).t(), c10::nullopt); }, "contiguous");
  check_throws<c10::ValueError>("mask shape", [&] { kncore::cov_accumulate_(C, s, n, at::randn({2, 4}), at::ones({3}, at::kBool)); }, "mask must be");
  return kncore_test::report("test_cov_accumulate");
}
