#include "client/connection_flags.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace kvcompress {

std::span<const FlagSpec> ConnectionFlagSpecs() {
  static const std::vector<FlagSpec> flags = {
      {"tls", false, "connect with TLS, trusting the system's root CAs"},
      {"tls-ca", true, "FILE  connect with TLS, trusting the CA certificates in FILE (PEM)"},
      {"tls-cert", true, "FILE  mTLS: client certificate chain (PEM), with --tls-key"},
      {"tls-key", true, "FILE  mTLS: the client certificate's private key (PEM)"},
      {"tls-server-name", true, "NAME  name the server certificate must carry (default: host)"},
      {"auth-token-file", true, "FILE  send the bearer token in FILE (kvcd --auth_token_file)"},
  };
  return flags;
}

absl::Status ApplyConnectionFlags(const ParsedFlags& flags, ClientOptions& options) {
  TlsOptions& tls = options.tls;
  tls.enabled = flags.GetBool("tls");
  tls.root_ca_file = flags.Get("tls-ca").value_or("");
  tls.cert_file = flags.Get("tls-cert").value_or("");
  tls.key_file = flags.Get("tls-key").value_or("");
  tls.server_name = flags.Get("tls-server-name").value_or("");
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls-cert and --tls-key go together (mTLS); ",
                     tls.cert_file.empty() ? "--tls-key" : "--tls-cert", " is given, ",
                     tls.cert_file.empty() ? "--tls-cert" : "--tls-key", " is not"));
  }
  if (!tls.server_name.empty() && !tls.on()) {
    return absl::InvalidArgumentError("--tls-server-name needs TLS: add --tls or --tls-ca FILE");
  }
  options.auth_token_file = flags.Get("auth-token-file").value_or("");
  return absl::OkStatus();
}

}  // namespace kvcompress
