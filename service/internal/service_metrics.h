// The metric families kvcd exports, registered once per server. Names follow Prometheus
// conventions (DESIGN §7). Thread-safe: families are.
#ifndef KVCOMPRESS_SERVICE_INTERNAL_SERVICE_METRICS_H_
#define KVCOMPRESS_SERVICE_INTERNAL_SERVICE_METRICS_H_

#include <string_view>

#include "service/metrics_registry.h"

namespace kvcompress {

// Why a Compress stream failed: the `reason` label of kvcompress_errors_total. Finer than the
// gRPC code (INVALID_ARGUMENT is a bad header or a malformed stream; RESOURCE_EXHAUSTED a
// request limit, the stream limit or a memory budget).
enum class ErrorReason {
  kStreamLimit,         // refused: --max_concurrent_streams streams already open
  kShuttingDown,        // refused or cut off: the server is draining
  kInvalidHeader,       // the header's geometry, sequences, method or output is invalid
  kRequestLimit,        // the header exceeds --max_tokens, --max_layers, ... (per request)
  kUnimplemented,       // a method or transport this build does not run
  kMalformedStream,     // chunks out of order, of unknown tensors, missing at half-close, ...
  kMemoryBudget,        // --max_buffered_bytes would be exceeded
  kDeviceMemoryBudget,  // the backend's device-memory budget would be exceeded
  kBackend,             // the backend failed on a layer
  kCancelled,           // the client cancelled
  kDeadlineExceeded,    // the stream's deadline passed
  kClientGone,          // the client stopped receiving results
  kInternal,            // a server bug (e.g. a layer result missing)
};

constexpr std::string_view ErrorReasonName(ErrorReason reason) {
  switch (reason) {
    case ErrorReason::kStreamLimit:
      return "stream_limit";
    case ErrorReason::kShuttingDown:
      return "shutting_down";
    case ErrorReason::kInvalidHeader:
      return "invalid_header";
    case ErrorReason::kRequestLimit:
      return "request_limit";
    case ErrorReason::kUnimplemented:
      return "unimplemented";
    case ErrorReason::kMalformedStream:
      return "malformed_stream";
    case ErrorReason::kMemoryBudget:
      return "memory_budget";
    case ErrorReason::kDeviceMemoryBudget:
      return "device_memory_budget";
    case ErrorReason::kBackend:
      return "backend";
    case ErrorReason::kCancelled:
      return "cancelled";
    case ErrorReason::kDeadlineExceeded:
      return "deadline_exceeded";
    case ErrorReason::kClientGone:
      return "client_gone";
    case ErrorReason::kInternal:
      return "internal";
  }
  return "internal";
}

struct ServiceMetrics {
  explicit ServiceMetrics(MetricsRegistry& registry)
      : requests(registry.AddCounter("kvcompress_requests_total",
                                     "Compress streams finished, by scorer and gRPC status code.",
                                     {"method", "code"})),
        errors(registry.AddCounter("kvcompress_errors_total",
                                   "Compress streams that failed, by reason (finer than the "
                                   "gRPC code of kvcompress_requests_total).",
                                   {"reason"})),
        tokens_in(registry.AddCounter(
            "kvcompress_tokens_in_total",
            "Cached tokens received, summed over sequences, layers and KV heads.")),
        tokens_kept(
            registry.AddCounter("kvcompress_tokens_kept_total",
                                "Cached tokens kept, summed over sequences, layers and KV heads.")),
        bytes_received(registry.AddCounter("kvcompress_bytes_received_total",
                                           "Tensor bytes received, by transport.", {"transport"})),
        bytes_sent(registry.AddCounter("kvcompress_bytes_sent_total",
                                       "Tensor bytes sent, by transport.", {"transport"})),
        request_duration(registry.AddHistogram(
            "kvcompress_request_duration_seconds",
            "Compress stream duration from header to final status, by scorer.",
            HistogramFamily::LatencyBuckets(), {"method"})),
        layer_stage_duration(registry.AddHistogram(
            "kvcompress_layer_stage_duration_seconds",
            "Per-layer time by stage: queue (waiting for a worker), score, select, gather.",
            HistogramFamily::LatencyBuckets(), {"stage"})),
        request_stage_duration(registry.AddHistogram(
            "kvcompress_request_stage_duration_seconds",
            "Per successful request, seconds by stage as in its CompressSummary: receive (header "
            "to last chunk), and queue, score, select, gather, send summed over its layers.",
            HistogramFamily::LatencyBuckets(), {"stage"})),
        compression_ratio(
            registry.AddHistogram("kvcompress_compression_ratio",
                                  "Tokens kept over tokens received, per successful request.",
                                  HistogramFamily::FractionBuckets())),
        attention_mass_kept(registry.AddHistogram(
            "kvcompress_attention_mass_kept_ratio",
            "Fraction of the observation window's attention on kept tokens, per layer sent "
            "with window queries.",
            HistogramFamily::FractionBuckets())),
        requests_in_flight(
            registry.AddGauge("kvcompress_requests_in_flight", "Compress streams open now.")),
        backend_requests(registry.AddCounter(
            "kvcompress_backend_requests_total",
            "Compress streams by the backend that ran them; route=fallback when the preferred "
            "backend does not run the method (e.g. a GPU-less stage running on the CPU).",
            {"backend", "route"})) {}

  CounterFamily& requests;
  CounterFamily& errors;
  CounterFamily& tokens_in;
  CounterFamily& tokens_kept;
  CounterFamily& bytes_received;
  CounterFamily& bytes_sent;
  HistogramFamily& request_duration;
  HistogramFamily& layer_stage_duration;
  HistogramFamily& request_stage_duration;
  HistogramFamily& compression_ratio;
  HistogramFamily& attention_mass_kept;
  GaugeFamily& requests_in_flight;
  CounterFamily& backend_requests;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_INTERNAL_SERVICE_METRICS_H_
