// Open-loop (or closed-loop) unary gRPC load generator for bench/overload.py.
//
// Why C++: a Python grpc.aio generator falls seconds behind its schedule at tens of thousands of
// requests per second, so overload figures end up measuring the generator. perf_analyzer can run
// an open loop but stops at the first error and sets no client deadline; under overload, errors
// and deadlines are the point. This program sends one pre-serialised request (a file of protobuf
// bytes) through grpc::GenericStub, so it needs no generated code, and prints one JSON line.
//
// Open loop: request k leaves at t0 + k/rate whether or not earlier ones were answered (when
// behind, it leaves at once); latencies are measured from the scheduled time, so a slow sender
// cannot hide queueing (coordinated omission), and also from the actual send.
// Closed loop (--concurrency C): C callers, each sending again as soon as it is answered.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client.h"
#include "report.h"

using Clock = std::chrono::steady_clock;

namespace {

using loadgen::kNumCodes;
using loadgen::Num;
using loadgen::Outcomes;

struct Options : loadgen::CommonOptions {
  Options() { channels = 4; }
  int threads = 2;
};

[[noreturn]] void Usage(const std::string& why) {
  std::cerr << "openloop: " << why << "\n"
            << "usage: openloop --method /pkg.Service/Method --payload FILE [--target host:port]\n"
               "  [--rate R] [--seconds S] [--deadline-ms D] [--channels N] [--threads T]\n"
               "  [--concurrency C] [--max-message-bytes B]\n";
  std::exit(2);
}

Options Parse(int argc, char** argv) {
  Options o;
  loadgen::Setters setters = loadgen::CommonSetters(o);
  setters["--threads"] = [&o](const std::string& v) { o.threads = std::stoi(v); };
  loadgen::ReadFlags(argc, argv, Usage, setters);

  if (o.method.empty() || o.payload.empty()) Usage("--method and --payload are required");
  if (o.channels < 1 || o.threads < 1 || o.seconds <= 0) Usage("channels, threads, seconds > 0");
  if (o.concurrency <= 0 && o.rate <= 0) Usage("--rate must be > 0 in open loop");
  return o;
}

// One call in flight: everything the completion has to find again.
struct Call {
  grpc::ClientContext ctx;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  Clock::time_point scheduled, sent;
  int queue = 0;
};

class Generator {
 public:
  explicit Generator(const Options& o) : o_(o), stats_(o.threads) {
    const std::string bytes = loadgen::ReadFile(o.payload, Usage);
    grpc::Slice slice(bytes.data(), bytes.size());
    request_ = grpc::ByteBuffer(&slice, 1);

    for (int i = 0; i < o.channels; ++i) {
      auto channel = loadgen::Connect("openloop", o.target, i, o.max_message_bytes);
      stubs_.push_back(std::make_unique<grpc::GenericStub>(channel));
      channels_.push_back(std::move(channel));
    }
    for (int i = 0; i < o.threads; ++i) {
      queues_.push_back(std::make_unique<grpc::CompletionQueue>());
    }
  }

  void Run() {
    for (int i = 0; i < o_.threads; ++i) workers_.emplace_back([this, i] { Poll(i); });
    t0_ = Clock::now();
    end_ = t0_ + std::chrono::duration_cast<Clock::duration>(
                     std::chrono::duration<double>(o_.seconds));
    Clock::time_point last_send = t0_;
    if (o_.concurrency > 0) {
      for (int c = 0; c < o_.concurrency; ++c) {
        const auto now = Clock::now();
        Send(now, c % o_.threads);
      }
      std::this_thread::sleep_until(end_);
      last_send = end_;
    } else {
      const double period_s = 1.0 / o_.rate;
      for (uint64_t k = 0;; ++k) {
        const auto due =
            t0_ + std::chrono::duration_cast<Clock::duration>(
                      std::chrono::duration<double>(static_cast<double>(k) * period_s));
        if (due >= end_) break;
        auto now = Clock::now();
        if (due > now) {
          std::this_thread::sleep_until(due);
          now = Clock::now();
        }
        const double lag_ms = std::chrono::duration<double, std::milli>(now - due).count();
        behind_ms_ = lag_ms;  // the lag of the last send is what the report is about
        if (lag_ms > max_behind_ms_) {
          max_behind_ms_ = lag_ms;
          max_behind_at_s_ = std::chrono::duration<double>(due - t0_).count();
        }
        Send(due, static_cast<int>(k % o_.threads));
        last_send = now;
      }
    }
    elapsed_s_ = std::chrono::duration<double>(std::max(last_send, end_) - t0_).count();

    // Every call has a deadline, so this ends; without one, the cap is S + 30 s from the start.
    const auto cap = t0_ + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(o_.seconds + 30.0));
    while (outstanding_.load() > 0 && Clock::now() < cap) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    stopping_ = true;
    const int64_t lost = outstanding_.load();
    Report(lost);
    if (lost > 0) {
      // Calls still in flight: shutting gRPC down cleanly would wait for them. Leave now.
      std::fflush(stdout);
      std::_Exit(0);
    }
    for (auto& q : queues_) q->Shutdown();
    for (auto& t : workers_) t.join();
  }

