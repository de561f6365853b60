// The metric families kvcd exports, registered once per server. Names follow Prometheus
// conventions (DESIGN §7). Thread-safe: families are.
#ifndef KVCOMPRESS_SERVICE_INTERNAL_SERVICE_METRICS_H_
#define KVCOMPRESS_SERVICE_INTERNAL_SERVICE_METRICS_H_

#include "service/metrics_registry.h"

namespace kvcompress {

struct ServiceMetrics {
  explicit ServiceMetrics(MetricsRegistry& registry)
      : requests(registry.AddCounter("kvcompress_requests_total",
                                     "Compress streams finished, by scorer and gRPC status code.",
                                     {"method", "code"})),
        tokens_in(registry.AddCounter(
            "kvcompress_tokens_in_total",
            "Cached tokens received, summed over sequences, layers and KV heads.")),
        tokens_kept(
            registry.AddCounter("kvcompress_tokens_kept_total",
                                "Cached tokens kept, summed over sequences, layers and KV heads.")),
        bytes_received(registry.AddCounter("kvcompress_bytes_received_total",
                                           "Tensor bytes received in request chunks.")),
        bytes_sent(registry.AddCounter("kvcompress_bytes_sent_total",
                                       "Tensor bytes sent in result chunks.")),
        request_duration(registry.AddHistogram(
            "kvcompress_request_duration_seconds",
            "Compress stream duration from header to final status, by scorer.",
            HistogramFamily::LatencyBuckets(), {"method"})),
        layer_stage_duration(registry.AddHistogram(
            "kvcompress_layer_stage_duration_seconds",
            "Per-layer time by stage: queue (waiting for a worker), score, select, gather.",
            HistogramFamily::LatencyBuckets(), {"stage"})),
        compression_ratio(
            registry.AddHistogram("kvcompress_compression_ratio",
                                  "Tokens kept over tokens received, per successful request.",
                                  HistogramFamily::FractionBuckets())),
        attention_mass_kept(registry.AddHistogram(
            "kvcompress_attention_mass_kept_ratio",
            "Fraction of the observation window's attention on kept tokens, per layer "
            "(attention-based scorers).",
            HistogramFamily::FractionBuckets())),
        requests_in_flight(
            registry.AddGauge("kvcompress_requests_in_flight", "Compress streams open now.")) {}

  CounterFamily& requests;
  CounterFamily& tokens_in;
  CounterFamily& tokens_kept;
  CounterFamily& bytes_received;
  CounterFamily& bytes_sent;
  HistogramFamily& request_duration;
  HistogramFamily& layer_stage_duration;
  HistogramFamily& compression_ratio;
  HistogramFamily& attention_mass_kept;
  GaugeFamily& requests_in_flight;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_INTERNAL_SERVICE_METRICS_H_
