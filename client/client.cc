#include "client/client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvcompress {
namespace {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

// Index of a result tensor in PendingLayer's arrays; −1 for kinds a result never carries.
int ResultTensorIndex(v1::TensorKind kind) {
  switch (kind) {
    case v1::TENSOR_KIND_KEYS:
      return 0;
    case v1::TENSOR_KIND_VALUES:
      return 1;
    case v1::TENSOR_KIND_POSITIONS:
      return 2;
    case v1::TENSOR_KIND_MERGED:
      return 3;
    default:
      return -1;
  }
}

std::string NewRequestId() {
  std::random_device device;
  std::mt19937_64 rng((static_cast<uint64_t>(device()) << 32) ^ device() ^
                      static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())));
  return absl::StrFormat("kvc-%016x", rng());
}

absl::Duration Resolve(absl::Duration deadline, const ClientOptions& options) {
  return deadline == absl::ZeroDuration() ? options.default_deadline : deadline;
}

void SetDeadline(grpc::ClientContext& context, absl::Duration deadline) {
  if (deadline == absl::InfiniteDuration()) return;
  context.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
}

// A small file (PEM, token) whole; errors name the option and the path.
absl::StatusOr<std::string> ReadOptionFile(const std::string& path, absl::string_view option) {
  constexpr std::streamoff kMaxBytes = 4 << 20;
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    const int error = errno;
    const std::string where = absl::StrCat("ClientOptions.", option, " ", path, ": ");
    if (error == ENOENT || error == ENOTDIR) return absl::NotFoundError(where + "no such file");
    if (error == EACCES) return absl::PermissionDeniedError(where + "permission denied");
    return absl::InvalidArgumentError(where + std::strerror(error));
  }
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad() || static_cast<std::streamoff>(content.size()) > kMaxBytes) {
    return absl::InvalidArgumentError(absl::StrCat("ClientOptions.", option, " ", path,
                                                   ": not a readable file of at most 4 MiB"));
  }
  return content;
}

// The "Bearer <token>" metadata value from the options; empty when no token is configured.
absl::StatusOr<std::string> Authorization(const ClientOptions& options) {
  if (!options.auth_token.empty() && !options.auth_token_file.empty()) {
    return absl::InvalidArgumentError("ClientOptions: set auth_token or auth_token_file, not both");
  }
  std::string token = options.auth_token;
  if (!options.auth_token_file.empty()) {
    absl::StatusOr<std::string> content =
        ReadOptionFile(options.auth_token_file, "auth_token_file");
    if (!content.ok()) return content.status();
    token = *std::move(content);
    // Files written by echo or mounted from a Kubernetes Secret end in a newline.
    while (!token.empty() && absl::ascii_isspace(static_cast<unsigned char>(token.back()))) {
      token.pop_back();
    }
    if (token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("ClientOptions.auth_token_file ", options.auth_token_file, ": empty"));
    }
  }
  if (token.empty()) return std::string();
  for (size_t i = 0; i < token.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(token[i]);
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          absl::StrCat("ClientOptions auth token: byte ", i,
                       " is not printable ASCII (0x21-0x7e), which gRPC metadata cannot carry"));
    }
  }
  return absl::StrCat("Bearer ", token);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsCredentials(const TlsOptions& tls) {
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClientOptions.tls: cert_file and key_file go together (mTLS); ",
                     tls.cert_file.empty() ? "key_file" : "cert_file", " is set, ",
                     tls.cert_file.empty() ? "cert_file" : "key_file", " is not"));
  }
  grpc::SslCredentialsOptions ssl;
  if (!tls.root_ca_file.empty()) {
    absl::StatusOr<std::string> roots = ReadOptionFile(tls.root_ca_file, "tls.root_ca_file");
    if (!roots.ok()) return roots.status();
    ssl.pem_root_certs = *std::move(roots);
  }
  if (!tls.cert_file.empty()) {
    absl::StatusOr<std::string> cert = ReadOptionFile(tls.cert_file, "tls.cert_file");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadOptionFile(tls.key_file, "tls.key_file");
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *std::move(cert);
    ssl.pem_private_key = *std::move(key);
  }
  return grpc::SslCredentials(ssl);
}

absl::Status Violation(absl::string_view what) {
  return absl::InternalError(absl::StrCat("server protocol violation: ", what));
}

absl::Status ValidateHeader(const v1::CompressHeader& header) {
  const v1::CacheGeometry& g = header.geometry();
  auto bad = [](absl::string_view field, uint64_t value, absl::string_view expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.", field, " = ", value, ", expected ", expected));
  };
  if (!header.has_geometry()) return absl::InvalidArgumentError("header.geometry: not set");
  if (g.num_layers() == 0 || g.num_layers() > (1u << 20)) {
    return bad("geometry.num_layers", g.num_layers(), "in [1, 2^20]");
  }
  if (g.num_kv_heads() == 0) return bad("geometry.num_kv_heads", 0, "> 0");
  if (g.head_dim() == 0) return bad("geometry.head_dim", 0, "> 0");
  if (DTypeBytes(g.dtype()) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.geometry.dtype = ", v1::DType_Name(g.dtype()),
                     ", expected DTYPE_FLOAT16, DTYPE_BFLOAT16 or DTYPE_FLOAT32"));
  }
  if (header.sequences_size() == 0) {
    return absl::InvalidArgumentError("header.sequences: empty, expected at least one");
  }
  if (static_cast<uint64_t>(header.sequences_size()) * g.num_layers() > (1u << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat("header: ", header.sequences_size(), " sequences × ", g.num_layers(),
                     " layers is more than the SDK tracks (2^24 layer results)"));
  }
  for (int s = 0; s < header.sequences_size(); ++s) {
    const v1::SequenceShape& shape = header.sequences(s);
    if (shape.num_tokens() == 0) {
      return bad(absl::StrCat("sequences[", s, "].num_tokens"), 0, "> 0");
    }
    if (shape.num_window_queries() > 0 && g.num_query_heads() == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "header.sequences[", s, "] sends window queries but geometry.num_query_heads is 0"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

size_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
    case v1::DTYPE_BFLOAT16:
      return 2;
    case v1::DTYPE_FLOAT32:
      return 4;
    default:
      return 0;
  }
}

