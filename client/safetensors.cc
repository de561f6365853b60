#include "client/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvcompress {
namespace {

using Json = nlohmann::json;

struct DTypeInfo {
  TensorDType dtype;
  absl::string_view name;
  size_t size;
};

constexpr std::array<DTypeInfo, 13> kDTypes = {{
    {TensorDType::kBool, "BOOL", 1},
    {TensorDType::kU8, "U8", 1},
    {TensorDType::kI8, "I8", 1},
    {TensorDType::kI16, "I16", 2},
    {TensorDType::kU16, "U16", 2},
    {TensorDType::kF16, "F16", 2},
    {TensorDType::kBF16, "BF16", 2},
    {TensorDType::kI32, "I32", 4},
    {TensorDType::kU32, "U32", 4},
    {TensorDType::kF32, "F32", 4},
    {TensorDType::kF64, "F64", 8},
    {TensorDType::kI64, "I64", 8},
    {TensorDType::kU64, "U64", 8},
}};

constexpr absl::string_view kMetadataKey = "__metadata__";

std::string ErrnoText() { return std::strerror(errno); }

// product(shape) × element_size, or nullopt on a negative dimension or overflow.
std::optional<uint64_t> TensorBytes(const std::vector<int64_t>& shape, size_t element_size) {
  uint64_t bytes = element_size;
  for (int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes)) return std::nullopt;
  }
  return bytes;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<TensorEntry> ParseEntry(absl::string_view file_name, const std::string& name,
                                       const Json& value, uint64_t buffer_bytes) {
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(file_name, ": tensor \"", name, "\": ", what));
  };
  if (!value.is_object()) return error("header entry is not a JSON object");
  TensorEntry entry;
  entry.name = name;

  auto dtype_it = value.find("dtype");
  if (dtype_it == value.end() || !dtype_it->is_string()) {
    return error("missing \"dtype\" string");
  }
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  std::optional<TensorDType> dtype = TensorDTypeFromName(dtype_name);
  if (!dtype) return error(absl::StrCat("unknown dtype \"", dtype_name, "\""));
  entry.dtype = *dtype;

  auto shape_it = value.find("shape");
  if (shape_it == value.end() || !shape_it->is_array()) return error("missing \"shape\" array");
  if (shape_it->size() > 16) return error(absl::StrCat("rank ", shape_it->size(), " > 16"));
  for (const Json& dim : *shape_it) {
    if (!dim.is_number_unsigned()) return error("shape entries must be non-negative integers");
    const uint64_t d = dim.get<uint64_t>();
    if (d > static_cast<uint64_t>(INT64_MAX)) return error("shape entry too large");
    entry.shape.push_back(static_cast<int64_t>(d));
  }

  auto offsets_it = value.find("data_offsets");
  if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
    return error("\"data_offsets\" must be [begin, end] with non-negative integers");
  }
  entry.begin = (*offsets_it)[0].get<uint64_t>();
  entry.end = (*offsets_it)[1].get<uint64_t>();
  if (entry.begin > entry.end) {
    return error(
        absl::StrCat("data_offsets [", entry.begin, ", ", entry.end, "]: begin after end"));
  }
  if (entry.end > buffer_bytes) {
    return error(absl::StrCat("data_offsets [", entry.begin, ", ", entry.end,
                              "] out of range: the data buffer holds ", buffer_bytes, " bytes"));
  }
  std::optional<uint64_t> expected = TensorBytes(entry.shape, TensorDTypeSize(entry.dtype));
  if (!expected) return error(absl::StrCat("shape ", ShapeText(entry.shape), " overflows"));
  if (*expected != entry.num_bytes()) {
    return error(absl::StrCat("shape ", ShapeText(entry.shape), " ", dtype_name, " needs ",
                              *expected, " bytes, data_offsets [", entry.begin, ", ", entry.end,
                              "] hold ", entry.num_bytes()));
  }
  return entry;
}

