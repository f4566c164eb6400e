#include "server/http_endpoints.h"

#include <httplib.h>

#include "absl/strings/str_cat.h"

namespace mmdit {
namespace {

// Enough threads that a few idle connections (each holds one until its read timeout) never
// leave a scrape waiting; the handlers themselves take microseconds.
constexpr int kThreads = 8;
constexpr time_t kTimeoutSeconds = 2;
constexpr char kPrometheusText[] = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace

absl::StatusOr<std::unique_ptr<HttpEndpoints>> HttpEndpoints::Start(const std::string& host, int port,
                                                                     HttpHandlers handlers) {
  auto server = std::make_unique<httplib::Server>();
  server->new_task_queue = [] { return new httplib::ThreadPool(kThreads); };
  server->set_read_timeout(kTimeoutSeconds, 0);
  server->set_write_timeout(kTimeoutSeconds, 0);
  server->set_keep_alive_timeout(kTimeoutSeconds);
  server->set_payload_max_length(1 << 16);  // these endpoints take no body
  server->Get("/metrics", [render = handlers.render_metrics](const httplib::Request&, httplib::Response& response) {
    response.set_content(render(), kPrometheusText);
  });
  server->Get("/healthz", [](const httplib::Request&, httplib::Response& response) {
    response.set_content("ok\n", "text/plain");
  });
  server->Get("/readyz", [ready = handlers.ready](const httplib::Request&, httplib::Response& response) {
    const bool is_ready = ready();
    response.status = is_ready ? 200 : 503;
    response.set_content(is_ready ? "ready\n" : "not ready: loading the model or draining\n", "text/plain");
  });
  server->set_error_handler([](const httplib::Request&, httplib::Response& response) {
    if (response.status == 404) response.set_content("not found: try /metrics, /healthz or /readyz\n", "text/plain");
  });
  const std::string bind_host = host.empty() ? "0.0.0.0" : host;
  const int bound = port == 0 ? server->bind_to_any_port(bind_host) : (server->bind_to_port(bind_host, port) ? port : -1);
  if (bound <= 0) return absl::InternalError(absl::StrCat("metrics: cannot listen on ", bind_host, ":", port));
  return std::unique_ptr<HttpEndpoints>(new HttpEndpoints(std::move(server), bound));
}

HttpEndpoints::HttpEndpoints(std::unique_ptr<httplib::Server> server, int port)
    : server_(std::move(server)), port_(port) {
  thread_ = std::thread([this] {
    server_->listen_after_bind();
    listen_returned_.store(true);
  });
}

HttpEndpoints::~HttpEndpoints() {
  // httplib's stop() does nothing before its listen loop has started: wait for that first.
  while (!server_->is_running() && !listen_returned_.load()) std::this_thread::yield();
  server_->stop();
  thread_.join();
}

}  // namespace mmdit