LayerTensorBytes ExpectedLayerBytes(const v1::CompressHeader& header, int sequence) {
  const v1::CacheGeometry& g = header.geometry();
  const v1::SequenceShape& shape = header.sequences(sequence);
  const uint64_t element = DTypeBytes(g.dtype());
  LayerTensorBytes bytes;
  bytes.keys = uint64_t{g.num_kv_heads()} * shape.num_tokens() * g.head_dim() * element;
  bytes.queries =
      uint64_t{g.num_query_heads()} * shape.num_window_queries() * g.head_dim() * element;
  bytes.scores = uint64_t{shape.num_score_heads()} * shape.num_tokens() * sizeof(float);
  return bytes;
}

absl::Status ValidateForwardedLayer(const v1::ForwardedLayer& layer) {
  const v1::LayerResult& result = layer.result();
  const v1::CacheGeometry& g = layer.geometry();
  const std::string where =
      absl::StrCat("forwarded layer of request ", layer.request_id(), " (sequence ",
                   result.sequence(), " layer ", result.layer(), ")");
  auto bad = [&](const std::string& what) {
    return absl::InternalError(absl::StrCat("server protocol violation: ", where, ": ", what));
  };
  const uint64_t element = DTypeBytes(g.dtype());
  if (element == 0) return bad(absl::StrCat("geometry.dtype ", v1::DType_Name(g.dtype())));
  if (g.num_kv_heads() == 0 || g.head_dim() == 0 || g.num_layers() == 0) {
    return bad(absl::StrCat("geometry has ", g.num_layers(), " layers, ", g.num_kv_heads(),
                            " KV heads, head_dim ", g.head_dim()));
  }
  if (result.layer() >= g.num_layers() || result.sequence() >= layer.num_sequences()) {
    return bad(absl::StrCat("not in the request's ", layer.num_sequences(), " sequences of ",
                            g.num_layers(), " layers"));
  }
  const uint64_t num_tokens = layer.sequence_shape().num_tokens();
  if (static_cast<uint32_t>(result.kept_size()) != g.num_kv_heads()) {
    return bad(
        absl::StrCat("kept has ", result.kept_size(), " heads, expected ", g.num_kv_heads()));
  }
  uint64_t total = 0;
  uint32_t largest = 0;
  for (int h = 0; h < result.kept_size(); ++h) {
    if (result.kept(h) > num_tokens) {
      return bad(
          absl::StrCat("head ", h, " keeps ", result.kept(h), " of ", num_tokens, " tokens"));
    }
    total += result.kept(h);
    largest = std::max(largest, result.kept(h));
  }
  uint64_t rows = total;
  if (result.format() == v1::OUTPUT_FORMAT_PADDED) {
    if (result.max_kept() < largest || result.max_kept() > num_tokens) {
      return bad(absl::StrCat("max_kept ", result.max_kept(), " not in [", largest, ", ",
                              num_tokens, "]"));
    }
    rows = uint64_t{g.num_kv_heads()} * result.max_kept();
  }
  const uint64_t kv_bytes = rows * g.head_dim() * element;
  const uint64_t index_bytes = rows * sizeof(int32_t);
  if (result.keys_bytes() != kv_bytes || result.values_bytes() != kv_bytes ||
      result.positions_bytes() != index_bytes ||
      (result.merged_bytes() != 0 && result.merged_bytes() != index_bytes)) {
    return bad(absl::StrCat("announces keys/values/positions/merged bytes ", result.keys_bytes(),
                            "/", result.values_bytes(), "/", result.positions_bytes(), "/",
                            result.merged_bytes(), "; its kept counts need ", kv_bytes, "/",
                            kv_bytes, "/", index_bytes, "/(0 or ", index_bytes, ")"));
  }
  return absl::OkStatus();
}

int64_t CompressedLayer::total_kept() const {
  int64_t total = 0;
  for (int32_t count : kept) total += count;
  return total;
}

uint64_t CompressedLayer::tensor_bytes() const {
  return keys.size() + values.size() + (positions.size() + merged.size()) * sizeof(int32_t);
}

// ---------------------------------------------------------------------------
// CompressSession

struct CompressSession::PendingLayer {
  CompressedLayer result;
  std::array<uint64_t, 4> expected{};  // keys, values, positions, merged
  std::array<uint64_t, 4> received{};

  std::byte* Destination(int index) {
    switch (index) {
      case 0:
        return result.keys.data();
      case 1:
        return result.values.data();
      case 2:
        return reinterpret_cast<std::byte*>(result.positions.data());
      default:
        return reinterpret_cast<std::byte*>(result.merged.data());
    }
  }
  bool complete() const { return expected == received; }
};

