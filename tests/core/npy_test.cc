#include "core/npy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

TEST(Npy, WriteThenReadRoundTripsShapeAndValues) {
  const std::string dir = testing::MakeTempDir("npy");
  for (Shape shape : {Shape{}, Shape{5}, Shape{2, 3}, Shape{2, 4, 6, 10}}) {
    const Tensor t = testing::RandomTensor(shape, 1);
    ASSERT_TRUE(WriteNpy(dir + "/t.npy", t).ok());
    auto back = ReadNpy(dir + "/t.npy");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->shape, t.shape);
    EXPECT_EQ(back->data, t.data);
  }
}

TEST(Npy, ReadsFloat64AsFloat32) {
  auto expected = ReadNpy(testing::GoldenDir("sd3_tiny") + "/expected_f64.npy");
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(expected->shape, (Shape{2, 4, 8, 8}));
}

std::string Npy(const std::string& header, size_t data_bytes) {
  std::string bytes("\x93NUMPY\x01\x00", 8);
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  return bytes + header + std::string(data_bytes, '\0');
}

TEST(Npy, RejectsWhatItCannotRead) {
  const struct {
    std::string bytes, message;
  } cases[] = {
      {"not numpy at all", "not a NumPy .npy file"},
      {Npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", 16), "dtype '<i8' is not supported"},
      {Npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16), "Fortran-order"},
      {Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", 12), "needs 16"},
      {Npy("{'descr': '<f4', 'fortran_order': False, }", 0), "malformed .npy header"},
      {Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4503599627370496, 4096), }", 0), "needs over 2^64"},
  };
  for (const auto& c : cases) {
    auto result = ParseNpy(c.bytes, "x.npy");
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(c.message));
  }
  EXPECT_EQ(ReadNpy("/nonexistent/x.npy").status().code(), absl::StatusCode::kNotFound);
}

// A zero dimension: no elements, no data, and no copy into a buffer that does not exist
// (UBSan flagged the memcpy; found by fuzz/npy_fuzz.cc).
TEST(Npy, AnEmptyTensorReadsAsZeroElements) {
  const auto result = ParseNpy(Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 0), }", 0), "empty.npy");
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->shape, (Shape{3, 0}));
  EXPECT_TRUE(result->data.empty());
}

// A header of 60000 characters with an unclosed quote: refused, without deep recursion (the
// regex this parser used overflowed the stack on such input).
TEST(Npy, ALongUnterminatedHeaderIsRefusedNotACrash) {
  std::string header = "{'descr': '" + std::string(60000, 'x');
  std::string bytes = std::string("\x93NUMPY\x01\x00", 8);
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  const auto result = ParseNpy(bytes, "long.npy");
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("malformed .npy header"));
}

}  // namespace
}  // namespace mmdit
