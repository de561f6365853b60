#include "kernels/dtype.h"

namespace kvcompress {

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
  }
  return "unknown";
}

std::string_view LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kHND:
      return "HND";
    case Layout::kNHD:
      return "NHD";
  }
  return "unknown";
}

}  // namespace kvcompress