CompressSession::CompressSession(v1::CompressHeader header, size_t max_chunk_bytes,
                                 SessionOptions options)
    : header_(std::move(header)),
      request_id_(header_.request_id()),
      max_chunk_bytes_(max_chunk_bytes),
      options_(std::move(options)),
      num_layers_(static_cast<int>(header_.geometry().num_layers())),
      element_bytes_(DTypeBytes(header_.geometry().dtype())),
      padded_(header_.output().format() == v1::OUTPUT_FORMAT_PADDED),
      forwarded_(!header_.forward_channel_id().empty()),
      layers_expected_(forwarded_ ? 0 : header_.sequences_size() * num_layers_) {
  sent_.assign(header_.sequences_size(), std::vector<bool>(num_layers_, false));
  pending_.resize(layers_expected_);
  done_.assign(layers_expected_, false);
}

CompressSession::~CompressSession() {
  if (!reader_.joinable()) return;
  bool done;
  {
    absl::MutexLock lock(&mu_);
    done = reader_done_;
  }
  if (!done) context_->TryCancel();
  WaitForEnd().IgnoreError();
}

absl::Status CompressSession::Start(v1::KvCompress::Stub* stub, absl::Duration deadline,
                                    const std::string& authorization) {
  context_ = std::make_unique<grpc::ClientContext>();
  SetDeadline(*context_, deadline);
  if (!authorization.empty()) context_->AddMetadata("authorization", authorization);
  stream_ = stub->Compress(context_.get());
  v1::CompressRequest request;
  *request.mutable_header() = header_;
  bool written;
  {
    absl::MutexLock lock(&write_mu_);
    written = stream_->Write(request);
  }
  reader_ = std::thread([this] { ReadLoop(); });
  if (!written) {
    absl::Status status = WaitForEnd();
    if (status.ok()) status = absl::UnavailableError("Compress stream closed before the header");
    return status;
  }
  return absl::OkStatus();
}

void CompressSession::ReadLoop() {
  v1::CompressResponse response;
  bool violated = false;
  while (stream_->Read(&response)) {
    if (violated) continue;  // draining after a cancel
    absl::Status status = HandleResponse(response);
    if (!status.ok()) {
      violated = true;
      {
        absl::MutexLock lock(&mu_);
        protocol_error_ = std::move(status);
      }
      context_->TryCancel();
    }
  }
  grpc::Status final_status;
  {
    absl::MutexLock lock(&write_mu_);
    writes_closed_ = true;
    final_status = stream_->Finish();
  }
  absl::MutexLock lock(&mu_);
  grpc_status_ = FromGrpcStatus(final_status);
  reader_done_ = true;
}

absl::Status CompressSession::HandleResponse(v1::CompressResponse& response) {
  if (summary_seen_) {
    return Violation("a message arrived after the summary, which must be the last message");
  }
  switch (response.payload_case()) {
    case v1::CompressResponse::kLayerResult:
      return HandleLayerResult(response.layer_result());
    case v1::CompressResponse::kResultChunk:
      return HandleChunk(response.result_chunk());
    case v1::CompressResponse::kSummary: {
      const int received = layers_received_.load(std::memory_order_relaxed);
      if (received != layers_expected_) {
        return Violation(absl::StrCat("summary arrived after ", received, " of ", layers_expected_,
                                      " layer results"));
      }
      const uint64_t forwarded = response.summary().forwarded_layers();
      const uint64_t all_layers = uint64_t(header_.sequences_size()) * num_layers_;
      if (forwarded_ && forwarded != all_layers) {
        return Violation(absl::StrCat("summary.forwarded_layers = ", forwarded, ", expected ",
                                      all_layers,
                                      " (every layer of every sequence) for a "
                                      "request forwarded to channel ",
                                      header_.forward_channel_id()));
      }
      if (!forwarded_ && forwarded != 0) {
        return Violation(absl::StrCat("summary.forwarded_layers = ", forwarded,
                                      " for a request that forwards nothing"));
      }
      summary_seen_ = true;
      absl::MutexLock lock(&mu_);
      summary_ = std::move(*response.mutable_summary());
      return absl::OkStatus();
    }
    default:
      return Violation("a CompressResponse with no payload");
  }
}

