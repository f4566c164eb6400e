#include "core/tensor.h"

#include <algorithm>
#include <cassert>

namespace mmdit {

void Tensor::Load() {
  if (unread.empty()) return;
  data.resize(NumElements());
  float* out = data.data();
  for (const UnreadRange& range : unread) {
    range.source->Read(range.first, range.count, out);
    out += range.count;
  }
  assert(out == data.data() + data.size() && "unread ranges cover the shape");
  unread.clear();
  unread.shrink_to_fit();
}

Tensor ElementRange(const Tensor& t, Shape shape, int64_t first) {
  const int64_t count = NumElements(shape);
  if (t.unread.empty()) {
    assert(first + count <= static_cast<int64_t>(t.data.size()));
    return Tensor(std::move(shape), std::vector<float>(t.data.begin() + first, t.data.begin() + first + count));
  }
  std::vector<Tensor::UnreadRange> ranges;
  int64_t range_start = 0;  // of the current range, in t's elements
  for (const Tensor::UnreadRange& range : t.unread) {
    const int64_t begin = std::max(first, range_start), end = std::min(first + count, range_start + range.count);
    if (begin < end) ranges.push_back({range.source, range.first + (begin - range_start), end - begin});
    range_start += range.count;
  }
  return Tensor::Unread(std::move(shape), std::move(ranges));
}

Tensor Concatenate(Tensor a, Tensor b, Shape shape) {
  assert(a.NumElements() + b.NumElements() == NumElements(shape));
  const bool a_in_memory = a.unread.empty() && a.NumElements() > 0;
  const bool b_in_memory = b.unread.empty() && b.NumElements() > 0;
  if (!a_in_memory && !b_in_memory) {
    a.unread.insert(a.unread.end(), b.unread.begin(), b.unread.end());
    return Tensor::Unread(std::move(shape), std::move(a.unread));
  }
  a.Load();
  b.Load();
  a.data.insert(a.data.end(), b.data.begin(), b.data.end());
  return Tensor(std::move(shape), std::move(a.data));
}

}  // namespace mmdit
