// A load generator for kvcd, the engine of `kvc bench`: `concurrency` closed-loop workers,
// each sending one Compress stream at a time through the C++ SDK (the path real prefill
// workers take), all on one Client and so on one channel.
//
// Every request sends the same prepared tensors (a synthetic cache made once, up front), so
// the generator spends its time in gRPC, not in making inputs: what it measures is the
// server. Results are read and checked by the SDK, then discarded.
//
// What is measured, after `warmup` (default none):
//   - duration mode: the requests that finish inside the window [warmup, warmup + duration),
//     over exactly `duration`. Workers keep the load steady up to the end of the window, so
//     this is the steady-state rate; requests still running when it closes finish
//     afterwards and are counted apart (like those that finished during the warmup), not
//     as measured: letting them in would stretch the window over a tail with fewer streams
//     in flight and understate the rate by up to a latency over the duration.
//   - requests mode: the first `requests` requests started after the warmup, over the time
//     from the end of the warmup to the last of them finishing (a fixed amount of work).
// Latency is StartCompress → Finish of a successful request. Failures are tallied by status
// code with the first message seen for each code, those outside the measured set apart.
// Requests longer than the window can leave it empty.
//
// RunLoad blocks until the run is over. Thread-safe with respect to the Client (which
// supports concurrent sessions); the workload must outlive the call.
#ifndef KVCOMPRESS_CLIENT_LOAD_GENERATOR_H_
#define KVCOMPRESS_CLIENT_LOAD_GENERATOR_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/latency_summary.h"
#include "client/synthetic_cache.h"
#include "kvcompress/v1/kvcompress.pb.h"

namespace kvcompress {

// What every request sends: a header with exactly one sequence (geometry, method, output)
// and that sequence's layers, viewed.
struct LoadWorkload {
  v1::CompressHeader header;
  std::vector<LayerTensors> layers;  // [layer]; the bytes outlive RunLoad
};

// A LoadWorkload over a synthetic cache it owns. Not copyable: `workload` views `cache`.
struct SyntheticWorkload {
  SyntheticCache cache;
  LoadWorkload workload;
};

// Generates the cache (GenerateSyntheticCache, same errors) and the header: inline
// transport, HND, the cache's dtype, one sequence of T tokens and W window queries.
absl::StatusOr<std::unique_ptr<SyntheticWorkload>> MakeSyntheticWorkload(
    const SyntheticCacheOptions& cache, const v1::MethodSpec& method, const v1::OutputSpec& output);

struct LoadOptions {
  int concurrency = 1;  // streams in flight at once; default 1
  // Length of the measured phase; default 10 s. Ignored when requests > 0.
  absl::Duration duration = absl::Seconds(10);
  int64_t requests = 0;  // > 0: measure exactly this many requests instead of a duration
  absl::Duration warmup = absl::ZeroDuration();  // default none
  absl::Duration deadline = absl::Seconds(60);   // per request; default 60 s
};

struct FailureTally {
  int64_t count = 0;
  std::string first_message;
};

struct LoadReport {
  int64_t requests_ok = 0;                            // measured
  int64_t requests_failed = 0;                        // measured
  std::map<absl::StatusCode, FailureTally> failures;  // measured failures by code
  // Not measured, in no other figure: requests that finished during the warmup (requests
  // mode: that started during it), and, in duration mode, those that finished after the
  // window closed.
  int64_t warmup_ok = 0;
  int64_t warmup_failed = 0;
  int64_t after_window_ok = 0;
  int64_t after_window_failed = 0;
  std::map<absl::StatusCode, FailureTally> unmeasured_failures;
  // Duration mode: the window, `duration`. Requests mode: end of the warmup → the last
  // measured request's completion.
  absl::Duration measured;

  // Per request, from the workload: sequence tokens T and tensor bytes sent (K, V, Q, S).
  uint64_t input_tokens_per_request = 0;
  uint64_t input_bytes_per_request = 0;
  // Summed over successful measured requests, as the server's summaries report them.
  uint64_t tokens_kept = 0;
  uint64_t bytes_out = 0;

  LatencySummary latency;  // successful measured requests

  // Rates over `measured`; 0 when nothing was measured.
  double requests_per_second() const;
  double input_tokens_per_second() const;
  double input_bytes_per_second() const;
};

// Runs the load. INVALID_ARGUMENT, before anything is sent, for concurrency < 1, a
// non-positive duration (without requests), negative requests or warmup, a non-positive
// deadline, or a workload whose header does not hold one sequence with one LayerTensors per
// layer. Request failures never fail the run: they are counted in the report.
absl::StatusOr<LoadReport> RunLoad(Client& client, const LoadWorkload& workload,
                                   const LoadOptions& options);

// The report as one JSON object (rates, latency in milliseconds, failures by code name,
// the workload's geometry and method), for scripts. `server` is recorded as given.
std::string LoadReportToJson(const LoadReport& report, const LoadWorkload& workload,
                             const LoadOptions& options, const std::string& server);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_LOAD_GENERATOR_H_
