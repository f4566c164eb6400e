// Latents as pictures (client/image.h): the pixel mapping, rows of images, upscaling, and PNG
// files through libpng and back.
#include "client/image.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "tests/core/test_util.h"

namespace mmdit::testing {
namespace {

using ::testing::HasSubstr;

TEST(Image, ALatentMapsMinusOneToBlackAndOneToWhiteClipped) {
  Tensor latent({1, 1, 2, 3});
  latent.data = {-1.0f, 1.0f, 0.0f, -3.0f, 7.0f, std::nanf("")};
  auto image = LatentToImage(latent);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->width, 3);
  EXPECT_EQ(image->height, 2);
  EXPECT_EQ(image->channels, 1);
  EXPECT_EQ(image->pixels, (std::vector<uint8_t>{0, 255, 128, 0, 255, 0}));  // 0 -> round(127.5)
}

TEST(Image, ThreeChannelLatentsInterleaveAsRgb) {
  Tensor latent({1, 3, 1, 2});
  latent.data = {-1, 1, 1, -1, 0, 0};  // planes R, G, B
  auto image = LatentToImage(latent);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->pixels, (std::vector<uint8_t>{0, 255, 128, 255, 0, 128}));
}

TEST(Image, LatentsThatAreNotImagesAreRefusedNamingTheShape) {
  for (const Shape& shape : {Shape{1, 16, 8}, Shape{2, 1, 8, 8}, Shape{1, 4, 8, 8}}) {
    auto image = LatentToImage(Tensor(shape));
    EXPECT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(image.status().message(), HasSubstr(ShapeString(shape)));
  }
}

TEST(Image, ARowPlacesImagesLeftToRightAndUpscaleRepeatsPixels) {
  const Image a{1, 2, 1, {10, 20}}, b{2, 2, 1, {30, 31, 40, 41}};
  auto row = ImageRow(std::vector<Image>{a, b});
  ASSERT_TRUE(row.ok()) << row.status();
  EXPECT_EQ(row->width, 3);
  EXPECT_EQ(row->pixels, (std::vector<uint8_t>{10, 30, 31, 20, 40, 41}));
  const Image big = Upscale(a, 2);
  EXPECT_EQ(big.width, 2);
  EXPECT_EQ(big.height, 4);
  EXPECT_EQ(big.pixels, (std::vector<uint8_t>{10, 10, 10, 10, 20, 20, 20, 20}));
  EXPECT_FALSE(ImageRow(std::vector<Image>{a, Image{1, 3, 1, {1, 2, 3}}}).ok());
  EXPECT_FALSE(ImageRow({}).ok());
}

TEST(Image, PngRoundTripsGrayscaleAndRgb) {
  const std::string dir = MakeTempDir("png");
  for (int64_t channels : {1, 3}) {
    Image image{5, 3, channels, {}};
    for (int64_t i = 0; i < 5 * 3 * channels; ++i) image.pixels.push_back(static_cast<uint8_t>(i * 17));
    const std::string path = dir + "/image" + std::to_string(channels) + ".png";
    ASSERT_TRUE(WritePng(path, image).ok());
    auto read = ReadPng(path);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->width, 5);
    EXPECT_EQ(read->height, 3);
    EXPECT_EQ(read->channels, channels);
    EXPECT_EQ(read->pixels, image.pixels);
  }
  std::filesystem::remove_all(dir);
}

TEST(Image, UnreadablePngsAreErrorsNotCrashes) {
  const std::string dir = MakeTempDir("png_bad");
  EXPECT_EQ(ReadPng(dir + "/missing.png").status().code(), absl::StatusCode::kNotFound);
  std::ofstream(dir + "/text.png") << "not a png at all";
  EXPECT_EQ(ReadPng(dir + "/text.png").status().code(), absl::StatusCode::kInvalidArgument);
  // A real PNG cut short: the header reads, the rows do not.
  Image image{64, 64, 1, std::vector<uint8_t>(64 * 64)};
  for (size_t i = 0; i < image.pixels.size(); ++i) image.pixels[i] = static_cast<uint8_t>(i * 7919 % 251);
  ASSERT_TRUE(WritePng(dir + "/whole.png", image).ok());
  const auto size = std::filesystem::file_size(dir + "/whole.png");
  std::filesystem::copy_file(dir + "/whole.png", dir + "/cut.png");
  std::filesystem::resize_file(dir + "/cut.png", size / 2);
  auto cut = ReadPng(dir + "/cut.png");
  EXPECT_EQ(cut.status().code(), absl::StatusCode::kInvalidArgument) << cut.status();
  EXPECT_EQ(WritePng(dir + "/no/such/dir.png", image).code(), absl::StatusCode::kInternal);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mmdit::testing
