// Server credentials of kvcd's gRPC listener from the --tls_* flags.
//
//   no files                      → plaintext (grpc::InsecureServerCredentials)
//   --tls_cert + --tls_key        → TLS; clients verify the server
//   ... + --tls_client_ca         → mTLS; the handshake requires a client certificate
//                                   signed by that CA and refuses peers without one
//
// Files are PEM. They are read and checked here, once, so that a wrong path, an unreadable
// file, a file that holds no certificate, an encrypted key or a key that does not belong to
// the certificate stops kvcd at start-up with a message naming the flag and the path,
// instead of surfacing later as a listener that cannot start or as handshake failures.
// Certificates are not reloaded while kvcd runs: rotating them means restarting the pod.
//
// Only the gRPC listener uses these credentials; the /metrics HTTP endpoint stays plain HTTP.
// Thread-safe (no shared state).
#ifndef KVCOMPRESS_SERVICE_SERVER_CREDENTIALS_H_
#define KVCOMPRESS_SERVICE_SERVER_CREDENTIALS_H_

#include <grpcpp/security/server_credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace kvcompress {

struct ServerTlsFiles {
  std::string cert;       // --tls_cert: certificate chain, leaf first
  std::string key;        // --tls_key: the leaf's private key, unencrypted
  std::string client_ca;  // --tls_client_ca: CA bundle client certificates must chain to
};

struct ServerSecurity {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  bool tls = false;
  bool client_certificates_verified = false;  // mTLS
};

// INVALID_ARGUMENT when only one of cert and key is set, or a client CA without them, or a
// file's content is not what it should be; NOT_FOUND / PERMISSION_DENIED when a file cannot
// be read. Every message names the flag and the path.
absl::StatusOr<ServerSecurity> MakeServerSecurity(const ServerTlsFiles& files);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_SERVER_CREDENTIALS_H_
