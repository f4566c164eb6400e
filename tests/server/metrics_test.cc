// The Prometheus text the server renders: counters and sums exact, bounds as written.
#include "server/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mmdit {
namespace {

using ::testing::HasSubstr;

TEST(Histogram, SumsAndBoundsPrintExactly) {
  Histogram histogram({0.0001, 0.25, 1e6});
  histogram.Observe(1014560.25);  // six significant digits would print 1.01456e+06
  histogram.Observe(0.1);
  histogram.Observe(2e6);
  std::string out;
  histogram.Render("h", out);
  EXPECT_THAT(out, HasSubstr("h_bucket{le=\"0.0001\"} 0\n"));
  EXPECT_THAT(out, HasSubstr("h_bucket{le=\"0.25\"} 1\n"));
  EXPECT_THAT(out, HasSubstr("h_bucket{le=\"1000000\"} 1\n"));
  EXPECT_THAT(out, HasSubstr("h_bucket{le=\"+Inf\"} 3\n"));
  EXPECT_THAT(out, HasSubstr("h_sum 3014560.35\n"));
  EXPECT_THAT(out, HasSubstr("h_count 3\n"));
}

TEST(ServerMetrics, CountersAreExactIntegers) {
  ServerMetrics metrics([] { return int64_t{0}; }, [] { return int64_t{0}; });
  for (int i = 0; i < 100003; ++i) metrics.ObservePass(1, 10, 0.001, 0);
  const std::string page = metrics.Render(0);
  EXPECT_THAT(page, HasSubstr("mmdit_samples_total 100003\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_compute_seconds_count 100003\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_batch_samples_sum 100003\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_batch_tokens_sum 1000030\n"));
}

}  // namespace
}  // namespace mmdit
