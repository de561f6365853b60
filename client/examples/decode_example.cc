// kvc_decode_example: the decode side of disaggregated serving with kvcd forwarding. Opens an
// nccl channel from kvcd to this process's GPU (CHANNEL_DIRECTION_FROM_KVCD), publishes its id
// (--channel-id-file, for prefill workers such as kvc_prefill_example), listens with
// ReceiveForwarded and receives every forwarded layer into device memory; with --dump-dir it
// also writes each layer to disk. One line per finished request.
//
//   kvc_decode_example --target=localhost:50051 --channel-id-file=/tmp/decode.channel
//       [--device=0] [--requests=N (0: until the channel closes)] [--dump-dir=DIR]
//       [--transfer-timeout=60] [--tls* --auth-token-file=FILE]
//
// Dumps: DIR/<request_id>/seq<S>_layer<L>.bin holds keys || values || positions (int32) ||
// merged (int32, when sent) exactly as received (the inline result layouts), and
// seq<S>_layer<L>.json the ForwardedLayer notice (proto JSON, snake_case field names).
//
// Exit codes: 0 after --requests requests (or, with 0, when kvcd closes the channel); 1 on
// an error (the status is printed); 2 for usage errors.
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/connection_flags.h"
#include "client/method_flags.h"
#include "client/nccl_channel.h"
#include "google/protobuf/util/json_util.h"

namespace kvcompress {
namespace {

std::vector<FlagSpec> Flags() {
  std::vector<FlagSpec> all = {
      {"target", true, "HOST:PORT  the kvcd"},
      {"device", true, "N  CUDA device to receive on (default 0)"},
      {"channel-id-file", true, "PATH  write the channel id there (atomically: temp + rename)"},
      {"requests", true, "N  exit after N forwarded requests end (default 0: run until closed)"},
      {"dump-dir", true, "DIR  write every received layer under DIR/<request_id>/"},
      {"transfer-timeout", true, "SECONDS  for one layer's receives (default 60)"},
  };
  for (const FlagSpec& flag : ConnectionFlagSpecs()) all.push_back(flag);
  return all;
}

void PrintUsage(FILE* out) {
  std::fprintf(out, "usage: kvc_decode_example --target=HOST:PORT [flags]\n\nflags:\n");
  for (const FlagSpec& flag : Flags()) {
    std::fprintf(out, "  --%-22s %s\n", flag.name.c_str(), flag.help.c_str());
  }
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvc_decode_example: error: %s: %s\n",
               absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

int Usage(absl::string_view message) {
  // ParseFlags words its messages for kvc subcommands.
  const std::string text =
      absl::StrReplaceAll(message, {{"kvc kvc_decode_example: ", ""}, {" (see kvc help)", ""}});
  std::fprintf(stderr, "kvc_decode_example: %s\n(--help for usage)\n", text.c_str());
  return 2;
}

absl::Status CudaStatus(cudaError_t error, absl::string_view what) {
  if (error == cudaSuccess) return absl::OkStatus();
  (void)cudaGetLastError();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

// Writes `text` to `path` through a temporary file and a rename, so that a reader never sees
// half of it.
absl::Status WriteAtomically(const std::string& path, const std::string& text) {
  const std::string temporary = absl::StrCat(path, ".tmp.", ::getpid());
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << text;
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("writing ", temporary));
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("renaming ", temporary, " to ", path, ": ", error.message()));
  }
  return absl::OkStatus();
}

// A request id as a directory name: characters outside [A-Za-z0-9._-] become '_'.
std::string DirectoryName(const std::string& request_id) {
  std::string name = request_id.empty() ? "unnamed" : request_id;
  for (char& c : name) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                       c == '.' || c == '_' || c == '-';
    if (!plain) c = '_';
  }
  if (name == "." || name == "..") name = "_" + name;
  return name;
}

// One forwarded request while its layers arrive.
struct RequestProgress {
  absl::Time first_layer;
  int layers = 0;
  uint64_t tokens_in = 0;  // Σ over layers of T · H_kv
  uint64_t tokens_kept = 0;
  uint64_t bytes = 0;
};

