// The mmdit-server binary as a container runs it: flags from the environment, SIGTERM drains.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <regex>

#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::Eventually;
using ::mmdit::testing::HttpGet;
using ::mmdit::testing::RandomSd3TinyInputs;
using ::mmdit::testing::StartDenoise;

// A child mmdit-server whose log is read until it reports SERVING.
class ServerProcess {
 public:
  // With `working_dir`, the child starts there (where relative paths, the default model's
  // among them, resolve).
  ServerProcess(const std::vector<std::string>& args, const std::vector<std::string>& environment,
                const std::string& working_dir = "") {
    int pipe_fds[2];
    EXPECT_EQ(::pipe(pipe_fds), 0);
    pid_ = ::fork();
    if (pid_ == 0) {
      if (!working_dir.empty() && ::chdir(working_dir.c_str()) != 0) ::_exit(126);
      ::dup2(pipe_fds[1], STDOUT_FILENO);
      ::dup2(pipe_fds[1], STDERR_FILENO);
      ::close(pipe_fds[0]);
      std::vector<char*> argv = {const_cast<char*>(MMDIT_SERVER_PATH)};
      for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
      argv.push_back(nullptr);
      std::vector<std::string> child_environment = environment;
      for (const char* inherited : {"OMP_NUM_THREADS", "TSAN_OPTIONS"}) {  // test settings, sanitizer runs
        if (const char* value = std::getenv(inherited))
          child_environment.push_back(std::string(inherited) + "=" + value);
      }
      std::vector<char*> envp;
      for (const std::string& e : child_environment) envp.push_back(const_cast<char*>(e.c_str()));
      envp.push_back(nullptr);
      ::execve(MMDIT_SERVER_PATH, argv.data(), envp.data());
      ::_exit(127);
    }
    ::close(pipe_fds[1]);
    log_ = ::fdopen(pipe_fds[0], "r");
    std::regex listening(R"(listening on [^ ]*:(\d+) )"), metrics(R"(metrics on :(\d+)/metrics)");
    char line[4096];
    while (std::fgets(line, sizeof(line), log_) != nullptr) {
      text_ += line;
      std::cmatch match;
      if (std::regex_search(line, match, listening)) port_ = std::stoi(match[1]);
      if (std::regex_search(line, match, metrics)) metrics_port_ = std::stoi(match[1]);
      if (std::strstr(line, "SERVING:") != nullptr) break;
    }
  }
  ~ServerProcess() {
    if (pid_ > 0 && ::waitpid(pid_, nullptr, WNOHANG) == 0) ::kill(pid_, SIGKILL);
    if (log_ != nullptr) std::fclose(log_);
  }
  // Sends SIGTERM and returns the exit status; reads the rest of the log.
  int Terminate() {
    ::kill(pid_, SIGTERM);
    char line[4096];
    while (std::fgets(line, sizeof(line), log_) != nullptr) text_ += line;
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  const std::string& log() const { return text_; }

 private:
  pid_t pid_ = -1;
  FILE* log_ = nullptr;
  int port_ = 0, metrics_port_ = 0;
  std::string text_;
};

TEST(ServerProcess, SigtermAnswersEveryAcceptedRequestThenExitsCleanly) {
  // Configured the container way: from the environment.
  ServerProcess server({"--host", "127.0.0.1"},
                       {"MMDIT_MODEL=" + testing::GoldenDir("sd3_tiny"), "MMDIT_PORT=0", "MMDIT_METRICS_PORT=0",
                        "MMDIT_MAX_QUEUE_DELAY_US=5000000", "MMDIT_DRAIN_TIMEOUT_S=20", "MMDIT_WARMUP=2x4x16x16/9"});
  ASSERT_GT(server.port(), 0) << server.log();
  EXPECT_THAT(server.log(), ::testing::HasSubstr("warm-up: 2 x [4, 16, 16] with 9 text tokens"));
  auto client = DenoiserClient::Connect({.target = "127.0.0.1:" + std::to_string(server.port())});
  ASSERT_TRUE(client.ok());
  EXPECT_TRUE(*(*client)->IsServing(std::chrono::seconds(10)));
  std::vector<std::unique_ptr<testing::AsyncCall>> calls;
  // They ask to wait for company (5 s): still queued when SIGTERM comes.
  for (uint32_t i = 0; i < 3; ++i) {
    calls.push_back(StartDenoise(**client, RandomSd3TinyInputs(1, 8, 8, 7, i), std::chrono::seconds(30), true));
  }
  ASSERT_TRUE(Eventually([&] {
    return HttpGet(server.metrics_port(), "/metrics").find("mmdit_queue_depth 3\n") != std::string::npos;
  })) << HttpGet(server.metrics_port(), "/metrics");
  EXPECT_EQ(server.Terminate(), 0) << server.log();
  for (auto& call : calls) {
    const grpc::Status status = call->status.get();
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(call->response.batch_samples(), 3);  // the three queued ones went together
  }
  EXPECT_THAT(server.log(), ::testing::HasSubstr("draining"));
}

// No --model: the built-in default, models/digits under the working directory (the repository
// root here, / in the container image), with its text encoder: a prompt makes an image.
TEST(ServerProcess, WithoutAModelItServesTheTrainedDigitsModelWithItsTextEncoder) {
  ServerProcess server({"--host", "127.0.0.1", "--port", "0", "--metrics_port", "-1"}, {},
                       std::string(MMDIT_PROJECT_DIR));
  ASSERT_GT(server.port(), 0) << server.log();
  EXPECT_THAT(server.log(), ::testing::HasSubstr("serving the built-in default model models/digits"));
  EXPECT_THAT(server.log(), ::testing::HasSubstr("text encoder: lookup table, 26 words, 4 tokens"));
  auto client = DenoiserClient::Connect({.target = "127.0.0.1:" + std::to_string(server.port())});
  ASSERT_TRUE(client.ok());
  GenerateInputs inputs;
  inputs.prompt = "seven";
  inputs.seed = 1;
  inputs.steps = 4;
  absl::StatusOr<GenerateResult> result = (*client)->Generate(inputs, v1::FP32, std::chrono::seconds(60));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->latent.shape, (Shape{1, 1, 8, 8}));
  EXPECT_EQ(server.Terminate(), 0) << server.log();
}