absl::Status WriteAll(int fd, const std::string& path, const void* data, size_t bytes) {
  const char* cursor = static_cast<const char*>(data);
  while (bytes > 0) {
    // Linux writes at most ~2 GiB per call.
    const size_t step = std::min<size_t>(bytes, size_t{1} << 30);
    const ssize_t written = ::write(fd, cursor, step);
    if (written < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat(path, ": write failed: ", ErrnoText()));
    }
    cursor += written;
    bytes -= static_cast<size_t>(written);
  }
  return absl::OkStatus();
}

}  // namespace

size_t TensorDTypeSize(TensorDType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info.size;
  }
  return 0;
}

absl::string_view TensorDTypeName(TensorDType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info.name;
  }
  return "?";
}

std::optional<TensorDType> TensorDTypeFromName(absl::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view file_name,
                                                         absl::string_view header_json,
                                                         uint64_t buffer_bytes) {
  Json root = Json::parse(header_json.begin(), header_json.end(), /*cb=*/nullptr,
                          /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_name, ": header (", header_json.size(), " bytes) is not valid JSON"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file_name, ": header is not a JSON object"));
  }
  SafetensorsHeader header;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == kMetadataKey) {
      if (!it->is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(file_name, ": __metadata__ is not a JSON object"));
      }
      for (auto meta = it->begin(); meta != it->end(); ++meta) {
        if (!meta->is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(file_name, ": __metadata__ \"", meta.key(), "\" is not a string"));
        }
        header.metadata.emplace(meta.key(), meta->get<std::string>());
      }
      continue;
    }
    KVC_ASSIGN_OR_RETURN(TensorEntry entry,
                         ParseEntry(file_name, it.key(), it.value(), buffer_bytes));
    header.tensors.push_back(std::move(entry));
  }

  // No two tensors may share bytes (empty tensors share nothing).
  std::vector<const TensorEntry*> by_offset;
  for (const TensorEntry& entry : header.tensors) {
    if (entry.num_bytes() > 0) by_offset.push_back(&entry);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorEntry* a, const TensorEntry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          file_name, ": tensor \"", by_offset[i]->name, "\" (bytes [", by_offset[i]->begin, ", ",
          by_offset[i]->end, ")) overlaps tensor \"", by_offset[i - 1]->name, "\" (bytes [",
          by_offset[i - 1]->begin, ", ", by_offset[i - 1]->end, "))"));
    }
  }
  // nlohmann's object iterates in key order already; keep it explicit.
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorEntry& a, const TensorEntry& b) { return a.name < b.name; });
  return header;
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::Open(
    const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InternalError(absl::StrCat(path, ": cannot open: ", ErrnoText()));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string error = ErrnoText();
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": stat failed: ", error));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": truncated: ", file_bytes,
                     " bytes, a safetensors file starts with an 8-byte "
                     "header length"));
  }
  void* mapping = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  const std::string map_error = mapping == MAP_FAILED ? ErrnoText() : std::string();
  ::close(fd);
  if (mapping == MAP_FAILED) {
    return absl::InternalError(absl::StrCat(path, ": mmap failed: ", map_error));
  }
  auto reader = std::unique_ptr<SafetensorsReader>(new SafetensorsReader());
  reader->path_ = path;
  reader->mapping_ = mapping;
  reader->mapping_bytes_ = file_bytes;

  const auto* bytes = static_cast<const std::byte*>(mapping);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) {
    header_bytes = (header_bytes << 8) | static_cast<uint8_t>(bytes[i]);
  }
  if (header_bytes == 0 || header_bytes > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_bytes,
                                                   " is not in [1, ", kMaxSafetensorsHeaderBytes,
                                                   "]"));
  }
  if (header_bytes > file_bytes - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": truncated: header length ",
                                                   header_bytes, " but only ", file_bytes - 8,
                                                   " bytes follow the length field"));
  }
  const absl::string_view header_json(reinterpret_cast<const char*>(bytes + 8), header_bytes);
  const uint64_t buffer_bytes = file_bytes - 8 - header_bytes;
  KVC_ASSIGN_OR_RETURN(reader->header_, ParseSafetensorsHeader(path, header_json, buffer_bytes));
  reader->buffer_ = bytes + 8 + header_bytes;
  // Large inputs are read front to back once.
  ::madvise(mapping, file_bytes, MADV_SEQUENTIAL);
  return reader;
}

