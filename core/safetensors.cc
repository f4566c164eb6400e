#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace mmdit {
namespace {

using json = nlohmann::json;

// A read-only private mapping of a whole file; unmapped on destruction.
class MappedFile {
 public:
  static absl::StatusOr<MappedFile> Open(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": cannot stat"));
    }
    MappedFile file;
    file.size_ = static_cast<size_t>(st.st_size);
    if (file.size_ > 0) {
      void* addr = ::mmap(nullptr, file.size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (addr == MAP_FAILED) {
        ::close(fd);
        return absl::InternalError(absl::StrCat(path, ": mmap failed"));
      }
      file.data_ = static_cast<const char*>(addr);
    }
    ::close(fd);  // the mapping keeps the file alive
    return file;
  }
  MappedFile(MappedFile&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  MappedFile& operator=(MappedFile&&) = delete;
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
  }
  std::string_view bytes() const { return {data_, size_}; }
  // Drops the pages under [begin, begin + length) from this process (they stay in the page
  // cache, and a later read faults them back in), so that converting a large file does not
  // hold the file and its converted copy in memory at once.
  void Release(const char* begin, size_t length) const {
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t first = reinterpret_cast<uintptr_t>(begin) / page * page;
    const uintptr_t last = reinterpret_cast<uintptr_t>(begin) + length;
    ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  }

 private:
  MappedFile() = default;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

struct Entry {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  uint64_t begin = 0, end = 0;
};

absl::StatusOr<uint64_t> NonNegativeInt(const json& value, const std::string& what) {
  if (!value.is_number_unsigned()) {  // nlohmann parses every non-negative integer as unsigned
    return absl::InvalidArgumentError(absl::StrCat(what, " must be a non-negative integer, got ", value.dump()));
  }
  return value.get<uint64_t>();
}

absl::StatusOr<Entry> ParseEntry(const std::string& name, const json& value, uint64_t data_size,
                                 const std::string& what) {
  const std::string where = absl::StrCat(what, ": tensor '", name, "'");
  if (!value.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": entry is not an object"));
  Entry entry;
  entry.name = name;
  const auto dtype = value.find("dtype");
  if (dtype == value.end() || !dtype->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing dtype"));
  }
  const auto parsed = DTypeFromName(dtype->get<std::string>());
  if (!parsed) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": dtype ", dtype->get<std::string>(), " is not supported (F32, F16, BF16)"));
  }
  entry.dtype = *parsed;
  const auto shape = value.find("shape");
  if (shape == value.end() || !shape->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing shape"));
  }
  // Each dim and the running product stay below 2^62, so shape x dtype cannot overflow.
  uint64_t count = 1;
  for (const json& dim : *shape) {
    auto d = NonNegativeInt(dim, absl::StrCat(where, ": shape entry"));
    if (!d.ok()) return d.status();
    if (*d > (uint64_t{1} << 40) || (count != 0 && *d > (uint64_t{1} << 62) / count)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": shape ", shape->dump(), " is too large"));
    }
    count *= *d;
    entry.shape.push_back(static_cast<int64_t>(*d));
  }
  const auto offsets = value.find("data_offsets");
  if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets must be [begin, end]"));
  }
  auto begin = NonNegativeInt((*offsets)[0], absl::StrCat(where, ": data_offsets"));
  if (!begin.ok()) return begin.status();
  auto end = NonNegativeInt((*offsets)[1], absl::StrCat(where, ": data_offsets"));
  if (!end.ok()) return end.status();
  entry.begin = *begin;
  entry.end = *end;
  if (entry.begin > entry.end || entry.end > data_size) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets [", entry.begin, ", ", entry.end,
                                                   "] outside the data area of ", data_size, " bytes"));
  }
  const uint64_t needed = count * DTypeSize(entry.dtype);
  if (entry.end - entry.begin != needed) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": holds ", entry.end - entry.begin, " bytes but ",
                                                   DTypeName(entry.dtype), " ", ShapeString(entry.shape), " needs ",
                                                   needed));
  }
  return entry;
}

// Validates the header of the safetensors image `bytes`; returns its tensors' entries and
// where their data area starts.
absl::StatusOr<std::pair<std::vector<Entry>, const char*>> ParseHeader(std::string_view bytes,
                                                                       const std::string& what) {
  if (bytes.size() < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": file is ", bytes.size(), " bytes, too short for a safetensors header"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > bytes.size() - 8) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": header length ", header_len,
                                                   " runs past the end of the file (", bytes.size(), " bytes)"));
  }
  const json header = json::parse(bytes.substr(8, header_len), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": header is not a JSON object"));
  }
  const std::string_view data = bytes.substr(8 + header_len);

  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") continue;
    auto entry = ParseEntry(name, value, data.size(), what);
    if (!entry.ok()) return entry.status();
    entries.push_back(std::move(*entry));
  }
  std::vector<const Entry*> by_offset;
  for (const Entry& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": tensors '", by_offset[i - 1]->name, "' and '",
                                                     by_offset[i]->name, "' overlap in the data area"));
    }
  }
  return std::make_pair(std::move(entries), data.data());
}