absl::Status CompressSession::HandleLayerResult(const v1::LayerResult& result) {
  const uint32_t sequence = result.sequence();
  const uint32_t layer = result.layer();
  const std::string where = absl::StrCat("layer_result for sequence ", sequence, " layer ", layer);
  if (forwarded_) {
    return Violation(absl::StrCat(where, ": the request forwards its results to channel ",
                                  header_.forward_channel_id(), ", none may come back inline"));
  }
  if (sequence >= static_cast<uint32_t>(header_.sequences_size()) ||
      layer >= static_cast<uint32_t>(num_layers_)) {
    return Violation(absl::StrCat(where, ": the request has ", header_.sequences_size(),
                                  " sequences of ", num_layers_, " layers"));
  }
  const size_t index = static_cast<size_t>(sequence) * num_layers_ + layer;
  if (done_[index] || pending_[index] != nullptr)
    return Violation(absl::StrCat(where, ": sent twice"));

  const v1::OutputFormat format = result.format() == v1::OUTPUT_FORMAT_PADDED
                                      ? v1::OUTPUT_FORMAT_PADDED
                                      : v1::OUTPUT_FORMAT_RAGGED;
  if ((format == v1::OUTPUT_FORMAT_PADDED) != padded_) {
    return Violation(absl::StrCat(where, ": format ", v1::OutputFormat_Name(result.format()),
                                  ", the request asked for ",
                                  padded_ ? "OUTPUT_FORMAT_PADDED" : "OUTPUT_FORMAT_RAGGED"));
  }
  const v1::CacheGeometry& g = header_.geometry();
  const uint64_t num_tokens = header_.sequences(sequence).num_tokens();
  if (static_cast<uint32_t>(result.kept_size()) != g.num_kv_heads()) {
    return Violation(absl::StrCat(where, ": kept has ", result.kept_size(), " heads, expected ",
                                  g.num_kv_heads()));
  }
  uint64_t total = 0;
  uint32_t largest = 0;
  for (int h = 0; h < result.kept_size(); ++h) {
    const uint32_t count = result.kept(h);
    if (count > num_tokens) {
      return Violation(
          absl::StrCat(where, ": head ", h, " keeps ", count, " of ", num_tokens, " tokens"));
    }
    total += count;
    largest = std::max(largest, count);
  }
  uint64_t rows = total;
  if (padded_) {
    if (result.max_kept() < largest || result.max_kept() > num_tokens) {
      return Violation(absl::StrCat(where, ": max_kept ", result.max_kept(), " not in [", largest,
                                    ", ", num_tokens, "]"));
    }
    rows = uint64_t{g.num_kv_heads()} * result.max_kept();
  }
  const uint64_t kv_bytes = rows * g.head_dim() * element_bytes_;
  const uint64_t index_bytes = rows * sizeof(int32_t);
  if (result.keys_bytes() != kv_bytes || result.values_bytes() != kv_bytes ||
      result.positions_bytes() != index_bytes ||
      (result.merged_bytes() != 0 && result.merged_bytes() != index_bytes)) {
    return Violation(absl::StrCat(where, ": announces keys/values/positions/merged bytes ",
                                  result.keys_bytes(), "/", result.values_bytes(), "/",
                                  result.positions_bytes(), "/", result.merged_bytes(),
                                  "; its kept counts need ", kv_bytes, "/", kv_bytes, "/",
                                  index_bytes, "/(0 or ", index_bytes, ")"));
  }
  const double mass = result.attention_mass_kept();
  if (!std::isfinite(mass) || !(mass == -1.0 || (mass >= -1e-6 && mass <= 1.0 + 1e-6))) {
    return Violation(
        absl::StrCat(where, ": attention_mass_kept ", mass, " is neither −1 nor in [0, 1]"));
  }

  auto pending = std::make_unique<PendingLayer>();
  CompressedLayer& out = pending->result;
  out.sequence = sequence;
  out.layer = layer;
  out.format = format;
  out.kept.assign(result.kept().begin(), result.kept().end());
  out.max_kept = padded_ ? result.max_kept() : 0;
  out.attention_mass_kept = mass;
  if (result.in_output_region()) {
    // The tensors went to the layer's output slice; nothing follows on the stream.
    if (padded_ || result.merged_bytes() != 0) {
      return Violation(absl::StrCat(where, ": in_output_region with ",
                                    padded_ ? "the padded format" : "merged counts"));
    }
    out.in_output_region = true;
    return CompleteLayer(*pending);
  }
  out.keys.resize(kv_bytes);
  out.values.resize(kv_bytes);
  out.positions.resize(rows);
  if (result.merged_bytes() != 0) out.merged.resize(rows);
  pending->expected = {kv_bytes, kv_bytes, index_bytes, result.merged_bytes()};
  if (pending->complete()) return CompleteLayer(*pending);
  pending_[index] = std::move(pending);
  return absl::OkStatus();
}

absl::Status CompressSession::HandleChunk(const v1::TensorChunk& chunk) {
  const std::string where = absl::StrCat("result_chunk for sequence ", chunk.sequence(), " layer ",
                                         chunk.layer(), " ", v1::TensorKind_Name(chunk.tensor()));
  if (forwarded_) {
    return Violation(absl::StrCat(where, ": the request forwards its results to channel ",
                                  header_.forward_channel_id(), ", none may come back inline"));
  }
  if (chunk.sequence() >= static_cast<uint32_t>(header_.sequences_size()) ||
      chunk.layer() >= static_cast<uint32_t>(num_layers_)) {
    return Violation(absl::StrCat(where, ": unknown layer; the request has ",
                                  header_.sequences_size(), " sequences of ", num_layers_,
                                  " layers"));
  }
  const size_t index = static_cast<size_t>(chunk.sequence()) * num_layers_ + chunk.layer();
  PendingLayer* pending = pending_[index].get();
  if (pending == nullptr) {
    return Violation(absl::StrCat(where, done_[index] ? ": the layer was already complete"
                                                      : ": no layer_result announced it"));
  }
  const int tensor = ResultTensorIndex(chunk.tensor());
  if (tensor < 0) return Violation(absl::StrCat(where, ": not a result tensor"));
  const uint64_t received = pending->received[tensor];
  const uint64_t expected = pending->expected[tensor];
  if (chunk.offset() != received) {
    return Violation(absl::StrCat(where, ": offset ", chunk.offset(), ", expected ", received));
  }
  if (chunk.data().size() > expected - received) {
    return Violation(absl::StrCat(where, ": ", chunk.data().size(), " bytes at offset ", received,
                                  " overrun the announced ", expected, " bytes"));
  }
  if (!chunk.data().empty()) {
    std::memcpy(pending->Destination(tensor) + received, chunk.data().data(), chunk.data().size());
  }
  pending->received[tensor] += chunk.data().size();
  bytes_received_.fetch_add(chunk.data().size(), std::memory_order_relaxed);
  if (!pending->complete()) return absl::OkStatus();
  std::unique_ptr<PendingLayer> finished = std::move(pending_[index]);
  return CompleteLayer(*finished);
}