SafetensorsReader::~SafetensorsReader() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_bytes_);
}

const TensorEntry* SafetensorsReader::Find(absl::string_view name) const {
  auto it = std::lower_bound(
      header_.tensors.begin(), header_.tensors.end(), name,
      [](const TensorEntry& entry, absl::string_view key) { return entry.name < key; });
  if (it == header_.tensors.end() || it->name != name) return nullptr;
  return &*it;
}

absl::Status SafetensorsWriter::Add(std::string name, TensorDType dtype, std::vector<int64_t> shape,
                                    std::span<const std::byte> data) {
  if (name.empty() || name == kMetadataKey) {
    return absl::InvalidArgumentError(absl::StrCat("tensor name \"", name, "\" is reserved"));
  }
  for (const PendingTensor& tensor : tensors_) {
    if (tensor.name == name) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" added twice"));
    }
  }
  std::optional<uint64_t> expected = TensorBytes(shape, TensorDTypeSize(dtype));
  if (!expected || *expected != data.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor \"", name, "\": shape ", ShapeText(shape), " ", TensorDTypeName(dtype), " needs ",
        expected ? absl::StrCat(*expected) : std::string("an invalid number of"), " bytes, got ",
        data.size()));
  }
  tensors_.push_back(PendingTensor{std::move(name), dtype, std::move(shape), data});
  return absl::OkStatus();
}

void SafetensorsWriter::SetMetadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  // Larger elements first keeps every tensor aligned to its element size.
  std::vector<const PendingTensor*> order;
  for (const PendingTensor& tensor : tensors_) order.push_back(&tensor);
  std::sort(order.begin(), order.end(), [](const PendingTensor* a, const PendingTensor* b) {
    const size_t size_a = TensorDTypeSize(a->dtype);
    const size_t size_b = TensorDTypeSize(b->dtype);
    if (size_a != size_b) return size_a > size_b;
    return a->name < b->name;
  });

  Json header = Json::object();
  uint64_t offset = 0;
  for (const PendingTensor* tensor : order) {
    const uint64_t end = offset + tensor->data.size();
    header[tensor->name] = {{"dtype", std::string(TensorDTypeName(tensor->dtype))},
                            {"shape", tensor->shape},
                            {"data_offsets", {offset, end}}};
    offset = end;
  }
  if (!metadata_.empty()) header[std::string(kMetadataKey)] = metadata_;
  // Replacing invalid UTF-8 keeps dump() from throwing on odd metadata.
  std::string header_text = header.dump(-1, ' ', false, Json::error_handler_t::replace);
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  std::array<unsigned char, 8> length;
  for (int i = 0; i < 8; ++i) {
    length[i] = static_cast<unsigned char>(static_cast<uint64_t>(header_text.size()) >> (8 * i));
  }

  const std::string temp_path = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat(temp_path, ": cannot create: ", ErrnoText()));
  }
  absl::Status status = WriteAll(fd, temp_path, length.data(), length.size());
  if (status.ok()) status = WriteAll(fd, temp_path, header_text.data(), header_text.size());
  for (const PendingTensor* tensor : order) {
    if (!status.ok()) break;
    status = WriteAll(fd, temp_path, tensor->data.data(), tensor->data.size());
  }
  if (::close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat(temp_path, ": close failed: ", ErrnoText()));
  }
  if (status.ok() && ::rename(temp_path.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(
        absl::StrCat("cannot rename ", temp_path, " to ", path, ": ", ErrnoText()));
  }
  if (!status.ok()) ::unlink(temp_path.c_str());
  return status;
}

}  // namespace kvcompress
