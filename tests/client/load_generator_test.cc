#include "client/load_generator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::ClientFor;
using ::mmdit::testing::StartServer;

TEST(ParseMix, ReadsWeightedImageAndTokenShapes) {
  auto mix = ParseMix("3@4x8x8/7;1@64/32;2x2x2/5", 2, 16);
  ASSERT_TRUE(mix.ok()) << mix.status();
  ASSERT_EQ(mix->size(), 3u);
  EXPECT_EQ((*mix)[0].weight, 3);
  EXPECT_EQ((*mix)[0].img_latent, (Shape{4, 8, 8}));
  EXPECT_EQ((*mix)[0].text_tokens, 7);
  EXPECT_EQ((*mix)[1].img_latent, (Shape{64, 16}));
  EXPECT_EQ((*mix)[2].weight, 1);
  EXPECT_EQ((*mix)[2].batch, 2);
  EXPECT_EQ(ParseMix("3@4x8/7", 1, 16).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseMix("x@4/7", 1, 16).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RunLoad, ClosedLoopSendsExactlyTheRequestedCallsOverAMix) {
  ServerOptions options;
  options.batcher.max_queue_delay_us = 5000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  LoadOptions load{.concurrency = 4, .requests = 24};
  load.mix = *ParseMix("1@4x8x8/7;1@4x4x12/3", 2, 16);
  auto report = RunLoad(*client, load);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests, 24);
  EXPECT_TRUE(report->errors.empty());
  EXPECT_GT(report->throughput_samples_per_s, report->throughput_rps);  // 2 samples a request
  EXPECT_GE(report->mean_batch_samples, 2.0);
  EXPECT_LE(report->p50_ms, report->p99_ms);
  const nlohmann::json json = report->ToJson();
  std::vector<std::string> keys;
  for (const auto& [key, value] : json.items()) keys.push_back(key);
  EXPECT_THAT(keys, ::testing::UnorderedElementsAre("requests", "errors", "throughput_rps", "throughput_samples_per_s",
                                                    "latency_ms", "mean_batch_samples", "server_queue_us_mean",
                                                    "server_compute_us_mean"));
  EXPECT_EQ(server->metrics().samples_computed(), 48u);
}

TEST(RunLoad, OpenLoopCountsErrorsByCode) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  LoadOptions load{.rate = 200, .requests = 10};
  load.mix = *ParseMix("4x7x8/7", 1, 16);  // H = 7 is not a multiple of the patch
  auto report = RunLoad(*client, load);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests, 10);
  EXPECT_EQ(report->errors.at("INVALID_ARGUMENT"), 10);
  EXPECT_EQ(report->throughput_rps, 0);
}

TEST(RunLoad, NeedsExactlyOneModeAndOneBound) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  LoadOptions both{.concurrency = 1, .rate = 1, .requests = 1};
  both.mix = *ParseMix("4x8x8/7", 1, 16);
  EXPECT_EQ(RunLoad(*client, both).status().code(), absl::StatusCode::kInvalidArgument);
  LoadOptions unbounded{.concurrency = 1};
  unbounded.mix = both.mix;
  EXPECT_EQ(RunLoad(*client, unbounded).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mmdit