absl::Status CompressSession::CompleteLayer(PendingLayer& pending) {
  CompressedLayer& result = pending.result;
  const int64_t num_tokens = header_.sequences(result.sequence).num_tokens();
  const std::string where =
      absl::StrCat("sequence ", result.sequence, " layer ", result.layer, " positions");
  // Rows of head h: [first, first + kept[h]); padded rows past kept[h] must hold −1. (Results
  // written to an output slice carry no positions here to check.)
  int64_t first = 0;
  for (size_t h = 0; h < result.kept.size() && !result.in_output_region; ++h) {
    const int64_t count = result.kept[h];
    for (int64_t i = 0; i < count; ++i) {
      const int32_t position = result.positions[first + i];
      if (position < 0 || position >= num_tokens ||
          (i > 0 && position <= result.positions[first + i - 1])) {
        return Violation(absl::StrCat(where, ": head ", h, " row ", i, " holds ", position,
                                      "; positions must ascend within [0, ", num_tokens, ")"));
      }
    }
    if (padded_) {
      for (int64_t i = count; i < result.max_kept; ++i) {
        if (result.positions[first + i] != -1) {
          return Violation(absl::StrCat(where, ": head ", h, " padding row ", i, " holds ",
                                        result.positions[first + i], ", expected -1"));
        }
      }
      first += result.max_kept;
    } else {
      first += count;
    }
  }
  done_[static_cast<size_t>(result.sequence) * num_layers_ + result.layer] = true;
  layers_received_.fetch_add(1, std::memory_order_relaxed);
  if (options_.on_layer) {
    options_.on_layer(std::move(result));
  } else {
    absl::MutexLock lock(&mu_);
    results_.push_back(std::move(result));
  }
  return absl::OkStatus();
}

absl::Status CompressSession::SendLayer(uint32_t sequence, uint32_t layer,
                                        const LayerTensors& tensors) {
  if (header_.transport() == v1::TRANSPORT_CUDA_IPC || header_.transport() == v1::TRANSPORT_NCCL) {
    return absl::FailedPreconditionError(absl::StrCat(
        "SendLayer sends tensors inline; this session's transport is ",
        v1::Transport_Name(header_.transport()), " (use ",
        header_.transport() == v1::TRANSPORT_NCCL ? "NcclChannel::SendLayer" : "SendLayerReady",
        ")"));
  }
  if (sequence >= static_cast<uint32_t>(header_.sequences_size()) ||
      layer >= static_cast<uint32_t>(num_layers_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SendLayer(sequence ", sequence, ", layer ", layer, "): the header has ",
                     header_.sequences_size(), " sequences of ", num_layers_, " layers"));
  }
  const LayerTensorBytes expected = ExpectedLayerBytes(header_, static_cast<int>(sequence));
  const std::string where = absl::StrCat("sequence ", sequence, " layer ", layer);
  auto check = [&](absl::string_view name, size_t got, uint64_t want) {
    if (got == want) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(where, " ", name, ": expected ", want,
                                                   " bytes for the header's shape, got ", got));
  };
  if (absl::Status s = check("keys", tensors.keys.size(), expected.keys); !s.ok()) return s;
  if (absl::Status s = check("values", tensors.values.size(), expected.keys); !s.ok()) return s;
  if (absl::Status s = check("queries", tensors.queries.size(), expected.queries); !s.ok()) {
    return s;
  }
  if (absl::Status s = check("scores", tensors.scores.size(), expected.scores); !s.ok()) {
    return s;
  }
  {
    absl::MutexLock lock(&write_mu_);
    if (sent_[sequence][layer]) {
      return absl::InvalidArgumentError(absl::StrCat(where, " was already sent"));
    }
    sent_[sequence][layer] = true;
  }
  if (absl::Status s = SendTensor(sequence, layer, v1::TENSOR_KIND_KEYS, tensors.keys); !s.ok()) {
    return s;
  }
  if (absl::Status s = SendTensor(sequence, layer, v1::TENSOR_KIND_VALUES, tensors.values);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = SendTensor(sequence, layer, v1::TENSOR_KIND_QUERIES, tensors.queries);
      !s.ok()) {
    return s;
  }
  return SendTensor(sequence, layer, v1::TENSOR_KIND_SCORES, tensors.scores);
}

absl::Status CompressSession::SendLayerReady(uint32_t sequence, uint32_t layer,
                                             const LayerRegions& regions) {
  if (header_.transport() == v1::TRANSPORT_NCCL) {
    if (regions.keys || regions.values || regions.queries || regions.scores || regions.output) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SendLayerReady(sequence ", sequence, ", layer ", layer,
          "): an nccl session's LayerReady carries no region slices (the tensors travel over "
          "the channel's communicator); use SendLayerAnnouncement or NcclChannel::SendLayer"));
    }
    return SendLayerAnnouncement(sequence, layer);
  }
  if (header_.transport() != v1::TRANSPORT_CUDA_IPC) {
    return absl::FailedPreconditionError(
        "SendLayerReady needs a session whose header has transport TRANSPORT_CUDA_IPC (or "
        "TRANSPORT_NCCL) and a channel_id; inline sessions use SendLayer");
  }
  if (sequence >= static_cast<uint32_t>(header_.sequences_size()) ||
      layer >= static_cast<uint32_t>(num_layers_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SendLayerReady(sequence ", sequence, ", layer ", layer, "): the header has ",
                     header_.sequences_size(), " sequences of ", num_layers_, " layers"));
  }
  const LayerTensorBytes expected = ExpectedLayerBytes(header_, static_cast<int>(sequence));
  const std::string where = absl::StrCat("sequence ", sequence, " layer ", layer);
  auto check = [&](absl::string_view name, const std::optional<RegionSlice>& slice, uint64_t want) {
    const uint64_t got = slice.has_value() ? slice->bytes : 0;
    if (got == want && slice.has_value() == (want > 0)) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat(where, " ", name, ": expected ",
                     want > 0 ? absl::StrCat(want, " bytes") : std::string("no slice"),
                     " for the header's shape, got ",
                     slice.has_value() ? absl::StrCat(got, " bytes") : std::string("none")));
  };
  if (absl::Status s = check("keys", regions.keys, expected.keys); !s.ok()) return s;
  if (absl::Status s = check("values", regions.values, expected.keys); !s.ok()) return s;
  if (absl::Status s = check("queries", regions.queries, expected.queries); !s.ok()) return s;
  if (absl::Status s = check("scores", regions.scores, expected.scores); !s.ok()) return s;
  v1::CompressRequest request;
  v1::LayerReady& ready = *request.mutable_layer_ready();
  ready.set_sequence(sequence);
  ready.set_layer(layer);
  const auto put = [](const std::optional<RegionSlice>& slice, v1::RegionSlice* out) {
    out->set_region(slice->region);
    out->set_offset(slice->offset);
    out->set_bytes(slice->bytes);
  };
  put(regions.keys, ready.mutable_keys());
  put(regions.values, ready.mutable_values());
  if (regions.queries.has_value()) put(regions.queries, ready.mutable_queries());
  if (regions.scores.has_value()) put(regions.scores, ready.mutable_scores());
  if (regions.output.has_value()) {
    if (padded_) {
      return absl::InvalidArgumentError(
          absl::StrCat(where,
                       " output: output slices take the ragged format; this session asks for "
                       "OUTPUT_FORMAT_PADDED"));
    }
    put(regions.output, ready.mutable_output());
  }
  return WriteLayerReady(request, nullptr);
}