 private:
  void Send(Clock::time_point scheduled, int queue) {
    auto* call = new Call;
    call->scheduled = scheduled;
    call->queue = queue;
    if (o_.deadline_ms > 0) {
      call->ctx.set_deadline(std::chrono::system_clock::now() +
                             std::chrono::milliseconds(o_.deadline_ms));
    }
    const size_t ch = next_channel_.fetch_add(1, std::memory_order_relaxed) % stubs_.size();
    outstanding_.fetch_add(1);
    sent_.fetch_add(1, std::memory_order_relaxed);
    call->sent = Clock::now();
    call->reader = stubs_[ch]->PrepareUnaryCall(&call->ctx, o_.method, request_,
                                                queues_[queue].get());
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call);
  }

  void Poll(int i) {
    Outcomes& s = stats_[i];
    void* tag;
    bool ok;
    while (queues_[i]->Next(&tag, &ok)) {
      auto* call = static_cast<Call*>(tag);
      const auto now = Clock::now();
      const int code = static_cast<int>(call->status.error_code());
      const int64_t from_sched =
          std::chrono::duration_cast<std::chrono::microseconds>(now - call->scheduled).count();
      const int64_t from_send =
          std::chrono::duration_cast<std::chrono::microseconds>(now - call->sent).count();
      {
        std::lock_guard<std::mutex> lock(s.mu);
        if (!stopping_) s.Add(code, from_sched, from_send, call->status.error_message());
      }
      delete call;
      // Closed loop: the caller sends again on this same queue while the run lasts.
      if (o_.concurrency > 0 && now < end_ && !stopping_) Send(Clock::now(), i);
      outstanding_.fetch_sub(1);
    }
  }

  void Report(int64_t lost) {
    Outcomes all;
    for (auto& s : stats_) all.Merge(s);
    const std::string out = "{\"sent\": " + std::to_string(sent_.load()) +
                            ", \"elapsed_s\": " + Num(elapsed_s_) +
                            ", \"mode\": \"" + (o_.concurrency > 0 ? "closed" : "open") + "\"" +
                            ", \"behind_ms\": " + Num(behind_ms_) +
                            ", \"max_behind_ms\": " + Num(max_behind_ms_) +
                            ", \"max_behind_at_s\": " + Num(max_behind_at_s_) + all.Json() +
                            ", \"lost\": " + std::to_string(lost) + "}";
    std::printf("%s\n", out.c_str());
    std::fflush(stdout);
  }

  const Options o_;
  grpc::ByteBuffer request_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  std::vector<std::unique_ptr<grpc::CompletionQueue>> queues_;
  std::vector<Outcomes> stats_;
  std::vector<std::thread> workers_;
  std::atomic<size_t> next_channel_{0};
  std::atomic<int64_t> outstanding_{0};
  std::atomic<uint64_t> sent_{0};
  std::atomic<bool> stopping_{false};
  Clock::time_point t0_, end_;
  double elapsed_s_ = 0, behind_ms_ = 0, max_behind_ms_ = 0, max_behind_at_s_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  Generator g(o);
  g.Run();
  return 0;
}
