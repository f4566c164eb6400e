// The server's plain-HTTP port: GET /metrics (Prometheus text format), /healthz (the process
// answers) and /readyz (the model is loaded and the server takes requests), for scrapers and
// probes that do not speak gRPC. Served by cpp-httplib on a pool of threads, with read and
// write timeouts, so that idle or slow connections cannot delay a scrape.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace httplib {
class Server;
}

namespace mmdit {

struct HttpHandlers {
  std::function<std::string()> render_metrics;
  std::function<bool()> ready;
};

class HttpEndpoints {
 public:
  // Listens on `host`:`port` (0 picks a free port). Errors: InvalidArgument or Internal when it
  // cannot listen.
  static absl::StatusOr<std::unique_ptr<HttpEndpoints>> Start(const std::string& host, int port,
                                                               HttpHandlers handlers);
  // Stops listening and waits for the requests in progress.
  ~HttpEndpoints();
  int port() const { return port_; }

 private:
  HttpEndpoints(std::unique_ptr<httplib::Server> server, int port);

  std::unique_ptr<httplib::Server> server_;
  const int port_;
  std::atomic<bool> listen_returned_{false};
  std::thread thread_;
};

}  // namespace mmdit
