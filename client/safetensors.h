// Safetensors files: a reader and a writer of our own (no Python, no Rust).
//
// Format: 8-byte little-endian header length N, N bytes of JSON header
//   {name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {string: string}}
// then the byte buffer; offsets are relative to the start of the buffer.
//
// The reader memory-maps the file and validates the whole header before anything is used:
// header length within the file and at most kMaxHeaderBytes, well-formed JSON, known dtypes,
// offsets inside the buffer, sizes equal to product(shape) × dtype size, no two tensors
// overlapping. Failures are INVALID_ARGUMENT naming the file and, where there is one, the
// tensor. A reader is immutable after Open: safe to read from several threads.
//
// The writer lays tensors out the way the Python `safetensors` package does (4- and 8-byte
// dtypes first, then by name, contiguous, header padded with spaces to 8 bytes), so 4-byte
// tensors stay 4-byte aligned in a mapping and Python reads our files. Not thread-safe.
#ifndef KVCOMPRESS_CLIENT_SAFETENSORS_H_
#define KVCOMPRESS_CLIENT_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcompress {

enum class TensorDType : uint8_t {
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
};

size_t TensorDTypeSize(TensorDType dtype);
absl::string_view TensorDTypeName(TensorDType dtype);  // "F16", "BF16", "F32", "I32", ...
std::optional<TensorDType> TensorDTypeFromName(absl::string_view name);

// The largest header we accept (the limit of the reference implementation).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100u << 20;

struct TensorEntry {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets within the data buffer
  uint64_t end = 0;

  uint64_t num_bytes() const { return end - begin; }
};

// Parses and validates a header. `file_name` only labels error messages; `header_json` is
// the N header bytes; `buffer_bytes` is the size of the data buffer that follows.
struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;  // sorted by name
  std::map<std::string, std::string> metadata;
};
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view file_name,
                                                         absl::string_view header_json,
                                                         uint64_t buffer_bytes);

class SafetensorsReader final {
 public:
  // Maps and validates `path`. NOT_FOUND when it does not exist, INVALID_ARGUMENT when it
  // is malformed, INTERNAL on other I/O errors.
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> Open(const std::string& path);
  ~SafetensorsReader();

  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorEntry>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  // Null when absent.
  const TensorEntry* Find(absl::string_view name) const;
  // The tensor's bytes inside the mapping; valid while the reader lives.
  std::span<const std::byte> Data(const TensorEntry& entry) const {
    return {buffer_ + entry.begin, entry.num_bytes()};
  }

 private:
  SafetensorsReader() = default;

  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  const std::byte* buffer_ = nullptr;  // start of the data buffer
  SafetensorsHeader header_;
};

class SafetensorsWriter final {
 public:
  SafetensorsWriter() = default;
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Adds a tensor whose bytes stay owned by the caller and alive until Write returns.
  // INVALID_ARGUMENT on a duplicate or reserved name, a negative dimension or a byte count
  // that is not product(shape) × dtype size.
  absl::Status Add(std::string name, TensorDType dtype, std::vector<int64_t> shape,
                   std::span<const std::byte> data);
  void SetMetadata(std::string key, std::string value);

  // Writes the file through a temporary beside it and renames it into place, so readers
  // never see a half-written file. INTERNAL naming the path and errno on I/O errors.
  absl::Status Write(const std::string& path) const;

 private:
  struct PendingTensor {
    std::string name;
    TensorDType dtype;
    std::vector<int64_t> shape;
    std::span<const std::byte> data;
  };
  std::vector<PendingTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Views the bytes of a trivially copyable array.
template <typename T>
std::span<const std::byte> AsBytes(std::span<const T> values) {
  return std::as_bytes(values);
}
template <typename T>
std::span<const std::byte> AsBytes(const std::vector<T>& values) {
  return std::as_bytes(std::span<const T>(values));
}

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_SAFETENSORS_H_