// One tensor's stored elements in a mapped file, which stays mapped while any are unread.
class StoredTensor final : public ElementSource {
 public:
  StoredTensor(std::shared_ptr<const MappedFile> file, const char* bytes, DType dtype)
      : file_(std::move(file)), bytes_(bytes), dtype_(dtype) {}
  void Read(int64_t first, int64_t count, float* out) const override {
    // In chunks, so that a large tensor's file pages are not all resident beside its values.
    constexpr int64_t kChunk = int64_t{1} << 20;
    const size_t element_size = DTypeSize(dtype_);
    for (int64_t done = 0; done < count; done += kChunk) {
      const int64_t n = std::min(kChunk, count - done);
      const char* begin = bytes_ + (first + done) * element_size;
      ConvertToFloat(dtype_, begin, n, out + done);
      file_->Release(begin, n * element_size);
    }
  }

 private:
  std::shared_ptr<const MappedFile> file_;
  const char* bytes_;
  DType dtype_;
};

}  // namespace

absl::StatusOr<TensorMap> ParseSafetensors(std::string_view bytes, const std::string& what) {
  auto header = ParseHeader(bytes, what);
  if (!header.ok()) return header.status();
  const auto& [entries, data] = *header;
  TensorMap tensors;
  for (const Entry& e : entries) {
    Tensor tensor(e.shape);
    ConvertToFloat(e.dtype, data + e.begin, tensor.NumElements(), tensor.data.data());
    tensors.emplace(e.name, std::move(tensor));
  }
  return tensors;
}

absl::StatusOr<TensorMap> OpenSafetensors(const std::string& path) {
  auto opened = MappedFile::Open(path);
  if (!opened.ok()) return opened.status();
  auto file = std::make_shared<const MappedFile>(*std::move(opened));
  auto header = ParseHeader(file->bytes(), path);
  if (!header.ok()) return header.status();
  const auto& [entries, data] = *header;
  TensorMap tensors;
  for (const Entry& e : entries) {
    auto source = std::make_shared<const StoredTensor>(file, data + e.begin, e.dtype);
    const int64_t count = NumElements(e.shape);
    std::vector<Tensor::UnreadRange> ranges;
    if (count > 0) ranges.push_back({std::move(source), 0, count});
    tensors.emplace(e.name, Tensor::Unread(e.shape, std::move(ranges)));
  }
  return tensors;
}

absl::StatusOr<TensorMap> ReadSafetensors(const std::string& path) {
  auto tensors = OpenSafetensors(path);
  if (!tensors.ok()) return tensors.status();
  for (auto& [name, tensor] : *tensors) tensor.Load();
  return tensors;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<std::pair<std::string, Shape>>& layout,
                              DType dtype, const std::function<void(size_t, std::vector<float>&)>& produce) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const auto& [name, shape] : layout) {
    const uint64_t size = NumElements(shape) * DTypeSize(dtype);
    header[name] = {{"dtype", DTypeName(dtype)}, {"shape", shape}, {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) return absl::InternalError(absl::StrCat(path, ": cannot open for writing"));
  const uint64_t header_len = header_text.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((header_len >> (8 * i)) & 0xff);
  file.write(len_bytes, 8);
  file.write(header_text.data(), header_text.size());
  std::vector<float> values;
  std::vector<char> stored;
  for (size_t i = 0; i < layout.size(); ++i) {
    values.assign(NumElements(layout[i].second), 0.0f);
    produce(i, values);
    stored.resize(values.size() * DTypeSize(dtype));
    ConvertFromFloat(dtype, values.data(), values.size(), stored.data());
    file.write(stored.data(), stored.size());
  }
  if (!file) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors,
                              DType dtype) {
  std::vector<std::pair<std::string, Shape>> layout;
  for (const auto& [name, tensor] : tensors) layout.emplace_back(name, tensor.shape);
  return WriteSafetensors(path, layout, dtype, [&](size_t i, std::vector<float>& values) {
    std::copy_n(tensors[i].second.data, values.size(), values.begin());
  });
}

}  // namespace mmdit