// Receives one layer into fresh device buffers on `stream`, waits for it, and dumps it when
// `dump_dir` is set; the buffers are freed on the stream afterwards.
absl::Status ReceiveLayer(NcclChannel& channel, const v1::ForwardedLayer& layer,
                          cudaStream_t stream, absl::Duration timeout,
                          const std::optional<std::string>& dump_dir) {
  const v1::LayerResult& result = layer.result();
  const uint64_t sizes[4] = {result.keys_bytes(), result.values_bytes(), result.positions_bytes(),
                             result.merged_bytes()};
  void* buffers[4] = {};
  absl::Status status;
  for (int t = 0; t < 4 && status.ok(); ++t) {
    if (sizes[t] == 0) continue;
    status = CudaStatus(cudaMallocAsync(&buffers[t], sizes[t], stream), "cudaMallocAsync");
  }
  if (status.ok()) {
    status = channel.ReceiveLayer(layer,
                                  {buffers[0], buffers[1], static_cast<int32_t*>(buffers[2]),
                                   static_cast<int32_t*>(buffers[3])},
                                  stream);
  }
  if (status.ok()) status = channel.Synchronize(stream, timeout);
  if (status.ok() && dump_dir) {
    const uint64_t total = sizes[0] + sizes[1] + sizes[2] + sizes[3];
    std::vector<char> host(total);
    uint64_t offset = 0;
    for (int t = 0; t < 4 && status.ok(); ++t) {
      if (sizes[t] == 0) continue;
      status = CudaStatus(cudaMemcpyAsync(host.data() + offset, buffers[t], sizes[t],
                                          cudaMemcpyDeviceToHost, stream),
                          "cudaMemcpyAsync");
      offset += sizes[t];
    }
    if (status.ok()) status = CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (status.ok()) {
      const std::filesystem::path directory =
          std::filesystem::path(*dump_dir) / DirectoryName(layer.request_id());
      std::error_code error;
      std::filesystem::create_directories(directory, error);
      const std::string stem = absl::StrCat("seq", result.sequence(), "_layer", result.layer());
      std::ofstream out(directory / (stem + ".bin"), std::ios::binary | std::ios::trunc);
      out.write(host.data(), static_cast<std::streamsize>(host.size()));
      out.close();
      std::string json;
      google::protobuf::util::JsonPrintOptions options;
      options.preserve_proto_field_names = true;
      options.add_whitespace = true;
      (void)google::protobuf::util::MessageToJsonString(layer, &json, options);
      std::ofstream meta(directory / (stem + ".json"), std::ios::trunc);
      meta << json;
      meta.close();
      if (error || !out || !meta) {
        status =
            absl::InternalError(absl::StrCat("writing ", (directory / stem).string(), ".{bin,json}",
                                             error ? ": " : "", error ? error.message() : ""));
      }
    }
  }
  // After an aborted transfer the stream may still be draining; freeing on it stays ordered.
  for (void* buffer : buffers) {
    if (buffer != nullptr) cudaFreeAsync(buffer, stream);
  }
  return status;
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  for (const std::string& arg : args) {
    if (arg == "--help" || arg == "-h") {
      PrintUsage(stdout);
      return 0;
    }
  }
  const std::vector<FlagSpec> known = Flags();
  absl::StatusOr<ParsedFlags> flags = ParseFlags(args, known, "kvc_decode_example");
  if (!flags.ok()) return Usage(flags.status().message());
  const std::optional<std::string> target = flags->Get("target");
  if (!target) return Usage("--target is required");
  absl::StatusOr<std::optional<uint32_t>> device = flags->GetUint("device", 0, 1024);
  if (!device.ok()) return Usage(device.status().message());
  absl::StatusOr<std::optional<uint32_t>> requests = flags->GetUint("requests", 0, UINT32_MAX);
  if (!requests.ok()) return Usage(requests.status().message());
  absl::StatusOr<std::optional<double>> timeout = flags->GetDouble("transfer-timeout", 1e-3, 1e6);
  if (!timeout.ok()) return Usage(timeout.status().message());
  const absl::Duration transfer_timeout = absl::Seconds(timeout->value_or(60));
  const std::optional<std::string> id_file = flags->Get("channel-id-file");
  const std::optional<std::string> dump_dir = flags->Get("dump-dir");
  ClientOptions client_options;
  if (absl::Status status = ApplyConnectionFlags(*flags, client_options); !status.ok()) {
    return Usage(status.message());
  }

  if (absl::Status status = CudaStatus(cudaSetDevice(static_cast<int>(device->value_or(0))),
                                       absl::StrCat("cudaSetDevice(", device->value_or(0), ")"));
      !status.ok()) {
    return Fail(status);
  }
  cudaStream_t stream = nullptr;
  if (absl::Status status = CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                       "cudaStreamCreateWithFlags");
      !status.ok()) {
    return Fail(status);
  }
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(*target, client_options);
  if (!client.ok()) return Fail(client.status());
  absl::StatusOr<std::unique_ptr<NcclChannel>> channel =
      OpenNcclChannel(**client, v1::CHANNEL_DIRECTION_FROM_KVCD);
  if (!channel.ok()) return Fail(channel.status());
  absl::StatusOr<std::unique_ptr<ForwardStream>> listener =
      (*client)->ReceiveForwarded((*channel)->id(), absl::InfiniteDuration());
  if (!listener.ok()) return Fail(listener.status());
  std::printf("channel  %s (device %d), listening\n", (*channel)->id().c_str(),
              static_cast<int>(device->value_or(0)));
  std::fflush(stdout);
  if (id_file) {
    if (absl::Status status = WriteAtomically(*id_file, (*channel)->id() + "\n"); !status.ok()) {
      return Fail(status);
    }
  }

  std::map<std::string, RequestProgress> in_flight;
  uint32_t finished = 0;
  absl::Status failure;
  for (;;) {
    absl::StatusOr<std::optional<v1::ForwardNotice>> notice = (*listener)->Next();
    if (!notice.ok()) {
      failure = notice.status();
      break;
    }
    if (!notice->has_value()) {
      if (requests->value_or(0) > 0) {
        failure = absl::UnavailableError(absl::StrCat("kvcd closed the channel after ", finished,
                                                      " of ", requests->value_or(0), " requests"));
      } else {
        std::printf("channel  closed by kvcd after %u requests\n", finished);
      }
      break;
    }
    if ((*notice)->has_layer()) {
      const v1::ForwardedLayer& layer = (*notice)->layer();
      RequestProgress& progress = in_flight[layer.request_id()];
      if (progress.layers == 0) progress.first_layer = absl::Now();
      if (absl::Status status = ReceiveLayer(**channel, layer, stream, transfer_timeout, dump_dir);
          !status.ok()) {
        failure = status;
        break;
      }
      const v1::LayerResult& result = layer.result();
      ++progress.layers;
      progress.tokens_in +=
          uint64_t{layer.sequence_shape().num_tokens()} * layer.geometry().num_kv_heads();
      for (uint32_t kept : result.kept()) progress.tokens_kept += kept;
      progress.bytes += result.keys_bytes() + result.values_bytes() + result.positions_bytes() +
                        result.merged_bytes();
      continue;
    }
    const v1::ForwardedRequestEnd& end = (*notice)->end();
    const RequestProgress progress = in_flight[end.request_id()];
    in_flight.erase(end.request_id());
    const double seconds =
        progress.layers > 0 ? absl::ToDoubleSeconds(absl::Now() - progress.first_layer) : 0.0;
    std::printf(
        "request  %s: %s, %d layers received (kvcd forwarded %u), %llu of %llu tokens kept "
        "(%.2f%%), %.1f MiB in %.3f s%s%s\n",
        end.request_id().c_str(),
        end.status_code() == 0
            ? "OK"
            : absl::StatusCodeToString(static_cast<absl::StatusCode>(end.status_code())).c_str(),
        progress.layers, end.forwarded_layers(),
        static_cast<unsigned long long>(progress.tokens_kept),
        static_cast<unsigned long long>(progress.tokens_in),
        progress.tokens_in ? 100.0 * progress.tokens_kept / progress.tokens_in : 0.0,
        progress.bytes / 1048576.0, seconds, end.status_message().empty() ? "" : ": ",
        end.status_message().c_str());
    std::fflush(stdout);
    ++finished;
    if (requests->value_or(0) > 0 && finished >= requests->value_or(0)) break;
  }
  (*listener)->Cancel();
  listener->reset();
  if (absl::Status status = (*channel)->Close(); !status.ok() && failure.ok()) failure = status;
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  if (id_file) {
    std::error_code ignored;
    std::filesystem::remove(*id_file, ignored);  // it names a closed channel now
  }
  return failure.ok() ? 0 : Fail(failure);
}

}  // namespace
}  // namespace kvcompress

int main(int argc, char** argv) { return kvcompress::Main(argc, argv); }
