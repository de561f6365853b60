// kvc: the kvcompress command-line tool.
//
//   kvc info     --server HOST:PORT
//   kvc compress (--server HOST:PORT | --local) --input IN --output OUT --method NAME
//                (--keep RATIO | --keep-tokens N) [method and output flags]
//   kvc synth    --output FILE [--layers --kv-heads --query-heads --head-dim --tokens
//                --window --dtype --seed]
//   kvc bench    --server HOST:PORT --method NAME (--keep RATIO | --keep-tokens N)
//                [--concurrency N] [--duration D | --requests N] [--warmup D] [shape flags]
//   kvc inspect  OUT.safetensors [--png FILE]
//
// `--server` streams the cache through the SDK layer by layer; `--local` runs the same
// engine in process (MethodSpecFromProto + CompressionPipeline on the CPU backend). Both
// write the same tensors. `bench` loads a kvcd with one synthetic request, sent over and
// over from N concurrent streams (client/load_generator.h); `inspect` summarises and draws
// the kept positions of a compressed file (client/kept_summary.h, client/kept_heatmap.h).
// `compress --server` sends inline by default; --transport=cuda_ipc|nccl copies the cache to
// the current GPU first and sends it through a channel (client/device_cache_sender.h; builds
// with CUDA only), and --forward-channel=ID sends the results to a decode worker instead of
// back (only the summary is printed).
// Exit codes: 0 success, 1 failure (the status code name and
// message are printed), 2 usage errors.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cache_file.h"
#include "client/client.h"
#include "client/connection_flags.h"
#include "client/kept_heatmap.h"
#include "client/kept_summary.h"
#include "client/load_generator.h"
#include "client/method_flags.h"
#include "client/png_writer.h"
#include "client/progress_bar.h"
#include "client/synthetic_cache.h"
#include "google/protobuf/util/json_util.h"
#include "kernels/backend.h"
#include "kernels/compression_pipeline.h"
#include "kernels/layer_result.h"
#include "service/spec_conversion.h"

#if KVC_HAVE_CLIENT_CUDA
#include "client/device_cache_sender.h"
#endif

namespace kvcompress {
namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

// A failure of a subcommand: usage errors exit 2, others 1.
struct CommandError {
  absl::Status status;
  bool usage = false;
};

int Report(const CommandError& error) {
  if (error.usage) {
    std::fprintf(stderr, "kvc: %s\n(run `kvc help` for usage)\n",
                 std::string(error.status.message()).c_str());
    return kExitUsage;
  }
  std::fprintf(stderr, "kvc: error: %s: %s\n",
               absl::StatusCodeToString(error.status.code()).c_str(),
               std::string(error.status.message()).c_str());
  return kExitFailure;
}

std::string Bytes(uint64_t bytes) {
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  if (bytes < (1u << 20)) return absl::StrFormat("%.1f KiB", bytes / 1024.0);
  if (bytes < (1u << 30)) return absl::StrFormat("%.1f MiB", bytes / 1048576.0);
  return absl::StrFormat("%.2f GiB", bytes / 1073741824.0);
}

std::string Mass(double mass) { return mass < 0 ? "-" : absl::StrFormat("%.4f", mass); }

const std::vector<FlagSpec>& InfoFlags() {
  static const std::vector<FlagSpec> flags = [] {
    std::vector<FlagSpec> all = {
        {"server", true, "HOST:PORT  the kvcd to ask"},
        {"deadline", true, "SECONDS  (default 30)"},
    };
    for (const FlagSpec& flag : ConnectionFlagSpecs()) all.push_back(flag);
    return all;
  }();
  return flags;
}

const std::vector<FlagSpec>& CompressFlags() {
  static const std::vector<FlagSpec> flags = [] {
    std::vector<FlagSpec> all = {
        {"server", true, "HOST:PORT  compress through kvcd"},
        {"local", false, "compress in this process (CPU reference engine)"},
        {"input", true, "FILE  input cache (.safetensors)"},
        {"output", true, "FILE  compressed cache to write (.safetensors)"},
        {"padded", false, "write [H_kv, max_kept, D] instead of ragged [sum kept, D]"},
        {"merged-counts", false, "also write per-row merged counts for drop reducers"},
        {"threads", true, "N  --local: engine threads (default: all cores)"},
        {"deadline", true, "SECONDS  --server: deadline of the whole call (default 300)"},
        {"transport", true,
         "inline|cuda_ipc|nccl  --server: how the cache reaches kvcd (default inline; "
         "cuda_ipc and nccl copy it to the current GPU first)"},
        {"forward-channel", true,
         "ID  --server: send the results to this decode worker's nccl channel instead of "
         "back (no --output; prints the summary)"},
    };
    for (const FlagSpec& flag : ConnectionFlagSpecs()) all.push_back(flag);
    for (const FlagSpec& flag : MethodFlagSpecs()) all.push_back(flag);
    return all;
  }();
  return flags;
}

const std::vector<FlagSpec>& SynthFlags() {
  static const std::vector<FlagSpec> flags = {
      {"output", true, "FILE  cache to write (.safetensors)"},
      {"layers", true, "N  (default 32)"},
      {"kv-heads", true, "N  (default 8)"},
      {"query-heads", true, "N  (default 32)"},
      {"head-dim", true, "N  (default 128)"},
      {"tokens", true, "T  (default 4096)"},
      {"window", true, "W  window queries stored per layer (default 64)"},
      {"dtype", true, "bf16|fp16|fp32  (default bf16)"},
      {"seed", true, "N  (default 0)"},
      {"threads", true, "N  generator threads (default: all cores)"},
  };
  return flags;
}

const std::vector<FlagSpec>& BenchFlags() {
  static const std::vector<FlagSpec> flags = [] {
    std::vector<FlagSpec> all = {
        {"server", true, "HOST:PORT  the kvcd to load"},
        {"concurrency", true, "N  streams in flight at once (default 1)"},
        {"duration", true, "DURATION  measured time, e.g. 30s, 2m (default 10s)"},
        {"requests", true, "N  measure N requests instead of a duration"},
        {"warmup", true, "DURATION  run before measuring, not counted (default 1s)"},
        {"deadline", true, "SECONDS  per request (default 60)"},
        {"json", false, "print the report as JSON"},
        {"padded", false, "ask for [H_kv, max_kept, D] results"},
        {"merged-counts", false, "ask for per-row merged counts"},
    };
    for (const FlagSpec& flag : ConnectionFlagSpecs()) all.push_back(flag);
    for (const FlagSpec& flag : SynthFlags()) {
      if (flag.name == "output") continue;
      all.push_back(flag);
    }
    for (const FlagSpec& flag : MethodFlagSpecs()) {
      if (flag.name == "window") continue;  // a shape flag here, from SynthFlags
      all.push_back(flag);
    }
    for (FlagSpec& flag : all) {
      if (flag.name == "window") {
        flag.help = "W  window queries per layer, also the snapkv window (default 64)";
      }
      if (flag.name == "seed") flag.help = "N  synthetic cache seed (default 0)";
    }
    return all;
  }();
  return flags;
}

const std::vector<FlagSpec>& InspectFlags() {
  static const std::vector<FlagSpec> flags = {
      {"input", true, "FILE  compressed cache (or give it as the first argument)"},
      {"png", true, "FILE  also write a heatmap of the kept positions"},
      {"width", true, "N  --png: token columns at most (default 1024)"},
      {"row-height", true, "PX  --png: pixels per head row (default: 2-24, ~800 px in all)"},
      {"sinks", true, "N  first positions counted as sinks (default 4)"},
      {"recent", true, "N  last positions counted as the recent window (default 64)"},
  };
  return flags;
}

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "kvc: the kvcompress command-line tool\n\n"
               "usage:\n"
               "  kvc info --server HOST:PORT\n"
               "  kvc compress (--server HOST:PORT | --local) --input IN.safetensors\n"
               "      --output OUT.safetensors --method NAME (--keep RATIO | --keep-tokens N)"
               " [flags]\n"
               "  kvc synth --output FILE [flags]\n"
               "  kvc bench --server HOST:PORT --method NAME (--keep RATIO | --keep-tokens N)\n"
               "      [--concurrency N] [--duration 10s | --requests N] [shape flags] [--json]\n"
               "  kvc inspect OUT.safetensors [--png FILE]\n"
               "  kvc help\n\n"
               "flags are --name=value or --name value.\n");
  auto section = [out](const char* title, const std::vector<FlagSpec>& flags) {
    std::fprintf(out, "\n%s:\n", title);
    for (const FlagSpec& flag : flags) {
      std::fprintf(out, "  --%-22s %s\n", flag.name.c_str(), flag.help.c_str());
    }
  };
  section("kvc info", InfoFlags());
  section("kvc compress", CompressFlags());
  section("kvc synth", SynthFlags());
  section("kvc bench", BenchFlags());
  section("kvc inspect", InspectFlags());
}