absl::Status CompressSession::SendLayerAnnouncement(uint32_t sequence, uint32_t layer) {
  return SendLayerAnnouncement(sequence, layer, [] { return absl::OkStatus(); });
}

absl::Status CompressSession::SendLayerAnnouncement(
    uint32_t sequence, uint32_t layer, absl::FunctionRef<absl::Status()> enqueue_transfers) {
  if (header_.transport() != v1::TRANSPORT_NCCL) {
    return absl::FailedPreconditionError(absl::StrCat(
        "SendLayerAnnouncement needs a session whose header has transport TRANSPORT_NCCL and a "
        "channel_id (NcclChannel::Attach); this one has ",
        v1::Transport_Name(header_.transport()),
        header_.transport() == v1::TRANSPORT_CUDA_IPC ? " (use SendLayerReady)"
                                                      : " (use SendLayer)"));
  }
  if (sequence >= static_cast<uint32_t>(header_.sequences_size()) ||
      layer >= static_cast<uint32_t>(num_layers_)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SendLayerAnnouncement(sequence ", sequence, ", layer ", layer, "): the header has ",
        header_.sequences_size(), " sequences of ", num_layers_, " layers"));
  }
  v1::CompressRequest request;
  v1::LayerReady& ready = *request.mutable_layer_ready();
  ready.set_sequence(sequence);
  ready.set_layer(layer);
  return WriteLayerReady(request, &enqueue_transfers);
}

absl::Status CompressSession::WriteLayerReady(v1::CompressRequest& request,
                                              absl::FunctionRef<absl::Status()>* before_write) {
  const uint32_t sequence = request.layer_ready().sequence();
  const uint32_t layer = request.layer_ready().layer();
  const std::string where = absl::StrCat("sequence ", sequence, " layer ", layer);
  bool written = false;
  {
    absl::MutexLock lock(&write_mu_);
    if (sent_[sequence][layer]) {
      return absl::InvalidArgumentError(absl::StrCat(where, " was already sent"));
    }
    if (!writes_closed_) {
      if (before_write != nullptr) {
        if (absl::Status status = (*before_write)(); !status.ok()) return status;
      }
      sent_[sequence][layer] = true;
      written = stream_->Write(request);
    }
  }
  if (!written) {
    absl::Status status = WaitForEnd();
    if (status.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(where, ": the stream is already finished (layer_ready after Finish)"));
    }
    return status;
  }
  return absl::OkStatus();
}

