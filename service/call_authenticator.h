// CallAuthenticator: who may call the kvcompress.v1.KvCompress service.
//
// Two mechanisms, either or both:
//  - a bearer token (--auth_token_file): every call must carry the metadata
//    `authorization: Bearer <token>`, otherwise UNAUTHENTICATED;
//  - mTLS (--tls_client_ca): the TLS handshake already refused peers without a client
//    certificate signed by the CA, so every call that arrives has a verified certificate.
//
// Why the token is checked in the service's handlers and not by a grpc::AuthMetadataProcessor:
// a processor hangs off TLS server credentials (the token must also work on plaintext
// listeners, e.g. behind a TLS-terminating mesh) and runs for every service of the server
// (the grpc.health.v1 probes of Kubernetes carry no token and must stay open, as must
// reflection). The handlers run first thing for every KvCompress call, before any request
// byte is read, which is the same point in time for what matters.
//
// A call is `authenticated` when a token was required and matched, or when its peer holds a
// verified client certificate. Transports that hand a peer device memory (CUDA IPC, NCCL
// channels; DESIGN §7 "GPU transports only for authenticated peers") must refuse calls that
// are not; inline streams are open to every caller the checks above let through.
//
// The token is compared as SHA-256 digests with CRYPTO_memcmp, so the time taken does not
// depend on how much of a guess is right, nor on the guess's length. Messages never contain
// the token or the presented value.
//
// Thread safety: immutable after construction; Authenticate is thread-safe.
#ifndef KVCOMPRESS_SERVICE_CALL_AUTHENTICATOR_H_
#define KVCOMPRESS_SERVICE_CALL_AUTHENTICATOR_H_

#include <grpcpp/grpcpp.h>

#include <array>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcompress {

// Reads a token file: the token is the file's content without trailing whitespace (files
// written by `echo` or mounted from a Kubernetes Secret end in a newline). NOT_FOUND or
// PERMISSION_DENIED naming the path when it cannot be read; INVALID_ARGUMENT when it is
// empty, larger than 4 KiB, or holds characters that cannot travel in gRPC metadata
// (anything outside printable ASCII), naming the offending byte's position, not its content.
absl::StatusOr<std::string> ReadAuthTokenFile(const std::string& path);

// What the server knows about the caller of one call.
struct CallIdentity {
  bool authenticated = false;
  bool token_checked = false;
  bool certificate_verified = false;
  std::string certificate_subject;  // the client certificate's identity (SAN or CN), if any
};

class CallAuthenticator final {
 public:
  // `token` empty: no token required. `client_certificates_verified`: the listener runs mTLS
  // (only then does a client certificate count as authentication).
  CallAuthenticator(std::string token, bool client_certificates_verified);
  CallAuthenticator(const CallAuthenticator&) = delete;
  CallAuthenticator& operator=(const CallAuthenticator&) = delete;

  bool token_required() const { return token_required_; }

  // Checks one call. UNAUTHENTICATED, saying what was expected, when the token is required
  // and missing, malformed or wrong.
  absl::StatusOr<CallIdentity> Authenticate(const grpc::ServerContextBase& context) const;

  // The token check on the call's `authorization` metadata values (usually zero or one).
  absl::Status CheckAuthorization(const std::vector<absl::string_view>& values) const;

 private:
  const bool token_required_;
  const bool client_certificates_verified_;
  std::array<unsigned char, 32> token_digest_{};  // SHA-256 of the token
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_CALL_AUTHENTICATOR_H_
