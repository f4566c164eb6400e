// The safetensors reader trusts nothing in a file before it has checked it.
#include "core/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

// A file image: 8-byte little-endian header length, `header`, then `data_bytes` zero bytes.
std::string File(const std::string& header, size_t data_bytes) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((uint64_t{header.size()} >> (8 * i)) & 0xff);
  return bytes + header + std::string(data_bytes, '\0');
}

struct MalformedCase {
  std::string description, bytes, message;
  friend void PrintTo(const MalformedCase& c, std::ostream* os) { *os << c.description; }
};

class SafetensorsRejectsTest : public ::testing::TestWithParam<MalformedCase> {};

TEST_P(SafetensorsRejectsTest, WithAClearMessage) {
  auto result = ParseSafetensors(GetParam().bytes, "m.safetensors");
  ASSERT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << GetParam().description;
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(GetParam().message));
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("m.safetensors"));
}

INSTANTIATE_TEST_SUITE_P(
    Malformed, SafetensorsRejectsTest,
    ::testing::Values(
        MalformedCase{"truncated", std::string("\x10\x00\x00", 3), "too short for a safetensors header"},
        MalformedCase{"header beyond file", File("{}", 0).substr(0, 8) + "{", "runs past the end of the file"},
        MalformedCase{"huge header length", std::string("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10), "runs past the end"},
        MalformedCase{"malformed JSON", File("{\"a\": ", 0), "header is not a JSON object"},
        MalformedCase{"JSON not an object", File("[1, 2]", 0), "header is not a JSON object"},
        MalformedCase{"unknown dtype", File(R"({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}})", 16),
                      "tensor 'w': dtype I64 is not supported"},
        MalformedCase{"negative dim", File(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4),
                      "shape entry must be a non-negative integer"},
        MalformedCase{"offsets beyond data",
                      File(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8),
                      "outside the data area of 8 bytes"},
        MalformedCase{"begin after end", File(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8),
                      "outside the data area"},
        MalformedCase{"size not matching shape",
                      File(R"({"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 8]}})", 8),
                      "holds 8 bytes but F16 [2, 3] needs 12"},
        MalformedCase{"overlap",
                      File(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                           12),
                      "tensors 'a' and 'b' overlap"},
        MalformedCase{"missing offsets", File(R"({"w": {"dtype": "F32", "shape": [2]}})", 8),
                      "data_offsets must be [begin, end]"},
        MalformedCase{"overflowing shape",
                      File(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", 8),
                      "is too large"}),
    testing::DescriptionAsTestName());

TEST(Safetensors, StoresEachDtypeAndReadsItBackAsFloat32) {
  const std::string dir = testing::MakeTempDir("st");
  // Values exactly representable in every dtype, and one that each rounds.
  const Tensor exact({4}, {1.0f, -2.5f, 0.0f, 256.0f});
  const Tensor rounds({1}, {1.0f + 1.0f / 1024 + 1.0f / 4096});
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    const std::string path = dir + "/m.safetensors";
    ASSERT_TRUE(WriteSafetensors(path, {{"exact", exact}, {"rounds", rounds}}, dtype).ok());
    auto back = ReadSafetensors(path);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->at("exact").data, exact.data) << DTypeName(dtype);
    const float expected_round = dtype == DType::kF32   ? rounds.data[0]
                                 : dtype == DType::kF16 ? 1.0f + 1.0f / 1024
                                                        : 1.0f;
    EXPECT_EQ(back->at("rounds").data[0], expected_round) << DTypeName(dtype);
  }
}

TEST(Safetensors, OpenLeavesTensorsUnreadUntilLoadedAndKeepsTheFileMapped) {
  const std::string dir = testing::MakeTempDir("st");
  const std::string path = dir + "/m.safetensors";
  const Tensor w = testing::RandomTensor({8, 4}, 1), empty({0, 4});
  ASSERT_TRUE(WriteSafetensors(path, {{"w", w}, {"empty", empty}}, DType::kBF16).ok());
  auto opened = OpenSafetensors(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  Tensor& unread = opened->at("w");
  EXPECT_EQ(unread.shape, w.shape);
  EXPECT_TRUE(unread.data.empty());
  EXPECT_FALSE(unread.unread.empty());
  std::filesystem::remove(path);  // the mapping, not the name, keeps the bytes
  Tensor second_half = ElementRange(unread, {4, 4}, 16);
  unread.Load();
  second_half.Load();
  ASSERT_EQ(unread.data.size(), 32u);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(unread.data[i], BFloat16ToFloat(FloatToBFloat16(w.data[i]))) << i;
  EXPECT_EQ(second_half.data, std::vector<float>(unread.data.begin() + 16, unread.data.end()));
  opened->at("empty").Load();
  EXPECT_EQ(opened->at("empty").shape, empty.shape);
}

TEST(Safetensors, HalfConversionCoversSubnormalsAndSpecials) {
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(FloatToHalf(1e6f), 0x7c00);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(NAN))));
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(3.0f)), 3.0f);
}

TEST(Safetensors, TruncatedFileOnDiskIsRejectedNotRead) {
  const std::string dir = testing::MakeTempDir("st");
  const std::string path = dir + "/m.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"w", testing::RandomTensor({64, 64}, 1)}}, DType::kF32).ok());
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 100);
  auto result = ReadSafetensors(path);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("outside the data area"));
  EXPECT_EQ(ReadSafetensors(dir + "/absent.safetensors").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mmdit
