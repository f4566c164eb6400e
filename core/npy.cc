#include "core/npy.h"

#include <cctype>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace mmdit {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

// Finds `'key': value` in the header dict and returns the raw value text: a quoted string, a
// tuple, True or False. A plain scan: std::regex recursed once per character, so a long header
// could overflow the stack (found by fuzz/npy_fuzz.cc), and was slow besides.
std::optional<std::string> HeaderField(const std::string& header, const std::string& key) {
  const std::string quoted_key = "'" + key + "'";
  for (size_t at = header.find(quoted_key); at != std::string::npos; at = header.find(quoted_key, at + 1)) {
    size_t i = at + quoted_key.size();
    while (i < header.size() && std::isspace(static_cast<unsigned char>(header[i]))) ++i;
    if (i >= header.size() || header[i] != ':') continue;
    ++i;
    while (i < header.size() && std::isspace(static_cast<unsigned char>(header[i]))) ++i;
    if (i >= header.size()) return std::nullopt;
    const char open = header[i];
    if (open == '\'' || open == '(') {
      const size_t close = header.find(open == '\'' ? '\'' : ')', i + 1);
      if (close == std::string::npos) return std::nullopt;
      return header.substr(i, close - i + 1);
    }
    for (const char* word : {"True", "False"}) {
      if (header.compare(i, std::strlen(word), word) == 0) return std::string(word);
    }
    return std::nullopt;
  }
  return std::nullopt;
}

absl::StatusOr<Shape> ParseShapeTuple(std::string text, const std::string& what) {
  // "(3, 16, 16)" or "(3,)" or "()".
  absl::string_view inner = text;
  inner = absl::StripPrefix(inner, "(");
  inner = absl::StripSuffix(inner, ")");
  Shape shape;
  for (absl::string_view part : absl::StrSplit(inner, ',', absl::SkipWhitespace())) {
    int64_t dim;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &dim) || dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": bad shape ", text, " in .npy header"));
    }
    shape.push_back(dim);
  }
  return shape;
}

}  // namespace

absl::StatusOr<Tensor> ParseNpy(std::string_view bytes, const std::string& what) {
  if (bytes.size() < 10 || std::memcmp(bytes.data(), kMagic, kMagicSize) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a NumPy .npy file"));
  }
  const uint8_t major = static_cast<uint8_t>(bytes[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return absl::InvalidArgumentError(absl::StrCat(what, ": truncated .npy header"));
    uint32_t len32;
    std::memcpy(&len32, bytes.data() + 8, 4);
    header_len = len32;
    header_start = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(what, ": unsupported .npy version ", major));
  }
  if (header_start + header_len > bytes.size()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": truncated .npy header"));
  }
  const std::string header(bytes.substr(header_start, header_len));
  const auto descr = HeaderField(header, "descr");
  const auto fortran = HeaderField(header, "fortran_order");
  const auto shape_text = HeaderField(header, "shape");
  if (!descr || !fortran || !shape_text) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": malformed .npy header: ", header));
  }
  if (*fortran != "False") {
    return absl::InvalidArgumentError(absl::StrCat(what, ": Fortran-order arrays are not supported; save in C order"));
  }
  size_t item_size;
  if (*descr == "'<f4'") {
    item_size = 4;
  } else if (*descr == "'<f8'") {
    item_size = 8;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": dtype ", *descr, " is not supported; expected float32 ('<f4')"));
  }
  auto shape = ParseShapeTuple(*shape_text, what);
  if (!shape.ok()) return shape.status();
  const std::string_view data = bytes.substr(header_start + header_len);
  // Bytes the shape needs, multiplied with overflow checks: a header can name more elements
  // than 64 bits count, and nothing is allocated before the bytes match.
  uint64_t needed = item_size;
  bool overflow = false;
  for (int64_t dim : *shape) overflow = overflow || __builtin_mul_overflow(needed, static_cast<uint64_t>(dim), &needed);
  if (overflow || data.size() != needed) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": data holds ", data.size(), " bytes; shape ",
                                                   ShapeString(*shape), " needs ",
                                                   overflow ? "over 2^64" : std::to_string(needed)));
  }
  const int64_t count = static_cast<int64_t>(needed / item_size);
  Tensor tensor(std::move(*shape));
  if (item_size == 4) {
    // An empty tensor (a zero dimension) has no buffer to copy into: memcpy wants pointers
    // even for zero bytes (found by fuzz/npy_fuzz.cc under UBSan).
    if (count > 0) std::memcpy(tensor.data.data(), data.data(), data.size());
  } else {
    for (int64_t i = 0; i < count; ++i) {
      double value;
      std::memcpy(&value, data.data() + i * 8, 8);
      tensor.data[i] = static_cast<float>(value);
    }
  }
  return tensor;
}

absl::StatusOr<Tensor> ReadNpy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buffer;
  buffer << file.rdbuf();
  return ParseNpy(buffer.str(), path);
}

absl::Status WriteNpy(const std::string& path, const TensorView& tensor) {
  // Python tuple syntax: "()", "(3,)", "(3, 4)".
  std::string shape = absl::StrCat("(", absl::StrJoin(tensor.shape, ", "), tensor.shape.size() == 1 ? ",)" : ")");
  std::string header = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': ", shape, ", }");
  // Pad so that the data starts on a 64-byte boundary, header ending in '\n'.
  const size_t unpadded = kMagicSize + 4 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) return absl::InternalError(absl::StrCat(path, ": cannot open for writing"));
  const uint16_t header_len = static_cast<uint16_t>(header.size());
  file.write(kMagic, kMagicSize);
  file.put('\x01');
  file.put('\x00');
  file.put(static_cast<char>(header_len & 0xff));
  file.put(static_cast<char>(header_len >> 8));
  file.write(header.data(), header.size());
  file.write(reinterpret_cast<const char*>(tensor.data), tensor.NumElements() * sizeof(float));
  if (!file) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace mmdit