absl::Status CompressSession::SendTensor(uint32_t sequence, uint32_t layer, v1::TensorKind kind,
                                         std::span<const std::byte> bytes) {
  v1::CompressRequest request;
  v1::TensorChunk* chunk = request.mutable_chunk();
  chunk->set_sequence(sequence);
  chunk->set_layer(layer);
  chunk->set_tensor(kind);
  for (size_t offset = 0; offset < bytes.size();) {
    const size_t size = std::min(max_chunk_bytes_, bytes.size() - offset);
    chunk->set_offset(offset);
    chunk->set_data(reinterpret_cast<const char*>(bytes.data()) + offset, size);
    bool written = false;
    bool closed = false;
    {
      absl::MutexLock lock(&write_mu_);
      closed = writes_closed_;
      if (!closed) written = stream_->Write(request);
    }
    if (!written) {
      absl::Status status = WaitForEnd();
      if (status.ok()) {
        return absl::FailedPreconditionError(
            absl::StrCat("sequence ", sequence, " layer ", layer,
                         ": the stream is already finished (SendLayer after Finish)"));
      }
      return status;
    }
    offset += size;
    bytes_sent_.fetch_add(size, std::memory_order_relaxed);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<CompressedLayer>> CompressSession::NextResult() {
  if (options_.on_layer) {
    return absl::FailedPreconditionError(
        "NextResult: this session delivers results to its on_layer callback");
  }
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !results_.empty() || reader_done_ || summary_.has_value();
  };
  mu_.Await(absl::Condition(&ready));
  if (!results_.empty()) {
    CompressedLayer result = std::move(results_.front());
    results_.pop_front();
    return std::optional<CompressedLayer>(std::move(result));
  }
  if (summary_.has_value()) return std::optional<CompressedLayer>();
  absl::Status status = FinalStatus();
  if (!status.ok()) return status;
  return std::optional<CompressedLayer>();
}

absl::StatusOr<v1::CompressSummary> CompressSession::Finish() {
  {
    absl::MutexLock lock(&write_mu_);
    if (!writes_closed_) {
      stream_->WritesDone();
      writes_closed_ = true;
    }
  }
  absl::Status status = WaitForEnd();
  if (!status.ok()) return status;
  absl::MutexLock lock(&mu_);
  return *summary_;
}

void CompressSession::Cancel() {
  {
    absl::MutexLock lock(&mu_);
    if (reader_done_) return;
    cancelled_ = true;
  }
  context_->TryCancel();
}

absl::Status CompressSession::WaitForEnd() {
  if (std::this_thread::get_id() == reader_.get_id()) {
    return absl::FailedPreconditionError(
        "CompressSession: Finish or SendLayer called from the on_layer callback");
  }
  {
    absl::MutexLock lock(&join_mu_);
    if (!joined_) {
      if (reader_.joinable()) reader_.join();
      joined_ = true;
    }
  }
  absl::MutexLock lock(&mu_);
  return FinalStatus();
}

absl::Status CompressSession::FinalStatus() {
  if (!protocol_error_.ok()) return protocol_error_;
  if (cancelled_) {
    return absl::CancelledError(absl::StrCat("request ", request_id_, " cancelled by the client"));
  }
  if (!grpc_status_.ok()) return grpc_status_;
  if (!summary_.has_value()) {
    return absl::DataLossError(
        absl::StrCat("request ", request_id_, ": the server ended the stream after ",
                     layers_received_.load(std::memory_order_relaxed), " of ", layers_expected_,
                     " layer results without a summary"));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// ForwardStream

ForwardStream::~ForwardStream() {
  if (reader_ == nullptr || ended_) return;
  context_->TryCancel();
  End().IgnoreError();
}

absl::StatusOr<std::optional<v1::ForwardNotice>> ForwardStream::Next() {
  if (!ended_) {
    v1::ForwardNotice notice;
    if (reader_->Read(&notice)) {
      if (!notice.has_layer() && !notice.has_end()) {
        end_status_ = Violation("a ForwardNotice with neither layer nor end");
      } else if (notice.has_layer()) {
        end_status_ = ValidateForwardedLayer(notice.layer());
      }
      if (end_status_.ok()) return std::optional<v1::ForwardNotice>(std::move(notice));
      context_->TryCancel();
      const absl::Status violation = end_status_;
      End().IgnoreError();
      end_status_ = violation;
      return end_status_;
    }
    End().IgnoreError();
  }
  if (!end_status_.ok()) return end_status_;
  return std::optional<v1::ForwardNotice>();
}

void ForwardStream::Cancel() {
  cancelled_.store(true);
  context_->TryCancel();
}

absl::Status ForwardStream::End() {
  v1::ForwardNotice ignored;
  while (reader_->Read(&ignored)) {
  }
  end_status_ = FromGrpcStatus(reader_->Finish());
  ended_ = true;
  if (cancelled_.load()) {
    end_status_ = absl::CancelledError(
        absl::StrCat("ReceiveForwarded on channel ", channel_id_, " cancelled by the client"));
  }
  return end_status_;
}

// ---------------------------------------------------------------------------
// Client

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options,
               std::string authorization)
    : channel_(std::move(channel)),
      stub_(v1::KvCompress::NewStub(channel_)),
      options_(std::move(options)),
      authorization_(std::move(authorization)) {}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(std::string target, ClientOptions options) {
  if (target.empty()) return absl::InvalidArgumentError("Connect: empty target");
  if (options.credentials != nullptr && options.tls.on()) {
    return absl::InvalidArgumentError("ClientOptions: set credentials or tls, not both");
  }
  if (!options.tls.server_name.empty() && !options.tls.on() && options.credentials == nullptr) {
    return absl::InvalidArgumentError(
        "ClientOptions.tls.server_name is set but TLS is off; set tls.enabled or tls.root_ca_file");
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = options.credentials;
  if (credentials == nullptr && options.tls.on()) {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> tls = TlsCredentials(options.tls);
    if (!tls.ok()) return tls.status();
    credentials = *std::move(tls);
  }
  if (credentials == nullptr) credentials = grpc::InsecureChannelCredentials();
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(8 << 20);  // a result chunk is < 4 MiB; headroom
  if (!options.tls.server_name.empty()) {
    arguments.SetSslTargetNameOverride(options.tls.server_name);
  }
  return Create(grpc::CreateCustomChannel(target, credentials, arguments), std::move(options));
}

absl::StatusOr<std::unique_ptr<Client>> Client::FromChannel(std::shared_ptr<grpc::Channel> channel,
                                                            ClientOptions options) {
  if (options.tls.on() || !options.tls.server_name.empty()) {
    return absl::InvalidArgumentError(
        "FromChannel: ClientOptions.tls applies to Connect; the channel brings its own "
        "credentials");
  }
  return Create(std::move(channel), std::move(options));
}

absl::StatusOr<std::unique_ptr<Client>> Client::Create(std::shared_ptr<grpc::Channel> channel,
                                                       ClientOptions options) {
  if (channel == nullptr) return absl::InvalidArgumentError("FromChannel: null channel");
  if (options.max_chunk_bytes == 0 || options.max_chunk_bytes > kDefaultMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClientOptions.max_chunk_bytes = ", options.max_chunk_bytes,
                     ", expected in [1, ", kDefaultMaxChunkBytes, "]"));
  }
  if (options.default_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ClientOptions.default_deadline = ", absl::FormatDuration(options.default_deadline),
        ", expected > 0"));
  }
  absl::StatusOr<std::string> authorization = Authorization(options);
  if (!authorization.ok()) return authorization.status();
  return std::unique_ptr<Client>(
      new Client(std::move(channel), std::move(options), *std::move(authorization)));
}

