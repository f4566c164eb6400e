// Unread tensors: slicing and joining them reads nothing; Load reads each range once.
#include "core/tensor.h"

#include <gtest/gtest.h>

#include <memory>
#include <utility>
#include <vector>

namespace mmdit {
namespace {

// Element i is 10 * i; remembers every range read.
class CountingSource final : public ElementSource {
 public:
  void Read(int64_t first, int64_t count, float* out) const override {
    reads.emplace_back(first, count);
    for (int64_t i = 0; i < count; ++i) out[i] = 10.0f * (first + i);
  }
  mutable std::vector<std::pair<int64_t, int64_t>> reads;
};

Tensor UnreadOf(const std::shared_ptr<CountingSource>& source, Shape shape, int64_t first = 0) {
  const int64_t count = NumElements(shape);
  return Tensor::Unread(std::move(shape), {{source, first, count}});
}

TEST(Tensor, LoadReadsAnUnreadTensorOnceAndThenHoldsItsValues) {
  auto source = std::make_shared<CountingSource>();
  Tensor t = UnreadOf(source, {2, 3});
  EXPECT_TRUE(t.data.empty());
  t.Load();
  EXPECT_EQ(t.data, (std::vector<float>{0, 10, 20, 30, 40, 50}));
  EXPECT_TRUE(t.unread.empty());
  t.Load();
  EXPECT_EQ(source->reads.size(), 1u);
}

TEST(Tensor, ElementRangeOfAnUnreadTensorStaysUnreadAndReadsOnlyItsElements) {
  auto source = std::make_shared<CountingSource>();
  const Tensor qkv = UnreadOf(source, {6, 2}, /*first=*/4);  // elements 4..15 of the source
  Tensor k = ElementRange(qkv, {2, 2}, 4);
  EXPECT_TRUE(source->reads.empty());
  k.Load();
  EXPECT_EQ(k.data, (std::vector<float>{80, 90, 100, 110}));
  EXPECT_EQ(source->reads, (std::vector<std::pair<int64_t, int64_t>>{{8, 4}}));
}

TEST(Tensor, ConcatenatingUnreadTensorsSwapsHalvesWithoutReading) {
  auto source = std::make_shared<CountingSource>();
  const Tensor shift_scale = UnreadOf(source, {4, 1});
  Tensor swapped = Concatenate(ElementRange(shift_scale, {2, 1}, 2), ElementRange(shift_scale, {2, 1}, 0), {4, 1});
  EXPECT_TRUE(source->reads.empty());
  // A range of the joined tensor that spans both of its pieces.
  Tensor middle = ElementRange(swapped, {2}, 1);
  middle.Load();
  EXPECT_EQ(middle.data, (std::vector<float>{30, 0}));
  swapped.Load();
  EXPECT_EQ(swapped.data, (std::vector<float>{20, 30, 0, 10}));
}

TEST(Tensor, InMemoryTensorsSliceAndJoinTheirValues) {
  const Tensor t({2, 2}, {1, 2, 3, 4});
  EXPECT_EQ(ElementRange(t, {2}, 1).data, (std::vector<float>{2, 3}));
  auto source = std::make_shared<CountingSource>();
  // One side in memory: the other is read and the result holds values.
  const Tensor joined = Concatenate(t, UnreadOf(source, {1}, 2), {5});
  EXPECT_TRUE(joined.unread.empty());
  EXPECT_EQ(joined.data, (std::vector<float>{1, 2, 3, 4, 20}));
}

}  // namespace
}  // namespace mmdit
