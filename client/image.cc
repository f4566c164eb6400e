#include "client/image.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>

#include "absl/strings/str_cat.h"

namespace mmdit {
namespace {

struct FileCloser {
  void operator()(FILE* file) const { std::fclose(file); }
};
using File = std::unique_ptr<FILE, FileCloser>;

// libpng reports errors by longjmp to the last setjmp. These two keep every setjmp in a frame
// that holds no C++ object, so that the jump never skips a destructor or reads a clobbered one.
struct PngHeader {
  png_uint_32 width = 0, height = 0;
  int bit_depth = 0, color = 0;
};

bool ReadPngHeader(png_structp png, png_infop info, FILE* file, PngHeader& header) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_init_io(png, file);
  png_read_info(png, info);
  header.width = png_get_image_width(png, info);
  header.height = png_get_image_height(png, info);
  header.bit_depth = png_get_bit_depth(png, info);
  header.color = png_get_color_type(png, info);
  return true;
}

bool ReadPngRows(png_structp png, uint8_t* pixels, int64_t row_bytes, int64_t height) {
  if (setjmp(png_jmpbuf(png))) return false;
  for (int64_t y = 0; y < height; ++y) png_read_row(png, pixels + y * row_bytes, nullptr);
  return true;
}

bool WritePngRows(png_structp png, png_infop info, FILE* file, const Image& image) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_init_io(png, file);
  png_set_IHDR(png, info, static_cast<png_uint_32>(image.width), static_cast<png_uint_32>(image.height), 8,
               image.channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int64_t y = 0; y < image.height; ++y) {
    png_write_row(png, image.pixels.data() + y * image.width * image.channels);
  }
  png_write_end(png, nullptr);
  return true;
}

}  // namespace

absl::StatusOr<Image> LatentToImage(const Tensor& latent) {
  const Shape& s = latent.shape;
  if (s.size() != 4 || s[0] != 1 || (s[1] != 1 && s[1] != 3)) {
    return absl::InvalidArgumentError(absl::StrCat("a PNG needs a [1, 1 or 3, H, W] latent that is the image itself; got ",
                                                   ShapeString(s), " (write .npy instead)"));
  }
  Image image{s[3], s[2], s[1], std::vector<uint8_t>(s[1] * s[2] * s[3])};
  const int64_t plane = s[2] * s[3];
  for (int64_t c = 0; c < s[1]; ++c) {
    for (int64_t i = 0; i < plane; ++i) {
      const float value = std::round((latent.data[c * plane + i] + 1.0f) * 0.5f * 255.0f);
      // NaN: 0 (std::clamp passes NaN through, and casting it to an integer is undefined).
      image.pixels[i * s[1] + c] = std::isnan(value) ? 0 : static_cast<uint8_t>(std::clamp(value, 0.0f, 255.0f));
    }
  }
  return image;
}

absl::StatusOr<Image> ImageRow(absl::Span<const Image> images) {
  if (images.empty()) return absl::InvalidArgumentError("no images for the row");
  const Image& first = images.front();
  for (const Image& image : images) {
    if (image.height != first.height || image.channels != first.channels) {
      return absl::InvalidArgumentError("the row's images differ in height or channels");
    }
  }
  Image row{0, first.height, first.channels, {}};
  for (const Image& image : images) row.width += image.width;
  row.pixels.resize(row.width * row.height * row.channels);
  int64_t left = 0;
  for (const Image& image : images) {
    const int64_t span = image.width * image.channels;
    for (int64_t y = 0; y < image.height; ++y) {
      std::copy_n(image.pixels.begin() + y * span, span,
                  row.pixels.begin() + (y * row.width + left) * row.channels);
    }
    left += image.width;
  }
  return row;
}

Image Upscale(const Image& image, int64_t factor) {
  Image big{image.width * factor, image.height * factor, image.channels, {}};
  big.pixels.resize(big.width * big.height * big.channels);
  for (int64_t y = 0; y < big.height; ++y) {
    for (int64_t x = 0; x < big.width; ++x) {
      for (int64_t c = 0; c < image.channels; ++c) {
        big.pixels[(y * big.width + x) * big.channels + c] =
            image.pixels[((y / factor) * image.width + x / factor) * image.channels + c];
      }
    }
  }
  return big;
}

absl::Status WritePng(const std::string& path, const Image& image) {
  File file(std::fopen(path.c_str(), "wb"));
  if (file == nullptr) return absl::InternalError(absl::StrCat(path, ": cannot open for writing"));
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png != nullptr ? png_create_info_struct(png) : nullptr;
  if (info == nullptr) {
    png_destroy_write_struct(&png, nullptr);
    return absl::InternalError("libpng: out of memory");
  }
  const bool written = WritePngRows(png, info, file.get(), image);
  png_destroy_write_struct(&png, &info);
  if (!written || std::fflush(file.get()) != 0) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

absl::StatusOr<Image> ReadPng(const std::string& path) {
  File file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png != nullptr ? png_create_info_struct(png) : nullptr;
  if (info == nullptr) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    return absl::InternalError("libpng: out of memory");
  }
  PngHeader header;
  Image image;
  bool ok = ReadPngHeader(png, info, file.get(), header);
  if (ok && (header.bit_depth != 8 || (header.color != PNG_COLOR_TYPE_GRAY && header.color != PNG_COLOR_TYPE_RGB))) {
    png_destroy_read_struct(&png, &info, nullptr);
    return absl::InvalidArgumentError(absl::StrCat(path, ": only 8-bit grayscale or RGB PNGs are read"));
  }
  if (ok && static_cast<uint64_t>(header.width) * header.height > (uint64_t{1} << 28)) {
    png_destroy_read_struct(&png, &info, nullptr);
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", header.width, " x ", header.height,
                                                   " pixels is more than this reader takes (2^28)"));
  }
  if (ok) {
    image.width = header.width;
    image.height = header.height;
    image.channels = header.color == PNG_COLOR_TYPE_RGB ? 3 : 1;
    image.pixels.resize(image.width * image.height * image.channels);
    ok = ReadPngRows(png, image.pixels.data(), image.width * image.channels, image.height);
  }
  png_destroy_read_struct(&png, &info, nullptr);
  if (!ok) return absl::InvalidArgumentError(absl::StrCat(path, ": not a readable PNG"));
  return image;
}

}  // namespace mmdit
