// The `kvc` flags that say how to reach a kvcd securely, shared by every subcommand that
// talks to a server (info, compress --server, bench):
//
//   --tls                    TLS, trusting the system's root CAs
//   --tls-ca FILE            TLS, trusting the CA certificates in FILE (PEM)
//   --tls-cert FILE          mTLS: this client's certificate chain (PEM); with --tls-key
//   --tls-key FILE           mTLS: its unencrypted private key (PEM)
//   --tls-server-name NAME   the name the server's certificate must carry, instead of the
//                            host of --server (IP targets, tests)
//   --auth-token-file FILE   send "authorization: Bearer <token>" with the token in FILE
//
// Pure functions; thread-safe. Files are read when the client connects (Client::Connect),
// which reports unreadable ones naming the option and the path.
#ifndef KVCOMPRESS_CLIENT_CONNECTION_FLAGS_H_
#define KVCOMPRESS_CLIENT_CONNECTION_FLAGS_H_

#include <span>

#include "absl/status/status.h"
#include "client/client.h"
#include "client/method_flags.h"

namespace kvcompress {

std::span<const FlagSpec> ConnectionFlagSpecs();

// Sets options.tls and options.auth_token_file from the flags above; other fields are left
// as they are. INVALID_ARGUMENT (a usage error) for --tls-cert without --tls-key or the
// reverse, and for --tls-server-name without TLS.
absl::Status ApplyConnectionFlags(const ParsedFlags& flags, ClientOptions& options);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_CONNECTION_FLAGS_H_