// --dtype from the command line and from the environment (the flag table builds both).
TEST(ServerProcess, TakesTheComputeDtypeFromTheFlagOrTheEnvironment) {
  const std::vector<std::string> model = {"--model", testing::GoldenDir("sd3_tiny"), "--host", "127.0.0.1", "--port",
                                          "0", "--metrics_port", "-1", "--warmup", "1x4x16x16/9"};
  std::vector<std::string> with_flag = model;
  with_flag.insert(with_flag.end(), {"--dtype", "bf16"});
  for (const auto& [args, environment] :
       std::vector<std::pair<std::vector<std::string>, std::vector<std::string>>>{{with_flag, {}},
                                                                                  {model, {"MMDIT_DTYPE=bf16"}}}) {
    ServerProcess server(args, environment);
    if (server.log().find("SERVING:") != std::string::npos) {
      EXPECT_THAT(server.log(), ::testing::HasSubstr("bf16 compute"));
      EXPECT_EQ(server.Terminate(), 0) << server.log();
    } else {  // a CPU that cannot run bf16 refuses it, by name: the flag was still read
      EXPECT_EQ(server.Terminate(), 1) << server.log();
      EXPECT_THAT(server.log(), ::testing::HasSubstr("bf16"));
    }
  }
}

TEST(ServerProcess, HelpListsEveryFlagWithItsEnvironmentName) {
  ServerProcess server({"--help"}, {});
  EXPECT_EQ(server.Terminate(), 0);
  for (const char* line : {"--dtype f32", "[MMDIT_DTYPE]", "--max_running_generations 8", "[MMDIT_MAX_STEPS]",
                           "--drain_timeout_s 30", "[MMDIT_TLS_CLIENT_CA]"}) {
    EXPECT_THAT(server.log(), ::testing::HasSubstr(line));
  }
}

TEST(ServerProcess, RefusesBadFlagsWithUsage) {
  ServerProcess server({"--max_batch_samples", "0"}, {});
  EXPECT_EQ(server.Terminate(), 2);  // a usage error, as an unknown flag is
  EXPECT_THAT(server.log(), ::testing::HasSubstr("--max_batch_samples must be >= 1"));
  ServerProcess unknown({"--dtipe", "bf16"}, {});
  EXPECT_EQ(unknown.Terminate(), 2);
  EXPECT_THAT(unknown.log(), ::testing::HasSubstr("unknown flag --dtipe"));
  EXPECT_THAT(unknown.log(), ::testing::HasSubstr("--dtype f32"));  // the usage follows
  ServerProcess missing_model({"--model", "/nonexistent/model", "--port", "0", "--metrics_port", "-1"}, {});
  EXPECT_EQ(missing_model.Terminate(), 1);  // not a usage error: the flag is fine, the directory is not
}

}  // namespace
}  // namespace mmdit
