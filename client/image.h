// Pictures out of latents, for models whose latent is the image itself (the digits model: one
// channel in [-1, 1]); SD3's latents need a VAE decoder, which this project does not have.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/tensor.h"

namespace mmdit {

// 8-bit pixels, row-major, channels interleaved (1: grayscale, 3: RGB).
struct Image {
  int64_t width = 0, height = 0, channels = 0;
  std::vector<uint8_t> pixels;
};

// A [1, C, H, W] latent (C = 1 or 3) as pixels: round((x + 1) / 2 * 255), clipped to 0..255.
// Errors: InvalidArgument naming the shape (token form, a batch > 1, other channel counts).
absl::StatusOr<Image> LatentToImage(const Tensor& latent);

// Images of one size and channel count side by side, left to right. Errors: InvalidArgument
// when they differ or there are none.
absl::StatusOr<Image> ImageRow(absl::Span<const Image> images);

// Each pixel as a `factor` x `factor` block (nearest neighbour). Requires factor >= 1.
Image Upscale(const Image& image, int64_t factor);

// Writes `image` as an 8-bit PNG (libpng). Errors: Internal naming the file.
absl::Status WritePng(const std::string& path, const Image& image);

// Reads an 8-bit grayscale or RGB PNG (for tests and scripts). Errors: NotFound, InvalidArgument.
absl::StatusOr<Image> ReadPng(const std::string& path);

}  // namespace mmdit
