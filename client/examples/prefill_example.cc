// kvc_prefill_example: the prefill side of disaggregated serving with kvcd forwarding. Makes a
// fixed-seed synthetic KV cache (client/synthetic_cache.h), copies it to a GPU, sends it to
// kvcd through cuda_ipc or nccl with header.forward_channel_id naming a decode worker's
// channel (kvc_decode_example prints and writes one), and prints the summary: kvcd compressed
// every layer and delivered it to the decode worker's GPU, none of it came back here.
//
//   kvc_prefill_example --target=localhost:50051 --forward-channel-file=/tmp/decode.channel
//       [--transport=nccl|cuda_ipc] [--device=0] [--tokens=32768 --layers=32 --kv-heads=8
//       --query-heads=32 --head-dim=128 --dtype=bf16 --window=64 --seed=7]
//       [--method=snapkv --keep=0.1 (or --keep-ratio=0.1)] [--padded] [--merged-counts]
//       [--deadline=300] [--tls* --auth-token-file=FILE]
//
// Exit codes: 0 success, 1 failure (the status is printed), 2 usage errors.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/connection_flags.h"
#include "client/device_cache_sender.h"
#include "client/load_generator.h"
#include "client/method_flags.h"
#include "client/synthetic_cache.h"

namespace kvcompress {
namespace {

std::vector<FlagSpec> Flags() {
  std::vector<FlagSpec> all = {
      {"target", true, "HOST:PORT  the kvcd"},
      {"forward-channel", true, "ID  the decode worker's channel"},
      {"forward-channel-file", true,
       "PATH  read the channel id from PATH (waits up to 60 s for it to appear)"},
      {"transport", true, "nccl|cuda_ipc  (default nccl)"},
      {"device", true, "N  CUDA device (default 0)"},
      {"tokens", true, "T  (default 32768)"},
      {"layers", true, "N  (default 32)"},
      {"kv-heads", true, "N  (default 8)"},
      {"query-heads", true, "N  (default 32)"},
      {"head-dim", true, "N  (default 128)"},
      {"dtype", true, "bf16|fp16|fp32  (default bf16)"},
      {"window", true, "W  window queries per layer, also the snapkv window (default 64)"},
      {"seed", true, "N  synthetic cache seed (default 7)"},
      {"deadline", true, "SECONDS  of the Compress call (default 300)"},
      {"padded", false, "ask for [H_kv, max_kept, D] results"},
      {"merged-counts", false, "ask for per-row merged counts"},
  };
  for (const FlagSpec& flag : ConnectionFlagSpecs()) all.push_back(flag);
  for (const FlagSpec& flag : MethodFlagSpecs()) {
    if (flag.name != "window") all.push_back(flag);
  }
  return all;
}

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: kvc_prefill_example --target=HOST:PORT (--forward-channel=ID | "
               "--forward-channel-file=PATH) [flags]\n\nflags:\n");
  for (const FlagSpec& flag : Flags()) {
    std::fprintf(out, "  --%-22s %s\n", flag.name.c_str(), flag.help.c_str());
  }
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvc_prefill_example: error: %s: %s\n",
               absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

int Usage(absl::string_view message) {
  // ParseFlags words its messages for kvc subcommands.
  const std::string text =
      absl::StrReplaceAll(message, {{"kvc kvc_prefill_example: ", ""}, {" (see kvc help)", ""}});
  std::fprintf(stderr, "kvc_prefill_example: %s\n(--help for usage)\n", text.c_str());
  return 2;
}

// The channel id in `path`, waiting for the file to appear (kvc_decode_example writes it once
// its channel is open; it renames it into place, so a file that exists is complete).
absl::StatusOr<std::string> ReadChannelFile(const std::string& path, absl::Duration wait) {
  const absl::Time deadline = absl::Now() + wait;
  for (;;) {
    std::ifstream in(path);
    if (in.is_open()) {
      std::string id((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      id = std::string(absl::StripAsciiWhitespace(id));
      if (id.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": empty"));
      return id;
    }
    if (absl::Now() >= deadline) {
      return absl::NotFoundError(absl::StrCat("--forward-channel-file ", path,
                                              ": no such file after ", absl::FormatDuration(wait),
                                              " (is kvc_decode_example running?)"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

absl::StatusOr<SyntheticCacheOptions> CacheOptions(const ParsedFlags& flags) {
  SyntheticCacheOptions options;
  options.num_tokens = 32768;
  options.seed = 7;
  struct IntFlag {
    const char* name;
    int* target;
    uint32_t min;
    uint32_t max;
  };
  int tokens = static_cast<int>(options.num_tokens);
  for (const IntFlag& flag :
       std::vector<IntFlag>{{"layers", &options.num_layers, 1, 1u << 16},
                            {"kv-heads", &options.num_kv_heads, 1, 1u << 16},
                            {"query-heads", &options.num_query_heads, 1, 1u << 16},
                            {"head-dim", &options.head_dim, 2, 1u << 16},
                            {"tokens", &tokens, 1, 1u << 30},
                            {"window", &options.num_window_queries, 0, 1u << 30}}) {
    absl::StatusOr<std::optional<uint32_t>> value = flags.GetUint(flag.name, flag.min, flag.max);
    if (!value.ok()) return value.status();
    if (*value) *flag.target = static_cast<int>(**value);
  }
  options.num_tokens = tokens;
  if (std::optional<std::string> seed = flags.Get("seed")) {
    if (!absl::SimpleAtoi(*seed, &options.seed)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--seed=", *seed, ": expected a non-negative integer"));
    }
  }
  if (std::optional<std::string> dtype = flags.Get("dtype")) {
    if (*dtype == "bf16") {
      options.dtype = DType::kBFloat16;
    } else if (*dtype == "fp16") {
      options.dtype = DType::kFloat16;
    } else if (*dtype == "fp32") {
      options.dtype = DType::kFloat32;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--dtype=", *dtype, ": expected bf16, fp16 or fp32"));
    }
  }
  // As `kvc bench`: keep the defaults' proportions for short caches.
  const int64_t prefix = std::max<int64_t>(0, options.num_tokens - options.num_window_queries);
  options.num_sinks = static_cast<int>(std::min<int64_t>(options.num_sinks, prefix));
  options.salient_tokens_per_head = static_cast<int>(
      std::min<int64_t>(options.salient_tokens_per_head, prefix - options.num_sinks));
  options.outlier_channel_pairs = std::min(options.outlier_channel_pairs, options.head_dim / 4);
  return options;
}

// The method flags (kvc compress's), snapkv keep 0.1 by default; --window, a shape flag here,
// is also the snapkv observation window.
absl::StatusOr<v1::MethodSpec> Method(const ParsedFlags& flags, int window) {
  std::vector<std::string> args;
  for (const auto& [name, value] : flags.values()) {
    if (name == "window") continue;
    for (const FlagSpec& spec : MethodFlagSpecs()) {
      if (spec.name == name) args.push_back(absl::StrCat("--", name, "=", value));
    }
  }
  if (!flags.Has("method")) args.push_back("--method=snapkv");
  if (!flags.Has("keep") && !flags.Has("keep-tokens")) args.push_back("--keep=0.1");
  absl::StatusOr<ParsedFlags> method_flags = ParseFlags(args, MethodFlagSpecs(), "method");
  if (!method_flags.ok()) return method_flags.status();
  absl::StatusOr<v1::MethodSpec> method = MethodSpecFromFlags(*method_flags);
  if (!method.ok()) return method.status();
  if (method->scorer().has_snapkv() && window > 0) {
    method->mutable_scorer()->mutable_snapkv()->set_window_size(static_cast<uint32_t>(window));
  }
  return method;
}

int Main(int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      PrintUsage(stdout);
      return 0;
    }
    // --keep-ratio is --keep (kvc's name).
    if (absl::StartsWith(arg, "--keep-ratio")) arg = "--keep" + arg.substr(12);
    args.push_back(std::move(arg));
  }
  const std::vector<FlagSpec> known = Flags();
  absl::StatusOr<ParsedFlags> flags = ParseFlags(args, known, "kvc_prefill_example");
  if (!flags.ok()) return Usage(flags.status().message());
  const std::optional<std::string> target = flags->Get("target");
  if (!target) return Usage("--target is required");
  if (flags->Has("forward-channel") == flags->Has("forward-channel-file")) {
    return Usage("give exactly one of --forward-channel and --forward-channel-file");
  }
  const std::string transport_name = flags->Get("transport").value_or("nccl");
  v1::Transport transport;
  if (transport_name == "nccl") {
    transport = v1::TRANSPORT_NCCL;
  } else if (transport_name == "cuda_ipc") {
    transport = v1::TRANSPORT_CUDA_IPC;
  } else {
    return Usage(absl::StrCat("--transport=", transport_name, ": expected nccl or cuda_ipc"));
  }
  absl::StatusOr<std::optional<uint32_t>> device = flags->GetUint("device", 0, 1024);
  if (!device.ok()) return Usage(device.status().message());
  absl::StatusOr<std::optional<double>> deadline = flags->GetDouble("deadline", 1e-3, 1e7);
  if (!deadline.ok()) return Usage(deadline.status().message());
  absl::StatusOr<SyntheticCacheOptions> cache_options = CacheOptions(*flags);
  if (!cache_options.ok()) return Usage(cache_options.status().message());
  absl::StatusOr<v1::MethodSpec> method = Method(*flags, cache_options->num_window_queries);
  if (!method.ok()) return Usage(method.status().message());
  v1::OutputSpec output;
  output.set_format(flags->GetBool("padded") ? v1::OUTPUT_FORMAT_PADDED : v1::OUTPUT_FORMAT_RAGGED);
  output.set_return_merged_counts(flags->GetBool("merged-counts"));
  ClientOptions client_options;
  if (absl::Status status = ApplyConnectionFlags(*flags, client_options); !status.ok()) {
    return Usage(status.message());
  }
  client_options.default_deadline = absl::Seconds(deadline->value_or(300));

  std::string channel;
  if (std::optional<std::string> id = flags->Get("forward-channel")) {
    channel = *id;
  } else {
    absl::StatusOr<std::string> from_file =
        ReadChannelFile(*flags->Get("forward-channel-file"), absl::Seconds(60));
    if (!from_file.ok()) return Fail(from_file.status());
    channel = *from_file;
  }
  if (cudaError_t error = cudaSetDevice(static_cast<int>(device->value_or(0)));
      error != cudaSuccess) {
    return Fail(absl::FailedPreconditionError(
        absl::StrCat("cudaSetDevice(", device->value_or(0), "): ", cudaGetErrorString(error))));
  }

  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<SyntheticWorkload>> workload =
      MakeSyntheticWorkload(*cache_options, *method, output);
  if (!workload.ok()) return Usage(workload.status().message());
  const absl::Duration generate_time = absl::Now() - start;
  const LoadWorkload& load = (*workload)->workload;
  uint64_t input_bytes = 0;
  for (const LayerTensors& layer : load.layers) {
    input_bytes += layer.keys.size() + layer.values.size() + layer.queries.size();
  }
  std::printf(
      "cache    %d layers, %d KV heads, %d query heads, head_dim %d, T=%lld, W=%d, seed %llu: "
      "%.1f MiB (generated in %.2f s)\n",
      cache_options->num_layers, cache_options->num_kv_heads, cache_options->num_query_heads,
      cache_options->head_dim, static_cast<long long>(cache_options->num_tokens),
      cache_options->num_window_queries, static_cast<unsigned long long>(cache_options->seed),
      input_bytes / 1048576.0, absl::ToDoubleSeconds(generate_time));
  std::printf("method   %s %s\n", MethodName(*method).c_str(), MethodSpecToJson(*method).c_str());

  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(*target, client_options);
  if (!client.ok()) return Fail(client.status());
  DeviceCacheSenderOptions sender_options;
  sender_options.transport = transport;
  absl::StatusOr<std::unique_ptr<DeviceCacheSender>> sender =
      DeviceCacheSender::Create(**client, load.layers, sender_options);
  if (!sender.ok()) return Fail(sender.status());
  std::printf("device   %d: %.1f MiB copied in %.3f s; %s channel %s\n",
              static_cast<int>(device->value_or(0)), (*sender)->device_bytes() / 1048576.0,
              absl::ToDoubleSeconds((*sender)->upload_time()), transport_name.c_str(),
              (*sender)->channel_id().c_str());

  v1::CompressHeader header = load.header;
  (*sender)->Attach(header);
  header.set_forward_channel_id(channel);
  const absl::Time send_start = absl::Now();
  absl::StatusOr<std::unique_ptr<CompressSession>> session = (*client)->StartCompress(header);
  if (!session.ok()) return Fail(session.status());
  for (uint32_t l = 0; l < load.layers.size(); ++l) {
    if (absl::Status status = (*sender)->SendLayer(**session, l); !status.ok()) {
      (*session)->Cancel();
      return Fail(status);
    }
  }
  const absl::Duration announce_time = absl::Now() - send_start;
  if (absl::Status status = (*sender)->WaitForSends(); !status.ok()) {
    (*session)->Cancel();
    return Fail(status);
  }
  const absl::Duration sent_time = absl::Now() - send_start;
  absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
  const absl::Duration total_time = absl::Now() - send_start;
  if (!summary.ok()) return Fail(summary.status());

  const v1::StageTimings& t = summary->timings();
  std::printf("request  %s forwarded to channel %s\n", summary->request_id().c_str(),
              channel.c_str());
  std::printf(
      "summary  %u layers forwarded; tokens in %llu, kept %llu (%.2f%%); bytes in %.1f "
      "MiB, out %.1f MiB; backend %s\n",
      summary->forwarded_layers(), static_cast<unsigned long long>(summary->tokens_in()),
      static_cast<unsigned long long>(summary->tokens_kept()),
      summary->tokens_in() ? 100.0 * summary->tokens_kept() / summary->tokens_in() : 0.0,
      summary->bytes_in() / 1048576.0, summary->bytes_out() / 1048576.0,
      summary->backend().c_str());
  std::printf(
      "server   receive %.3f s, queue %.3f s, score %.3f s, select %.3f s, gather %.3f s, "
      "send %.3f s, total %.3f s\n",
      t.receive_seconds(), t.queue_seconds(), t.score_seconds(), t.select_seconds(),
      t.gather_seconds(), t.send_seconds(), t.total_seconds());
  const double seconds = absl::ToDoubleSeconds(sent_time);
  std::printf(
      "client   layers announced in %.3f s, sent in %.3f s (%.2f GB/s), summary after "
      "%.3f s\n",
      absl::ToDoubleSeconds(announce_time), seconds,
      seconds > 0 ? input_bytes / seconds / 1e9 : 0.0, absl::ToDoubleSeconds(total_time));
  return 0;
}

}  // namespace
}  // namespace kvcompress

int main(int argc, char** argv) { return kvcompress::Main(argc, argv); }
