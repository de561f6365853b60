// Flags from the environment: every kvcd flag `--name` may also be set by the variable
// `KVCD_NAME` (the prefix, then the flag name in upper case), which is how containers and
// Kubernetes Secrets usually configure a server.
//
// ApplyFlagsFromEnvironment runs before absl::ParseCommandLine, so a flag given on the
// command line overrides its variable. Only flags the caller selects are looked at (kvcd
// selects the flags defined in service/main.cc), so absl's own flags (--flagfile, --help,
// ...) keep their usual meaning. Variables with the prefix that name no selected flag are
// ignored on purpose: Kubernetes injects service-link variables such as KVCD_SERVICE_HOST
// and KVCD_PORT into every pod when a Service is called "kvcd".
//
// A variable that is set, even to the empty string, is a value: KVCD_METRICS_ADDRESS= turns
// /metrics off just as --metrics_address= does.
//
// Thread safety: call once at start-up, before other threads read flags.
#ifndef KVCOMPRESS_SERVICE_FLAGS_FROM_ENV_H_
#define KVCOMPRESS_SERVICE_FLAGS_FROM_ENV_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcompress {

// The variable that sets flag `flag_name`: "KVCD_" + "max_layers" → "KVCD_MAX_LAYERS".
std::string EnvironmentVariableFor(absl::string_view prefix, absl::string_view flag_name);

// Whether `flag` is defined in the source file `path` ("service/main.cc"): its Filename()
// is `path` or ends in "/" + `path` (compilers record absolute or relative paths).
bool FlagDefinedIn(const absl::CommandLineFlag& flag, absl::string_view path);

// Reads the environment through `getenv` (std::getenv by default, replaceable for tests).
using EnvironmentLookup = std::function<const char*(const char* name)>;

// For every registered, non-retired flag with `selected(flag)` whose variable is set, parses
// the variable's value into the flag. Returns the variables applied, sorted.
// INVALID_ARGUMENT naming the variable, its value and the flag's parse error when a value
// does not parse; flags set before the failure keep their new values (the caller exits).
absl::StatusOr<std::vector<std::string>> ApplyFlagsFromEnvironment(
    absl::string_view prefix, const std::function<bool(const absl::CommandLineFlag&)>& selected,
    const EnvironmentLookup& getenv = nullptr);

// A paragraph for --help: which variables exist and that the command line wins.
std::string EnvironmentUsage(absl::string_view prefix);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_FLAGS_FROM_ENV_H_