absl::StatusOr<absl::Duration> DeadlineFlag(const ParsedFlags& flags, absl::Duration fallback) {
  absl::StatusOr<std::optional<double>> seconds = flags.GetDouble("deadline", 1e-3, 1e7);
  if (!seconds.ok()) return seconds.status();
  return *seconds ? absl::Seconds(**seconds) : fallback;
}

// ---------------------------------------------------------------------------
// kvc info

std::optional<CommandError> RunInfo(const ParsedFlags& flags) {
  const std::optional<std::string> server = flags.Get("server");
  if (!server)
    return CommandError{absl::InvalidArgumentError("kvc info: --server is required"), true};
  absl::StatusOr<absl::Duration> deadline = DeadlineFlag(flags, absl::Seconds(30));
  if (!deadline.ok()) return CommandError{deadline.status(), true};
  ClientOptions client_options;
  if (absl::Status status = ApplyConnectionFlags(flags, client_options); !status.ok()) {
    return CommandError{status, true};
  }
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(*server, client_options);
  if (!client.ok()) return CommandError{client.status()};
  absl::StatusOr<v1::ServerInfo> info = (*client)->GetServerInfo(*deadline);
  if (!info.ok()) return CommandError{info.status()};

  std::vector<std::string> dtypes, layouts, transports;
  for (int dtype : info->dtypes()) dtypes.push_back(v1::DType_Name(dtype));
  for (int layout : info->layouts()) layouts.push_back(v1::Layout_Name(layout));
  for (int transport : info->transports()) transports.push_back(v1::Transport_Name(transport));
  std::printf("server          %s\n", server->c_str());
  std::printf("version         %s\n", info->version().c_str());
  std::printf("backend         %s\n", info->backend().c_str());
  if (info->backends_size() > 1) {
    // The first runs what it can; the others take the rest (e.g. the CPU reference).
    std::printf("backends        %s\n", absl::StrJoin(info->backends(), ", ").c_str());
  }
  std::printf("worker threads  %u\n", info->worker_threads());
  std::printf("dtypes          %s\n", absl::StrJoin(dtypes, ", ").c_str());
  std::printf("layouts         %s\n", absl::StrJoin(layouts, ", ").c_str());
  std::printf("transports      %s\n", absl::StrJoin(transports, ", ").c_str());
  for (const v1::DeviceInfo& device : info->devices()) {
    if (device.backend() == "cpu" || device.memory_budget_bytes() == 0) {
      std::printf("device          %s (%s)\n", device.name().c_str(),
                  Bytes(device.memory_bytes()).c_str());
      continue;
    }
    std::printf("device          %s: %s, compute %s, %s; budget %s, in use %s\n",
                device.backend().c_str(), device.name().c_str(),
                device.compute_capability().c_str(), Bytes(device.memory_bytes()).c_str(),
                Bytes(device.memory_budget_bytes()).c_str(),
                Bytes(device.memory_in_use_bytes()).c_str());
  }
  const v1::Limits& limits = info->limits();
  std::printf(
      "limits          request %s, %llu tokens/sequence, %u layers, %u sequences, "
      "%u concurrent streams, chunk %s\n",
      Bytes(limits.max_request_bytes()).c_str(),
      static_cast<unsigned long long>(limits.max_tokens()), limits.max_layers(),
      limits.max_sequences(), limits.max_concurrent_streams(),
      Bytes(limits.max_chunk_bytes()).c_str());
  std::printf("methods\n");
  std::printf("  %-13s %-15s %-12s %-10s %s\n", "stage", "name", "implemented", "runs on",
              "description");
  for (const v1::MethodInfo& method : info->methods()) {
    const std::string runs_on = absl::StrJoin(method.backends(), ",");
    std::printf("  %-13s %-15s %-12s %-10s %s\n", method.stage().c_str(), method.name().c_str(),
                method.implemented() ? "yes" : "no", runs_on.empty() ? "-" : runs_on.c_str(),
                method.description().c_str());
    for (const v1::MethodParameter& parameter : method.parameters()) {
      std::printf("      %s (%s, default %s): %s\n", parameter.name().c_str(),
                  parameter.type().c_str(),
                  parameter.default_value().empty() ? "-" : parameter.default_value().c_str(),
                  parameter.description().c_str());
    }
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// kvc synth

// The cache shape flags shared by `kvc synth` and `kvc bench` (--layers, --kv-heads,
// --query-heads, --head-dim, --tokens, --window, --threads, --seed, --dtype). Usage errors
// are INVALID_ARGUMENT naming the flag.
absl::StatusOr<SyntheticCacheOptions> SyntheticOptionsFromFlags(const ParsedFlags& flags) {
  SyntheticCacheOptions options;
  struct IntFlag {
    const char* name;
    int* target;
    uint32_t min;
    uint32_t max;
  };
  int threads = 0;
  int tokens = static_cast<int>(options.num_tokens);
  for (const IntFlag& flag :
       std::vector<IntFlag>{{"layers", &options.num_layers, 1, 1u << 16},
                            {"kv-heads", &options.num_kv_heads, 1, 1u << 16},
                            {"query-heads", &options.num_query_heads, 1, 1u << 16},
                            {"head-dim", &options.head_dim, 2, 1u << 16},
                            {"tokens", &tokens, 1, 1u << 30},
                            {"window", &options.num_window_queries, 0, 1u << 30},
                            {"threads", &threads, 1, 1024}}) {
    absl::StatusOr<std::optional<uint32_t>> value = flags.GetUint(flag.name, flag.min, flag.max);
    if (!value.ok()) return value.status();
    if (*value) *flag.target = static_cast<int>(**value);
  }
  options.num_tokens = tokens;
  options.num_threads = threads;
  if (std::optional<std::string> seed = flags.Get("seed")) {
    if (!absl::SimpleAtoi(*seed, &options.seed)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--seed=", *seed, ": expected a non-negative integer"));
    }
  }
  if (std::optional<std::string> dtype = flags.Get("dtype")) {
    if (*dtype == "bf16" || *dtype == "bfloat16") {
      options.dtype = DType::kBFloat16;
    } else if (*dtype == "fp16" || *dtype == "float16" || *dtype == "f16") {
      options.dtype = DType::kFloat16;
    } else if (*dtype == "fp32" || *dtype == "float32" || *dtype == "f32") {
      options.dtype = DType::kFloat32;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--dtype=", *dtype, ": expected bf16, fp16 or fp32"));
    }
  }
  // Keep the defaults' proportions for short caches.
  options.num_sinks = static_cast<int>(std::min<int64_t>(
      options.num_sinks, std::max<int64_t>(0, options.num_tokens - options.num_window_queries)));
  options.salient_tokens_per_head = static_cast<int>(std::min<int64_t>(
      options.salient_tokens_per_head,
      std::max<int64_t>(0, options.num_tokens - options.num_window_queries - options.num_sinks)));
  options.outlier_channel_pairs = std::min(options.outlier_channel_pairs, options.head_dim / 4);
  return options;
}

std::optional<CommandError> RunSynth(const ParsedFlags& flags) {
  const std::optional<std::string> output = flags.Get("output");
  if (!output) {
    return CommandError{absl::InvalidArgumentError("kvc synth: --output is required"), true};
  }
  absl::StatusOr<SyntheticCacheOptions> parsed = SyntheticOptionsFromFlags(flags);
  if (!parsed.ok()) return CommandError{parsed.status(), true};
  const SyntheticCacheOptions& options = *parsed;

  const absl::Time start = absl::Now();
  absl::StatusOr<SyntheticCache> cache = GenerateSyntheticCache(options);
  if (!cache.ok()) return CommandError{cache.status(), true};
  const absl::Time generated = absl::Now();
  const std::map<std::string, std::string> metadata = {
      {"generator", "kvc synth"},           {"model", "synthetic llama-like"},
      {"seed", absl::StrCat(options.seed)}, {"rope_base", absl::StrCat(options.rope_base)},
      {"rope_layout", "rotate_half"},
  };
  absl::Status status =
      WriteCacheInput(*output, cache->geometry, cache->shape, cache->layers, metadata);
  if (!status.ok()) return CommandError{status};
  uint64_t bytes = 0;
  for (const LayerInput& layer : cache->layers) {
    bytes += layer.keys.size() + layer.values.size() + layer.queries.size();
  }
  std::printf(
      "wrote %s: %d layers, %d KV heads, %d query heads, head_dim %d, %lld tokens, "
      "window %d, %s, seed %llu\n",
      output->c_str(), options.num_layers, options.num_kv_heads, options.num_query_heads,
      options.head_dim, static_cast<long long>(options.num_tokens), options.num_window_queries,
      std::string(DTypeName(options.dtype)).c_str(), static_cast<unsigned long long>(options.seed));
  std::printf("%s of tensors; generated in %.2f s, written in %.2f s\n", Bytes(bytes).c_str(),
              absl::ToDoubleSeconds(generated - start),
              absl::ToDoubleSeconds(absl::Now() - generated));
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// kvc compress

// What both modes produce: per layer, the views to write and the numbers to print.
struct CompressOutcome {
  std::vector<CompressedLayerView> views;  // by layer
  std::vector<uint64_t> bytes_out;         // by layer
  std::string backend;
  std::map<std::string, std::string> extra_metadata;
  std::vector<std::string> timing_lines;
};

struct CompressJob {
  const CacheFileView* input = nullptr;
  v1::MethodSpec method;
  v1::OutputSpec output;
  std::string server;
  ClientOptions connection;  // TLS and token (connection_flags.h)
  absl::Duration deadline = absl::Seconds(300);
  int threads = 0;
  v1::Transport transport = v1::TRANSPORT_INLINE;
  std::string forward_channel;  // empty: results come back
};

// --transport: INVALID_ARGUMENT (a usage error) for unknown values; UNIMPLEMENTED for a GPU
// transport this build cannot use.
absl::StatusOr<v1::Transport> TransportFlag(const ParsedFlags& flags) {
  const std::string name = flags.Get("transport").value_or("inline");
  v1::Transport transport;
  if (name == "inline") {
    return v1::TRANSPORT_INLINE;
  } else if (name == "cuda_ipc") {
    transport = v1::TRANSPORT_CUDA_IPC;
  } else if (name == "nccl") {
    transport = v1::TRANSPORT_NCCL;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--transport=", name, ": expected inline, cuda_ipc or nccl"));
  }
#if !KVC_HAVE_CLIENT_CUDA
  return absl::UnimplementedError(
      absl::StrCat("--transport=", name,
                   ": this kvc was built without CUDA (KVC_ENABLE_CUDA=OFF or no "
                   "toolkit found); only --transport=inline is available"));
#elif !KVC_HAVE_NCCL
  if (transport == v1::TRANSPORT_NCCL) {
    return absl::UnimplementedError(
        "--transport=nccl: this kvc was built without NCCL; use --transport=cuda_ipc or inline");
  }
#endif
  return transport;
}

// Server mode: streams through the SDK. `results` owns the bytes the outcome views.
absl::Status CompressThroughServer(const CompressJob& job,
                                   std::vector<std::optional<CompressedLayer>>& results,
                                   CompressOutcome& outcome) {
  const CacheFileView& input = *job.input;
  const CacheGeometry& geometry = input.geometry();
  const int num_layers = geometry.num_layers;
  ClientOptions client_options = job.connection;
  client_options.default_deadline = job.deadline;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(job.server, client_options);
  if (!client.ok()) return client.status();

  v1::CompressHeader header;
  v1::CacheGeometry* g = header.mutable_geometry();
  g->set_num_layers(num_layers);
  g->set_num_kv_heads(geometry.num_kv_heads);
  g->set_num_query_heads(geometry.num_query_heads);
  g->set_head_dim(geometry.head_dim);
  g->set_dtype(DTypeToProto(geometry.dtype));
  g->set_layout(LayoutToProto(geometry.layout));
  v1::SequenceShape* shape = header.add_sequences();
  shape->set_num_tokens(static_cast<uint32_t>(input.shape().num_tokens));
  shape->set_num_window_queries(input.shape().num_window_queries);
  shape->set_num_score_heads(input.shape().num_score_heads);
  *header.mutable_method() = job.method;
  *header.mutable_output() = job.output;
  header.set_transport(v1::TRANSPORT_INLINE);
  header.set_forward_channel_id(job.forward_channel);

  std::vector<LayerTensors> layers;
  for (int l = 0; l < num_layers; ++l) {
    layers.push_back(
        LayerTensors{input.keys(l), input.values(l), input.queries(l), input.scores(l)});
  }
#if KVC_HAVE_CLIENT_CUDA
  // The device copy and its channel outlive the session (declared first, destroyed last).
  std::unique_ptr<DeviceCacheSender> device;
  if (job.transport != v1::TRANSPORT_INLINE) {
    DeviceCacheSenderOptions device_options;
    device_options.transport = job.transport;
    absl::StatusOr<std::unique_ptr<DeviceCacheSender>> sender =
        DeviceCacheSender::Create(**client, layers, device_options);
    if (!sender.ok()) return sender.status();
    device = *std::move(sender);
    device->Attach(header);
    outcome.timing_lines.push_back(
        absl::StrFormat("device: %s copied to the GPU in %.3f s, channel %s (%s)",
                        Bytes(device->device_bytes()), absl::ToDoubleSeconds(device->upload_time()),
                        device->channel_id(), v1::Transport_Name(job.transport)));
  }
#endif

  results.assign(num_layers, std::nullopt);
  SessionOptions session_options;
  // Each layer arrives once (the SDK checks), so the slots never collide.
  session_options.on_layer = [&results](CompressedLayer layer) {
    const uint32_t index = layer.layer;
    results[index] = std::move(layer);
  };
  absl::StatusOr<std::unique_ptr<CompressSession>> session =
      (*client)->StartCompress(header, std::move(session_options));
  if (!session.ok()) return session.status();
  CompressSession& stream = **session;

  uint64_t total_in = 0;
  for (int l = 0; l < num_layers; ++l) total_in += input.LayerBytes(l);
  std::atomic<uint64_t> announced_bytes{0};  // GPU transports: bytes of the layers announced
  auto sent = [&] {
    return job.transport == v1::TRANSPORT_INLINE ? stream.bytes_sent() : announced_bytes.load();
  };
  absl::StatusOr<v1::CompressSummary> summary;
  {
    ProgressBar progress([&] { return total_in == 0 ? 1.0 : double(sent()) / double(total_in); },
                         [&] {
                           return absl::StrCat("sent ", Bytes(sent()), " of ", Bytes(total_in),
                                               ", ", stream.layers_received(), "/", num_layers,
                                               " layers back");
                         });
    for (int l = 0; l < num_layers; ++l) {
      absl::Status status;
#if KVC_HAVE_CLIENT_CUDA
      if (device != nullptr) {
        status = device->SendLayer(stream, static_cast<uint32_t>(l));
      } else {
        status = stream.SendLayer(0, l, layers[l]);
      }
#else
      status = stream.SendLayer(0, l, layers[l]);
#endif
      if (!status.ok()) {
        stream.Cancel();
        return status;
      }
      announced_bytes.fetch_add(input.LayerBytes(l));
    }
#if KVC_HAVE_CLIENT_CUDA
    if (device != nullptr) {
      if (absl::Status status = device->WaitForSends(); !status.ok()) {
        stream.Cancel();
        return status;
      }
    }
#endif
    summary = stream.Finish();
  }
  if (!summary.ok()) return summary.status();
  const v1::StageTimings& t = summary->timings();
  if (!job.forward_channel.empty()) {
    outcome.backend = summary->backend();
    outcome.timing_lines.push_back(absl::StrFormat(
        "server %s (request %s): receive %.3f s, queue %.3f s, score %.3f s, select %.3f s, "
        "gather %.3f s, send %.3f s, total %.3f s",
        summary->backend(), summary->request_id(), t.receive_seconds(), t.queue_seconds(),
        t.score_seconds(), t.select_seconds(), t.gather_seconds(), t.send_seconds(),
        t.total_seconds()));
    outcome.timing_lines.push_back(absl::StrFormat(
        "summary: %u layers forwarded to channel %s; tokens in %u, kept %u (%.2f%%), bytes in "
        "%s, bytes out %s",
        summary->forwarded_layers(), job.forward_channel, summary->tokens_in(),
        summary->tokens_kept(),
        summary->tokens_in() ? 100.0 * summary->tokens_kept() / summary->tokens_in() : 0.0,
        Bytes(summary->bytes_in()), Bytes(summary->bytes_out())));
    return absl::OkStatus();
  }

  outcome.backend = summary->backend();
  outcome.extra_metadata["request_id"] = summary->request_id();
  for (int l = 0; l < num_layers; ++l) {
    const CompressedLayer& layer = *results[l];  // Finish succeeded: every layer arrived
    CompressedLayerView view;
    view.layer = l;
    view.padded = layer.format == v1::OUTPUT_FORMAT_PADDED;
    view.max_kept = static_cast<int>(layer.max_kept);
    view.kept = layer.kept;
    view.keys = layer.keys;
    view.values = layer.values;
    view.positions = layer.positions;
    view.merged = layer.merged;
    view.attention_mass_kept = layer.attention_mass_kept;
    outcome.views.push_back(view);
    outcome.bytes_out.push_back(layer.tensor_bytes());
  }
  outcome.timing_lines.push_back(absl::StrFormat(
      "server %s (request %s): receive %.3f s, queue %.3f s, score %.3f s, select %.3f s, "
      "gather %.3f s, send %.3f s, total %.3f s%s",
      summary->backend(), summary->request_id(), t.receive_seconds(), t.queue_seconds(),
      t.score_seconds(), t.select_seconds(), t.gather_seconds(), t.send_seconds(),
      t.total_seconds(),
      t.deferred_layers() ? absl::StrCat(", ", t.deferred_layers(), " deferred layers") : ""));
  outcome.timing_lines.push_back(absl::StrFormat(
      "summary: tokens in %u, kept %u, bytes in %s, bytes out %s", summary->tokens_in(),
      summary->tokens_kept(), Bytes(summary->bytes_in()), Bytes(summary->bytes_out())));
  return absl::OkStatus();
}

// Merged counts for a drop reducer when they were asked for: every kept row stands for one
// token, padding for none (what kvcd sends).
void FillMergedCounts(LayerResult& result, PaddedLayerResult* padded) {
  if (padded != nullptr) {
    if (!padded->merged.empty()) return;
    padded->merged.assign(padded->kept.size() * padded->max_kept, 0);
    for (size_t h = 0; h < padded->kept.size(); ++h) {
      std::fill_n(padded->merged.begin() + h * padded->max_kept, padded->kept[h], 1);
    }
    return;
  }
  if (result.merged.empty()) result.merged.assign(result.positions.size(), 1);
}

// Local mode: the same engine in process. `ragged` and `padded` own the bytes.
absl::Status CompressLocally(const CompressJob& job, std::vector<LayerResult>& ragged,
                             std::vector<PaddedLayerResult>& padded, CompressOutcome& outcome) {
  const CacheFileView& input = *job.input;
  const CacheGeometry& geometry = input.geometry();
  const int num_layers = geometry.num_layers;
  absl::StatusOr<MethodSpec> spec = MethodSpecFromProto(job.method);
  if (!spec.ok()) return spec.status();
  std::unique_ptr<Backend> backend = MakeCpuBackend(job.threads);
  absl::StatusOr<std::unique_ptr<CompressionPipeline>> pipeline =
      CompressionPipeline::Create(backend.get(), geometry, *spec, {input.shape()});
  if (!pipeline.ok()) return pipeline.status();

  const absl::Time start = absl::Now();
  ragged.clear();
  ragged.resize(num_layers);
  std::vector<bool> have(num_layers, false);
  std::atomic<int> layers_done{0};
  {
    ProgressBar progress(
        [&] { return double(layers_done.load()) / num_layers; },
        [&] { return absl::StrCat("layer ", layers_done.load(), "/", num_layers); });
    for (int l = 0; l < num_layers; ++l) {
      absl::StatusOr<std::vector<LayerResult>> done = (*pipeline)->AddLayer(input.CopyLayer(l));
      if (!done.ok()) return done.status();
      for (LayerResult& result : *done) {
        if (result.layer < 0 || result.layer >= num_layers || have[result.layer]) {
          return absl::InternalError(
              absl::StrCat("engine returned layer ", result.layer, " twice or out of range"));
        }
        have[result.layer] = true;
        ragged[result.layer] = std::move(result);
      }
      layers_done.store(l + 1);
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  for (int l = 0; l < num_layers; ++l) {
    if (!have[l]) {
      return absl::InternalError(absl::StrCat("engine never finalised layer ", l));
    }
  }

  const bool use_padded = job.output.format() == v1::OUTPUT_FORMAT_PADDED;
  const bool merged_counts = job.output.return_merged_counts();
  StageSeconds stages;
  padded.clear();
  if (use_padded) padded.resize(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    LayerResult& result = ragged[l];
    stages.score += result.seconds.score;
    stages.select += result.seconds.select;
    stages.gather += result.seconds.gather;
    if (use_padded) {
      padded[l] = ToPadded(result, geometry);
      if (merged_counts) FillMergedCounts(result, &padded[l]);
      outcome.views.push_back(ViewOf(padded[l], l, result.attention_mass_kept));
    } else {
      if (merged_counts) FillMergedCounts(result, nullptr);
      outcome.views.push_back(ViewOf(result));
    }
    const CompressedLayerView& view = outcome.views.back();
    outcome.bytes_out.push_back(view.keys.size() + view.values.size() +
                                (view.positions.size() + view.merged.size()) * sizeof(int32_t));
  }
  outcome.backend = std::string(backend->name());
  outcome.timing_lines.push_back(absl::StrFormat(
      "local %s: score %.3f s, select %.3f s, gather %.3f s (summed over layers), wall %.3f s",
      outcome.backend, stages.score, stages.select, stages.gather, seconds));
  return absl::OkStatus();
}

std::optional<CommandError> RunCompress(const ParsedFlags& flags) {
  auto usage = [](std::string message) {
    return CommandError{absl::InvalidArgumentError(std::move(message)), true};
  };
  const bool local = flags.GetBool("local");
  const std::optional<std::string> server = flags.Get("server");
  if (local == server.has_value())
    return usage("kvc compress: give exactly one of --server HOST:PORT and --local");
  const std::optional<std::string> input_path = flags.Get("input");
  const std::optional<std::string> output_path = flags.Get("output");
  const std::optional<std::string> forward_channel = flags.Get("forward-channel");
  if (forward_channel) {
    if (local) return usage("--forward-channel applies to --server only");
    if (forward_channel->empty()) return usage("--forward-channel: empty channel id");
    if (output_path) {
      return usage(
          "kvc compress: --output is not written with --forward-channel (the results go to the "
          "decode worker)");
    }
    if (!input_path) return usage("kvc compress: --input is required");
  } else if (!input_path || !output_path) {
    return usage("kvc compress: --input and --output are required");
  }
  if (local && flags.Has("transport")) return usage("--transport applies to --server only");
  absl::StatusOr<v1::Transport> transport = TransportFlag(flags);
  if (!transport.ok()) {
    return CommandError{transport.status(), absl::IsInvalidArgument(transport.status())};
  }
  if (local && flags.Has("deadline")) return usage("--deadline applies to --server only");
  if (!local && flags.Has("threads")) return usage("--threads applies to --local only");

  CompressJob job;
  absl::StatusOr<v1::MethodSpec> method = MethodSpecFromFlags(flags);
  if (!method.ok()) return CommandError{method.status(), true};
  job.method = *method;
  job.output.set_format(flags.GetBool("padded") ? v1::OUTPUT_FORMAT_PADDED
                                                : v1::OUTPUT_FORMAT_RAGGED);
  job.output.set_return_merged_counts(flags.GetBool("merged-counts"));
  absl::StatusOr<absl::Duration> deadline = DeadlineFlag(flags, absl::Seconds(300));
  if (!deadline.ok()) return CommandError{deadline.status(), true};
  job.deadline = *deadline;
  absl::StatusOr<std::optional<uint32_t>> threads = flags.GetUint("threads", 1, 1024);
  if (!threads.ok()) return CommandError{threads.status(), true};
  job.threads = *threads ? static_cast<int>(**threads) : 0;
  if (server) job.server = *server;
  job.transport = *transport;
  if (forward_channel) job.forward_channel = *forward_channel;
  if (absl::Status status = ApplyConnectionFlags(flags, job.connection); !status.ok()) {
    return CommandError{status, true};
  }
  if (local && (job.connection.tls.on() || !job.connection.auth_token_file.empty())) {
    return usage("--tls* and --auth-token-file apply to --server only");
  }

  absl::StatusOr<std::unique_ptr<CacheFileView>> input = CacheFileView::Open(*input_path);
  if (!input.ok()) return CommandError{input.status()};
  job.input = input->get();
  const CacheGeometry& geometry = (*input)->geometry();
  const SequenceShape& shape = (*input)->shape();
  std::printf(
      "input   %s: %d layers, %d KV heads, %d query heads, head_dim %d, %s, T=%lld, "
      "W=%d%s\n",
      input_path->c_str(), geometry.num_layers, geometry.num_kv_heads, geometry.num_query_heads,
      geometry.head_dim, std::string(DTypeName(geometry.dtype)).c_str(),
      static_cast<long long>(shape.num_tokens), shape.num_window_queries,
      shape.num_score_heads ? absl::StrCat(", scores [", shape.num_score_heads, ", T]").c_str()
                            : "");
  std::printf("method  %s %s\n", MethodName(job.method).c_str(),
              MethodSpecToJson(job.method).c_str());
  std::printf(
      "via     %s\n",
      local ? "local engine"
            : absl::StrCat("server ", *server,
                           job.transport == v1::TRANSPORT_INLINE
                               ? ""
                               : absl::StrCat(", ", v1::Transport_Name(job.transport)),
                           job.forward_channel.empty()
                               ? ""
                               : absl::StrCat(", forwarding to channel ", job.forward_channel))
                  .c_str());
  std::fflush(stdout);

  CompressOutcome outcome;
  std::vector<std::optional<CompressedLayer>> server_results;
  std::vector<LayerResult> ragged;
  std::vector<PaddedLayerResult> padded;
  absl::Status status = local ? CompressLocally(job, ragged, padded, outcome)
                              : CompressThroughServer(job, server_results, outcome);
  if (!status.ok()) return CommandError{status};
  if (!job.forward_channel.empty()) {
    std::printf("\n");
    for (const std::string& line : outcome.timing_lines) std::printf("%s\n", line.c_str());
    return std::nullopt;
  }

  CompressedCacheInfo info;
  info.method = MethodName(job.method);
  info.parameters_json = MethodSpecToJson(job.method);
  info.extra = outcome.extra_metadata;
  info.extra["backend"] = outcome.backend;
  info.extra["mode"] = local ? "local" : "server";
  info.extra["source"] = *input_path;
  if (auto model = (*input)->metadata().find("model"); model != (*input)->metadata().end()) {
    info.extra["model"] = model->second;
  }
  status = WriteCompressedCache(*output_path, geometry, shape.num_tokens, outcome.views, info);
  if (!status.ok()) return CommandError{status};

  // The per-layer table.
  std::printf("\n%5s %12s %10s %8s %12s %12s %10s\n", "layer", "tokens_in", "kept", "kept%",
              "bytes_in", "bytes_out", "attn_mass");
  const uint64_t tokens_per_layer = static_cast<uint64_t>(shape.num_tokens) * geometry.num_kv_heads;
  uint64_t total_tokens = 0, total_kept = 0, total_in = 0, total_out = 0;
  double mass_sum = 0;
  int mass_count = 0;
  for (size_t l = 0; l < outcome.views.size(); ++l) {
    const CompressedLayerView& view = outcome.views[l];
    uint64_t kept = 0;
    for (int32_t count : view.kept) kept += static_cast<uint64_t>(count);
    const uint64_t bytes_in = (*input)->LayerBytes(static_cast<int>(l));
    std::printf("%5zu %12llu %10llu %7.2f%% %12s %12s %10s\n", l,
                static_cast<unsigned long long>(tokens_per_layer),
                static_cast<unsigned long long>(kept), 100.0 * kept / tokens_per_layer,
                Bytes(bytes_in).c_str(), Bytes(outcome.bytes_out[l]).c_str(),
                Mass(view.attention_mass_kept).c_str());
    total_tokens += tokens_per_layer;
    total_kept += kept;
    total_in += bytes_in;
    total_out += outcome.bytes_out[l];
    if (view.attention_mass_kept >= 0) {
      mass_sum += view.attention_mass_kept;
      ++mass_count;
    }
  }
  std::printf("%5s %12llu %10llu %7.2f%% %12s %12s %10s\n", "total",
              static_cast<unsigned long long>(total_tokens),
              static_cast<unsigned long long>(total_kept), 100.0 * total_kept / total_tokens,
              Bytes(total_in).c_str(), Bytes(total_out).c_str(),
              mass_count ? Mass(mass_sum / mass_count).c_str() : "-");
  std::printf("\n");
  for (const std::string& line : outcome.timing_lines) std::printf("%s\n", line.c_str());
  std::printf("wrote   %s (%s)\n", output_path->c_str(),
              flags.GetBool("padded") ? "padded" : "ragged");
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// kvc bench

// absl duration syntax ("10s", "1.5m", "250ms"), or a bare number of seconds.
absl::StatusOr<std::optional<absl::Duration>> DurationFlag(const ParsedFlags& flags,
                                                           absl::string_view name) {
  const std::optional<std::string> text = flags.Get(name);
  if (!text) return std::optional<absl::Duration>();
  absl::Duration duration;
  double seconds = 0;
  if (absl::SimpleAtod(*text, &seconds)) {
    duration = absl::Seconds(seconds);
  } else if (!absl::ParseDuration(*text, &duration)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, "=", *text, ": expected a duration such as 10s, 1.5m or 250ms"));
  }
  if (duration < absl::ZeroDuration() || duration == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, "=", *text, ": expected a finite duration >= 0"));
  }
  return std::optional<absl::Duration>(duration);
}

// The method of a bench run. `--window` there is the number of window queries sent (a
// shape flag, as in `kvc synth`); for snapkv-based methods it is also the observation
// window, so the two cannot disagree. The method flags are parsed without it.
absl::StatusOr<v1::MethodSpec> BenchMethodFromFlags(const ParsedFlags& flags, int window) {
  std::vector<std::string> method_args;
  for (const auto& [name, value] : flags.values()) {
    if (name == "window") continue;
    for (const FlagSpec& spec : MethodFlagSpecs()) {
      if (spec.name == name) method_args.push_back(absl::StrCat("--", name, "=", value));
    }
  }
  absl::StatusOr<ParsedFlags> method_flags = ParseFlags(method_args, MethodFlagSpecs(), "bench");
  if (!method_flags.ok()) return method_flags.status();
  absl::StatusOr<v1::MethodSpec> method = MethodSpecFromFlags(*method_flags);
  if (!method.ok()) return method.status();
  if (method->scorer().has_snapkv() && window > 0 && flags.Has("window")) {
    method->mutable_scorer()->mutable_snapkv()->set_window_size(static_cast<uint32_t>(window));
  }
  return method;
}

std::string Milliseconds(absl::Duration duration) {
  return absl::StrFormat("%.1f ms", absl::ToDoubleMilliseconds(duration));
}

void PrintLoadReport(const LoadReport& report, const LoadWorkload& workload) {
  std::printf("\nrequests    ok %lld, failed %lld", static_cast<long long>(report.requests_ok),
              static_cast<long long>(report.requests_failed));
  std::vector<std::string> by_code;
  for (const auto& [code, failure] : report.failures) {
    by_code.push_back(absl::StrCat(absl::StatusCodeToString(code), " ", failure.count));
  }
  if (!by_code.empty()) std::printf(" (%s)", absl::StrJoin(by_code, ", ").c_str());
  std::printf(" in %.2f s; not measured: warmup %lld ok, %lld failed",
              absl::ToDoubleSeconds(report.measured), static_cast<long long>(report.warmup_ok),
              static_cast<long long>(report.warmup_failed));
  if (report.after_window_ok + report.after_window_failed > 0) {
    std::printf(", after the window %lld ok, %lld failed",
                static_cast<long long>(report.after_window_ok),
                static_cast<long long>(report.after_window_failed));
  }
  std::printf("\n");
  std::printf("throughput  %.2f requests/s, %.0f input tokens/s, %.3f GB/s input\n",
              report.requests_per_second(), report.input_tokens_per_second(),
              report.input_bytes_per_second() / 1e9);
  const LatencySummary& latency = report.latency;
  if (latency.count > 0) {
    std::printf("latency     p50 %s, p90 %s, p99 %s, max %s (min %s, mean %s; %lld requests)\n",
                Milliseconds(latency.p50).c_str(), Milliseconds(latency.p90).c_str(),
                Milliseconds(latency.p99).c_str(), Milliseconds(latency.max).c_str(),
                Milliseconds(latency.min).c_str(), Milliseconds(latency.mean).c_str(),
                static_cast<long long>(latency.count));
  }
  if (report.requests_ok > 0) {
    const v1::CacheGeometry& g = workload.header.geometry();
    const double tokens_in = static_cast<double>(report.input_tokens_per_request) * g.num_layers() *
                             g.num_kv_heads() * report.requests_ok;
    std::printf("output      %.2f%% of tokens kept, %s per request\n",
                100.0 * static_cast<double>(report.tokens_kept) / tokens_in,
                Bytes(report.bytes_out / report.requests_ok).c_str());
  }
  for (const bool measured : {true, false}) {
    for (const auto& [code, failure] : measured ? report.failures : report.unmeasured_failures) {
      std::printf("failure     %s x%lld%s, first: %s\n", absl::StatusCodeToString(code).c_str(),
                  static_cast<long long>(failure.count), measured ? "" : " (not measured)",
                  failure.first_message.c_str());
    }
  }
}

std::optional<CommandError> RunBench(const ParsedFlags& flags) {
  auto usage = [](absl::Status status) { return CommandError{std::move(status), true}; };
  const std::optional<std::string> server = flags.Get("server");
  if (!server) return usage(absl::InvalidArgumentError("kvc bench: --server is required"));
  if (flags.Has("duration") && flags.Has("requests")) {
    return usage(absl::InvalidArgumentError("kvc bench: give --duration or --requests, not both"));
  }
  LoadOptions options;
  absl::StatusOr<std::optional<uint32_t>> concurrency = flags.GetUint("concurrency", 1, 4096);
  if (!concurrency.ok()) return usage(concurrency.status());
  options.concurrency = static_cast<int>(concurrency->value_or(1));
  absl::StatusOr<std::optional<uint32_t>> requests = flags.GetUint("requests", 1, UINT32_MAX);
  if (!requests.ok()) return usage(requests.status());
  options.requests = requests->value_or(0);
  absl::StatusOr<std::optional<absl::Duration>> duration = DurationFlag(flags, "duration");
  if (!duration.ok()) return usage(duration.status());
  options.duration = duration->value_or(absl::Seconds(10));
  if (options.requests == 0 && options.duration <= absl::ZeroDuration()) {
    return usage(absl::InvalidArgumentError("kvc bench: --duration must be > 0"));
  }
  absl::StatusOr<std::optional<absl::Duration>> warmup = DurationFlag(flags, "warmup");
  if (!warmup.ok()) return usage(warmup.status());
  options.warmup = warmup->value_or(absl::Seconds(1));
  absl::StatusOr<absl::Duration> deadline = DeadlineFlag(flags, absl::Seconds(60));
  if (!deadline.ok()) return usage(deadline.status());
  options.deadline = *deadline;

  absl::StatusOr<SyntheticCacheOptions> cache = SyntheticOptionsFromFlags(flags);
  if (!cache.ok()) return usage(cache.status());
  absl::StatusOr<v1::MethodSpec> method = BenchMethodFromFlags(flags, cache->num_window_queries);
  if (!method.ok()) return usage(method.status());
  v1::OutputSpec output;
  output.set_format(flags.GetBool("padded") ? v1::OUTPUT_FORMAT_PADDED : v1::OUTPUT_FORMAT_RAGGED);
  output.set_return_merged_counts(flags.GetBool("merged-counts"));
  const bool json = flags.GetBool("json");

  // Inputs are made once, before the clock starts, and sent by every request.
  absl::StatusOr<std::unique_ptr<SyntheticWorkload>> workload =
      MakeSyntheticWorkload(*cache, *method, output);
  if (!workload.ok()) return usage(workload.status());
  const LoadWorkload& load = (*workload)->workload;
  ClientOptions client_options;
  if (absl::Status status = ApplyConnectionFlags(flags, client_options); !status.ok()) {
    return usage(status);
  }
  client_options.default_deadline = options.deadline;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(*server, client_options);
  if (!client.ok()) return CommandError{client.status()};

  if (!json) {
    uint64_t bytes = 0;
    for (const LayerTensors& layer : load.layers) {
      bytes += layer.keys.size() + layer.values.size() + layer.queries.size();
    }
    std::printf("bench   %s: %d streams, %s after %s warmup, deadline %s\n", server->c_str(),
                options.concurrency,
                options.requests > 0 ? absl::StrCat(options.requests, " requests").c_str()
                                     : absl::FormatDuration(options.duration).c_str(),
                absl::FormatDuration(options.warmup).c_str(),
                absl::FormatDuration(options.deadline).c_str());
    std::printf(
        "input   %d layers, %d KV heads, %d query heads, head_dim %d, %s, T=%lld, W=%d: %s per "
        "request (seed %llu)\n",
        cache->num_layers, cache->num_kv_heads, cache->num_query_heads, cache->head_dim,
        std::string(DTypeName(cache->dtype)).c_str(), static_cast<long long>(cache->num_tokens),
        cache->num_window_queries, Bytes(bytes).c_str(),
        static_cast<unsigned long long>(cache->seed));
    std::printf("method  %s %s\n", MethodName(*method).c_str(), MethodSpecToJson(*method).c_str());
    std::fflush(stdout);
  }

  absl::StatusOr<LoadReport> report = RunLoad(**client, load, options);
  if (!report.ok()) return usage(report.status());
  if (json) {
    std::printf("%s\n", LoadReportToJson(*report, load, options, *server).c_str());
  } else {
    PrintLoadReport(*report, load);
  }
  // A run with failures still prints its report, then fails the command: scripts and CI
  // see the failure in the exit code, with the most frequent status code.
  const int64_t failed =
      report->requests_failed + report->warmup_failed + report->after_window_failed;
  if (failed > 0) {
    absl::StatusCode code = absl::StatusCode::kUnknown;
    int64_t most = 0;
    for (const bool measured : {true, false}) {
      for (const auto& [failure_code, failure] :
           measured ? report->failures : report->unmeasured_failures) {
        if (failure.count > most) {
          code = failure_code;
          most = failure.count;
        }
      }
    }
    const int64_t total =
        failed + report->requests_ok + report->warmup_ok + report->after_window_ok;
    return CommandError{absl::Status(
        code, absl::StrCat(failed, " of ", total, " requests failed (unmeasured ones included)"))};
  }
  if (report->requests_ok == 0) {
    return CommandError{absl::FailedPreconditionError(
        "no request finished in the measured window: requests take longer than --duration; "
        "give a longer --duration, or use --requests")};
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// kvc inspect

// "snapkv keep 0.1": the method and budget recorded in a compressed file's metadata.
std::string DescribeMethod(const std::map<std::string, std::string>& metadata) {
  auto find = [&](const char* key) {
    auto it = metadata.find(key);
    return it == metadata.end() ? std::string() : it->second;
  };
  std::string text = find("method");
  v1::MethodSpec spec;
  if (google::protobuf::util::JsonStringToMessage(find("parameters"), &spec).ok()) {
    if (spec.has_keep_ratio()) absl::StrAppend(&text, " keep ", spec.keep_ratio());
    if (spec.has_keep_tokens()) absl::StrAppend(&text, " keep ", spec.keep_tokens(), " tokens");
  }
  return text.empty() ? "unknown method" : text;
}

std::optional<CommandError> RunInspect(const ParsedFlags& flags) {
  auto usage = [](absl::Status status) { return CommandError{std::move(status), true}; };
  const std::optional<std::string> path = flags.Get("input");
  if (!path) {
    return usage(absl::InvalidArgumentError("kvc inspect: give the compressed file to read"));
  }
  absl::StatusOr<std::optional<uint32_t>> sinks = flags.GetUint("sinks", 0, 1u << 30);
  if (!sinks.ok()) return usage(sinks.status());
  absl::StatusOr<std::optional<uint32_t>> recent = flags.GetUint("recent", 0, 1u << 30);
  if (!recent.ok()) return usage(recent.status());
  KeptHeatmapOptions heatmap_options;
  absl::StatusOr<std::optional<uint32_t>> width = flags.GetUint("width", 1, 1u << 16);
  if (!width.ok()) return usage(width.status());
  heatmap_options.max_columns = static_cast<int>(width->value_or(1024));
  absl::StatusOr<std::optional<uint32_t>> row_height = flags.GetUint("row-height", 1, 256);
  if (!row_height.ok()) return usage(row_height.status());
  heatmap_options.row_pixels = static_cast<int>(row_height->value_or(0));
  const std::optional<std::string> png = flags.Get("png");
  if (!png && (flags.Has("width") || flags.Has("row-height"))) {
    return usage(absl::InvalidArgumentError("--width and --row-height apply to --png only"));
  }

  absl::StatusOr<CompressedCacheFile> file = ReadCompressedCache(*path);
  if (!file.ok()) return CommandError{file.status()};
  const CacheGeometry& g = file->geometry;
  const std::string method = DescribeMethod(file->metadata);
  absl::StatusOr<std::vector<LayerKeptSummary>> summaries =
      SummarizeKept(file->layers, file->num_tokens, sinks->value_or(4), recent->value_or(64));
  if (!summaries.ok()) return CommandError{summaries.status()};

  std::printf("file    %s (%s)\n", path->c_str(), file->padded ? "padded" : "ragged");
  std::printf("cache   %d layers, %d KV heads, %d query heads, head_dim %d, %s, T=%lld\n",
              g.num_layers, g.num_kv_heads, g.num_query_heads, g.head_dim,
              std::string(DTypeName(g.dtype)).c_str(), static_cast<long long>(file->num_tokens));
  std::printf("method  %s\n", method.c_str());
  const bool merged = std::any_of(file->layers.begin(), file->layers.end(),
                                  [](const LayerResult& l) { return !l.merged.empty(); });
  const int64_t sink_count = std::min<int64_t>(sinks->value_or(4), file->num_tokens);
  const int64_t recent_count = std::min<int64_t>(recent->value_or(64), file->num_tokens);
  std::printf("\n%5s %8s %9s %8s %8s %9s %11s %9s%s %10s\n", "layer", "min/head", "mean/head",
              "max/head", "kept%", absl::StrCat("sinks[", sink_count, "]").c_str(),
              absl::StrCat("recent[", recent_count, "]").c_str(), "any-head",
              merged ? absl::StrFormat(" %8s", "merged").c_str() : "", "attn_mass");
  int64_t total = 0, min_kept = INT64_MAX, max_kept = 0;
  double sinks_sum = 0, recent_sum = 0, any_sum = 0, mass_sum = 0;
  int mass_count = 0;
  const double per_layer = static_cast<double>(file->num_tokens) * g.num_kv_heads;
  for (const LayerKeptSummary& s : *summaries) {
    std::printf(
        "%5d %8lld %9.1f %8lld %7.2f%% %8.1f%% %10.1f%% %8.1f%%%s %10s\n", s.layer,
        static_cast<long long>(s.min_kept), s.mean_kept, static_cast<long long>(s.max_kept),
        100.0 * s.total_kept / per_layer, 100.0 * s.sinks_kept, 100.0 * s.recent_kept,
        100.0 * s.any_head_kept,
        merged ? absl::StrFormat(" %8lld", static_cast<long long>(s.merged_rows)).c_str() : "",
        Mass(s.attention_mass_kept).c_str());
    total += s.total_kept;
    min_kept = std::min(min_kept, s.min_kept);
    max_kept = std::max(max_kept, s.max_kept);
    sinks_sum += s.sinks_kept;
    recent_sum += s.recent_kept;
    any_sum += s.any_head_kept;
    if (s.attention_mass_kept >= 0) {
      mass_sum += s.attention_mass_kept;
      ++mass_count;
    }
  }
  const double layers = static_cast<double>(summaries->size());
  std::printf("%5s %8lld %9.1f %8lld %7.2f%% %8.1f%% %10.1f%% %8.1f%%%s %10s\n", "all",
              static_cast<long long>(min_kept), total / (layers * g.num_kv_heads),
              static_cast<long long>(max_kept), 100.0 * total / (per_layer * layers),
              100.0 * sinks_sum / layers, 100.0 * recent_sum / layers, 100.0 * any_sum / layers,
              merged ? absl::StrFormat(" %8s", "").c_str() : "",
              mass_count ? Mass(mass_sum / mass_count).c_str() : "-");

  if (png) {
    heatmap_options.title = absl::StrCat(method, "  T=", file->num_tokens, "  ", g.num_layers,
                                         " LAYERS X ", g.num_kv_heads, " KV HEADS");
    absl::StatusOr<KeptHeatmap> heatmap =
        RenderKeptHeatmap(file->layers, file->num_tokens, heatmap_options);
    if (!heatmap.ok()) return CommandError{heatmap.status()};
    absl::Status status = WritePng(
        *png, heatmap->image,
        {{"Title", heatmap_options.title}, {"Source", *path}, {"Software", "kvc inspect"}});
    if (!status.ok()) return CommandError{status};
    const int64_t per_column =
        (file->num_tokens + heatmap->fractions.num_columns - 1) / heatmap->fractions.num_columns;
    std::printf(
        "\nwrote   %s (%dx%d: %d columns of %s%lld token%s, %d px per head row)\n", png->c_str(),
        heatmap->image.width(), heatmap->image.height(), heatmap->fractions.num_columns,
        file->num_tokens % heatmap->fractions.num_columns ? "up to " : "",
        static_cast<long long>(per_column), per_column == 1 ? "" : "s", heatmap->row_pixels);
  }
  return std::nullopt;
}

// `kvc inspect FILE`: the one positional argument becomes --input, so the rest parses as
// flags. Returns the arguments unchanged when there is none; more than one is left for
// ParseFlags to reject.
std::vector<std::string> PositionalToInputFlag(std::vector<std::string> args,
                                               const std::vector<FlagSpec>& known) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) == 0) {
      const std::string name = arg.substr(2, arg.find('=') - 2);
      const bool takes_value = std::any_of(known.begin(), known.end(), [&](const FlagSpec& f) {
        return f.name == name && f.takes_value;
      });
      if (takes_value && arg.find('=') == std::string::npos) ++i;  // skip its value
      continue;
    }
    args[i] = "--input=" + arg;
    break;
  }
  return args;
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    PrintUsage(stderr);
    return kExitUsage;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  if (command == "help" || command == "--help" || command == "-h") {
    PrintUsage(stdout);
    return 0;
  }
  const std::vector<FlagSpec>* known = nullptr;
  std::optional<CommandError> (*run)(const ParsedFlags&) = nullptr;
  if (command == "info") {
    known = &InfoFlags();
    run = RunInfo;
  } else if (command == "compress") {
    known = &CompressFlags();
    run = RunCompress;
  } else if (command == "synth") {
    known = &SynthFlags();
    run = RunSynth;
  } else if (command == "bench") {
    known = &BenchFlags();
    run = RunBench;
  } else if (command == "inspect") {
    known = &InspectFlags();
    run = RunInspect;
    args = PositionalToInputFlag(std::move(args), *known);
  } else {
    return Report({absl::InvalidArgumentError(
                       absl::StrCat("unknown command \"", command,
                                    "\"; expected info, compress, synth, bench or inspect")),
                   true});
  }
  for (const std::string& arg : args) {
    if (arg == "--help" || arg == "-h") {
      PrintUsage(stdout);
      return 0;
    }
  }
  absl::StatusOr<ParsedFlags> flags = ParseFlags(args, *known, command);
  if (!flags.ok()) return Report({flags.status(), true});
  std::optional<CommandError> error = run(*flags);
  std::fflush(stdout);
  return error ? Report(*error) : 0;
}

}  // namespace
}  // namespace kvcompress

int main(int argc, char** argv) { return kvcompress::Main(argc, argv); }