absl::StatusOr<v1::ServerInfo> Client::GetServerInfo(absl::Duration deadline) {
  grpc::ClientContext context;
  SetDeadline(context, Resolve(deadline, options_));
  if (!authorization_.empty()) context.AddMetadata("authorization", authorization_);
  v1::ServerInfo info;
  grpc::Status status = stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
  if (!status.ok()) return FromGrpcStatus(status);
  return info;
}

absl::StatusOr<v1::OpenChannelResponse> Client::OpenChannel(const v1::OpenChannelRequest& request,
                                                            absl::Duration deadline) {
  grpc::ClientContext context;
  SetDeadline(context, Resolve(deadline, options_));
  if (!authorization_.empty()) context.AddMetadata("authorization", authorization_);
  v1::OpenChannelResponse response;
  grpc::Status status = stub_->OpenChannel(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status Client::CloseChannel(const std::string& channel_id, absl::Duration deadline) {
  grpc::ClientContext context;
  SetDeadline(context, Resolve(deadline, options_));
  if (!authorization_.empty()) context.AddMetadata("authorization", authorization_);
  v1::CloseChannelRequest request;
  request.set_channel_id(channel_id);
  v1::CloseChannelResponse response;
  return FromGrpcStatus(stub_->CloseChannel(&context, request, &response));
}

absl::StatusOr<v1::RegisterRegionResponse> Client::RegisterRegion(
    const v1::RegisterRegionRequest& request, absl::Duration deadline) {
  grpc::ClientContext context;
  SetDeadline(context, Resolve(deadline, options_));
  if (!authorization_.empty()) context.AddMetadata("authorization", authorization_);
  v1::RegisterRegionResponse response;
  grpc::Status status = stub_->RegisterRegion(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<std::unique_ptr<ForwardStream>> Client::ReceiveForwarded(
    const std::string& channel_id, absl::Duration deadline) {
  if (channel_id.empty()) {
    return absl::InvalidArgumentError("ReceiveForwarded: empty channel id");
  }
  auto stream = std::unique_ptr<ForwardStream>(new ForwardStream(channel_id));
  stream->context_ = std::make_unique<grpc::ClientContext>();
  SetDeadline(*stream->context_, Resolve(deadline, options_));
  if (!authorization_.empty()) stream->context_->AddMetadata("authorization", authorization_);
  v1::ReceiveForwardedRequest request;
  request.set_channel_id(channel_id);
  stream->reader_ = stub_->ReceiveForwarded(stream->context_.get(), request);
  return stream;
}

absl::StatusOr<std::unique_ptr<CompressSession>> Client::StartCompress(v1::CompressHeader header,
                                                                       SessionOptions options) {
  if (absl::Status status = ValidateHeader(header); !status.ok()) return status;
  if (header.request_id().empty()) header.set_request_id(NewRequestId());
  const absl::Duration deadline = Resolve(options.deadline, options_);
  auto session = std::unique_ptr<CompressSession>(
      new CompressSession(std::move(header), options_.max_chunk_bytes, std::move(options)));
  if (absl::Status status = session->Start(stub_.get(), deadline, authorization_); !status.ok()) {
    return status;
  }
  return session;
}

absl::StatusOr<CompressedCache> Client::CompressCache(const CacheRequest& request) {
  const v1::CompressHeader& header = request.header;
  if (absl::Status status = ValidateHeader(header); !status.ok()) return status;
  const int num_sequences = header.sequences_size();
  const int num_layers = static_cast<int>(header.geometry().num_layers());
  if (static_cast<int>(request.tensors.size()) != num_sequences) {
    return absl::InvalidArgumentError(absl::StrCat("CacheRequest.tensors has ",
                                                   request.tensors.size(),
                                                   " sequences, the header ", num_sequences));
  }
  for (int s = 0; s < num_sequences; ++s) {
    if (static_cast<int>(request.tensors[s].size()) != num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("CacheRequest.tensors[", s, "] has ",
                                                     request.tensors[s].size(),
                                                     " layers, the geometry ", num_layers));
    }
  }

  CompressedCache cache;
  cache.layers.resize(num_sequences);
  for (auto& layers : cache.layers) layers.resize(num_layers);
  SessionOptions options;
  options.deadline = request.deadline;
  // Each (sequence, layer) arrives once (the session checks), so slots never collide.
  options.on_layer = [&cache](CompressedLayer layer) {
    const uint32_t sequence = layer.sequence;
    const uint32_t index = layer.layer;
    cache.layers[sequence][index] = std::move(layer);
  };
  absl::StatusOr<std::unique_ptr<CompressSession>> session =
      StartCompress(header, std::move(options));
  if (!session.ok()) return session.status();
  cache.request_id = (*session)->request_id();
  // Layer-major order, as a prefill engine produces them.
  for (int l = 0; l < num_layers; ++l) {
    for (int s = 0; s < num_sequences; ++s) {
      absl::Status status = (*session)->SendLayer(s, l, request.tensors[s][l]);
      if (!status.ok()) {
        (*session)->Cancel();
        return status;
      }
    }
  }
  absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
  if (!summary.ok()) return summary.status();
  cache.summary = *std::move(summary);
  return cache;
}

}  // namespace kvcompress
