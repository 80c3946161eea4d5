// Open-loop (or closed-loop) load over bidirectional gRPC streams for bench/overload.py: the
// streaming counterpart of openloop.cc, for ferry.v1 InferStream and the Open Inference
// Protocol's ModelStreamInfer.
//
// Why C++: a Python grpc.aio stream writer cannot write tens of thousands of messages a second
// beside the server on two cores; its messages then wait in its own queue, and an overload run
// measures the generator. This one writes from gRPC's callback threads and reads every answer.
//
// Messages: one pre-serialised request (--payload, without id or timeout) to which each message
// appends its id (field 3 in both protocols; the decimal sequence number) and, in open loop with
// --deadline-ms, its remaining budget as the request's own timeout (ferry.v1 timeout_us; the
// OIP "timeout" parameter, in microseconds). Appending works because a protobuf parser takes the
// last value of a field it reads twice. A stream writes one message at a time: HTTP/2 flow
// control and the server's reading decide how fast, so messages wait in the stream's queue here
// when the server does not read them. That wait counts, as in openloop: latency is measured from
// each message's scheduled time (and from its actual write). A message whose deadline passes
// while it waits is not sent (a client with a deadline would give up on it) and counts as
// DEADLINE_EXCEEDED; an answer that comes after the deadline counts as DEADLINE_EXCEEDED too.
//
// Open loop: message k is due at t0 + k/rate and goes to stream k mod (channels x streams).
// Closed loop (--concurrency C): C messages in flight, each answer lets its stream send another.
// Prints one JSON line, in openloop's format, plus "client_wait_ms" (scheduled -> written).

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "client.h"
#include "report.h"

using Clock = std::chrono::steady_clock;

namespace {

using loadgen::Histogram;
using loadgen::kCodeNames;
using loadgen::kNumCodes;
using loadgen::Num;
using loadgen::Outcomes;
using loadgen::Quantiles;

constexpr int kDeadlineExceeded = 4;

struct Options : loadgen::CommonOptions {
  std::string protocol = "ferry";  // or "oip"
  int streams = 4;                 // per channel
};

[[noreturn]] void Usage(const std::string& why) {
  std::cerr << "openstream: " << why << "\n"
            << "usage: openstream --method /pkg.Service/Method --payload FILE --protocol ferry|oip\n"
               "  [--target host:port] [--rate R] [--seconds S] [--deadline-ms D]\n"
               "  [--channels N] [--streams M] [--concurrency C] [--max-message-bytes B]\n";
  std::exit(2);
}

Options Parse(int argc, char** argv) {
  Options o;
  loadgen::Setters setters = loadgen::CommonSetters(o);
  setters["--protocol"] = [&o](const std::string& v) { o.protocol = v; };
  setters["--streams"] = [&o](const std::string& v) { o.streams = std::stoi(v); };
  loadgen::ReadFlags(argc, argv, Usage, setters);

  if (o.method.empty() || o.payload.empty()) Usage("--method and --payload are required");
  if (o.protocol != "ferry" && o.protocol != "oip") Usage("--protocol is ferry or oip");
  if (o.channels < 1 || o.streams < 1 || o.seconds <= 0) Usage("channels, streams, seconds > 0");
  if (o.concurrency <= 0 && o.rate <= 0) Usage("--rate must be > 0 in open loop");
  return o;
}

// ---- the few protobuf wire-format pieces a message and an answer need ----

void PutVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

void PutBytes(std::string& out, uint32_t field, std::string_view bytes) {
  PutVarint(out, (uint64_t{field} << 3) | 2);
  PutVarint(out, bytes.size());
  out.append(bytes.data(), bytes.size());
}

// One top-level field at a time; only varint and length-delimited fields are kept.
class WireReader {
 public:
  explicit WireReader(std::string_view s) : s_(s) {}
  // False at the end or on malformed input.
  bool Next(uint32_t& field, uint64_t& varint, std::string_view& bytes) {
    uint64_t key;
    if (pos_ >= s_.size() || !Varint(key)) return false;
    field = static_cast<uint32_t>(key >> 3);
    switch (key & 7) {
      case 0:
        return Varint(varint);
      case 1:
        return Skip(8);
      case 2: {
        uint64_t n;
        if (!Varint(n) || n > s_.size() - pos_) return false;
        bytes = s_.substr(pos_, n);
        pos_ += n;
        return true;
      }
      case 5:
        return Skip(4);
      default:
        return false;
    }
  }

 private:
  bool Varint(uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64 && pos_ < s_.size(); shift += 7) {
      const auto b = static_cast<uint8_t>(s_[pos_++]);
      v |= uint64_t{b & 0x7fu} << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  }
  bool Skip(size_t n) {
    if (n > s_.size() - pos_) return false;
    pos_ += n;
    return true;
  }
  std::string_view s_;
  size_t pos_ = 0;
};

struct Answer {
  bool parsed = false;
  uint64_t id = 0;
  int code = 0;
  std::string detail;
};

uint64_t ParseId(std::string_view s, bool& ok) {
  uint64_t v = 0;
  ok = !s.empty();
  for (char c : s) {
    if (c < '0' || c > '9') ok = false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  return v;
}

// ferry.v1 InferStreamResponse: id = 1, response = 2, error = 3 {code = 1, message = 2}.
Answer ParseFerry(std::string_view raw) {
  Answer a;
  WireReader r(raw);
  uint32_t f;
  uint64_t v;
  std::string_view b;
  bool id_ok = false;
  while (r.Next(f, v, b)) {
    if (f == 1) {
      a.id = ParseId(b, id_ok);
    } else if (f == 3) {
      a.code = 2;  // UNKNOWN until the error says
      WireReader e(b);
      while (e.Next(f, v, b)) {
        if (f == 1) a.code = static_cast<int>(v);
        else if (f == 2) a.detail.assign(b.data(), b.size());
      }
    }
  }
  a.parsed = id_ok;
  return a;
}

// OIP ModelStreamInferResponse: error_message = 1 ("[StatusCode.NAME] ..." from Ferry),
// infer_response = 2 {id = 3}.
Answer ParseOip(std::string_view raw) {
  Answer a;
  WireReader r(raw);
  uint32_t f;
  uint64_t v;
  std::string_view b;
  bool id_ok = false;
  while (r.Next(f, v, b)) {
    if (f == 1 && !b.empty()) {
      a.detail.assign(b.data(), b.size());
      a.code = 2;
      const std::string prefix = "[StatusCode.";
      const size_t close = a.detail.find(']');
      if (a.detail.rfind(prefix, 0) == 0 && close != std::string::npos) {
        const std::string name = a.detail.substr(prefix.size(), close - prefix.size());
        for (int c = 0; c < kNumCodes; ++c) {
          if (name == kCodeNames[c]) a.code = c;
        }
      }
    } else if (f == 2) {
      WireReader inner(b);
      while (inner.Next(f, v, b)) {
        if (f == 3) a.id = ParseId(b, id_ok);
      }
    }
  }
  a.parsed = id_ok;
  return a;
}

class Generator;

// One bidirectional stream: a queue of due messages written one at a time, every answer read.
class Stream : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  Stream(Generator* gen, grpc::GenericStub* stub, const Options& o);
  void Enqueue(uint64_t k, Clock::time_point scheduled);
  void Close();  // no more messages: half-close once the queue is written
  bool WaitDone(Clock::time_point until);
  size_t Unanswered();  // after Close
  Outcomes outcomes;
  Histogram client_wait;  // scheduled -> written, for each message written (under mu_)

  void OnWriteDone(bool ok) override;
  void OnReadDone(bool ok) override;
  void OnWritesDoneDone(bool) override {}
  void OnDone(const grpc::Status& status) override;

 private:
  struct Times {
    Clock::time_point scheduled, sent;
  };
  enum class Next { kWrite, kHalfClose, kNothing };
  // With mu_ held: the next message still worth sending into write_, or what else to do. The
  // caller starts that after releasing mu_: a reaction may run inside a Start call.
  Next TakeNextLocked();
  void Start(Next next);

  Generator* gen_;
  const Options& o_;
  grpc::ClientContext ctx_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<uint64_t, Clock::time_point>> pending_;
  std::unordered_map<uint64_t, Times> in_flight_;
  bool writing_ = false, closing_ = false, half_closed_ = false, done_ = false;
  size_t lost_ = 0;  // unanswered when the run ended
  grpc::ByteBuffer write_, read_;
  grpc::Status status_;
};

class Generator {
 public:
  explicit Generator(const Options& o) : o_(o) {
    base_ = loadgen::ReadFile(o.payload, Usage);
    for (int i = 0; i < o.channels; ++i) {
      auto channel = loadgen::Connect("openstream", o.target, i, o.max_message_bytes);
      stubs_.push_back(std::make_unique<grpc::GenericStub>(channel));
      channels_.push_back(std::move(channel));
    }
  }

  // The message for sequence number k, with what is left of its budget (0: none).
  std::string Message(uint64_t k, int64_t budget_us) const {
    std::string m = base_;
    PutBytes(m, 3, std::to_string(k));
    if (budget_us > 0) {
      if (o_.protocol == "ferry") {
        PutVarint(m, (6u << 3) | 0);  // timeout_us
        PutVarint(m, static_cast<uint64_t>(budget_us));
      } else {
        std::string param;  // InferParameter{int64_param = 2}
        PutVarint(param, (2u << 3) | 0);
        PutVarint(param, static_cast<uint64_t>(budget_us));
        std::string entry;  // map entry {key = 1, value = 2}
        PutBytes(entry, 1, "timeout");
        PutBytes(entry, 2, param);
        PutBytes(m, 4, entry);  // parameters
      }
    }
    return m;
  }

  Answer Parse(std::string_view raw) const {
    return o_.protocol == "ferry" ? ParseFerry(raw) : ParseOip(raw);
  }

  bool Running() const { return !stopping_.load() && Clock::now() < end_; }
  uint64_t NextId() {
    sent_.fetch_add(1, std::memory_order_relaxed);
    return next_.fetch_add(1, std::memory_order_relaxed);
  }
  void Settled() { outstanding_.fetch_sub(1); }
  void Started() { outstanding_.fetch_add(1); }

  void Run() {
    for (auto& stub : stubs_) {
      for (int j = 0; j < o_.streams; ++j) {
        streams_.push_back(std::make_unique<Stream>(this, stub.get(), o_));
      }
    }
    t0_ = Clock::now();
    end_ = t0_ + std::chrono::duration_cast<Clock::duration>(
                     std::chrono::duration<double>(o_.seconds));
    if (o_.concurrency > 0) {
      for (int c = 0; c < o_.concurrency; ++c) {
        Started();
        streams_[c % streams_.size()]->Enqueue(NextId(), Clock::now());
      }
      std::this_thread::sleep_until(end_);
    } else {
      const double period_s = 1.0 / o_.rate;
      for (uint64_t k = 0;; ++k) {
        const auto due = t0_ + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(static_cast<double>(k) * period_s));
        if (due >= end_) break;
        auto now = Clock::now();
        if (due > now) {
          std::this_thread::sleep_until(due);
          now = Clock::now();
        }
        const double lag_ms = std::chrono::duration<double, std::milli>(now - due).count();
        behind_ms_ = lag_ms;
        max_behind_ms_ = std::max(max_behind_ms_, lag_ms);
        Started();
        streams_[k % streams_.size()]->Enqueue(NextId(), due);
      }
    }
    elapsed_s_ = std::chrono::duration<double>(Clock::now() - t0_).count();
    // Open loop: every message has a deadline, so a deadline (and a second) after the last one
    // all are settled; closed loop: the last answers come at once.
    const double grace_s = o_.concurrency > 0 ? 30.0 : o_.deadline_ms / 1000.0 + 1.0;
    const auto cap = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(grace_s));
    while (outstanding_.load() > 0 && Clock::now() < cap) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    stopping_ = true;
    for (auto& s : streams_) s->Close();
    const auto close_cap = Clock::now() + std::chrono::seconds(5);
    bool all_done = true;
    for (auto& s : streams_) all_done = s->WaitDone(close_cap) && all_done;
    Report();
    if (!all_done) {  // a stream the server never ended: leave without waiting for it
      std::fflush(stdout);
      std::_Exit(0);
    }
  }

  const Clock::time_point& t0() const { return t0_; }

 private:
  void Report() {
    Outcomes all;
    Histogram wait;
    uint64_t lost = 0;
    for (auto& s : streams_) {
      lost += s->Unanswered();
      all.Merge(s->outcomes);
      std::lock_guard<std::mutex> lock(s->outcomes.mu);  // client_wait is kept under it too
      wait.Merge(s->client_wait);
    }
    const std::string out =
        "{\"sent\": " + std::to_string(sent_.load()) + ", \"elapsed_s\": " + Num(elapsed_s_) +
        ", \"mode\": \"" + (o_.concurrency > 0 ? "closed" : "open") + "\"" +
        ", \"streams\": " + std::to_string(streams_.size()) +
        ", \"behind_ms\": " + Num(behind_ms_) + ", \"max_behind_ms\": " + Num(max_behind_ms_) +
        all.Json() + ", \"client_wait_ms\": " + Quantiles(wait) +
        ", \"lost\": " + std::to_string(lost) + "}";
    std::printf("%s\n", out.c_str());
    std::fflush(stdout);
  }

  const Options o_;
  std::string base_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  std::vector<std::unique_ptr<Stream>> streams_;
  std::atomic<uint64_t> next_{0}, sent_{0};
  std::atomic<int64_t> outstanding_{0};
  std::atomic<bool> stopping_{false};
  Clock::time_point t0_, end_;
  double elapsed_s_ = 0, behind_ms_ = 0, max_behind_ms_ = 0;
};

int64_t Us(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

Stream::Stream(Generator* gen, grpc::GenericStub* stub, const Options& o) : gen_(gen), o_(o) {
  ctx_.set_deadline(std::chrono::system_clock::now() +
                    std::chrono::seconds(static_cast<int64_t>(o.seconds) + 90));
  stub->PrepareBidiStreamingCall(&ctx_, o.method, grpc::StubOptions(), this);
  StartRead(&read_);
  AddHold();  // writes start outside reactions (the scheduler's thread) until Close
  StartCall();
}

void Stream::Start(Next next) {
  if (next == Next::kWrite) StartWrite(&write_);
  else if (next == Next::kHalfClose) StartWritesDone();
}

void Stream::Enqueue(uint64_t k, Clock::time_point scheduled) {
  Next next = Next::kNothing;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_) return;
    pending_.emplace_back(k, scheduled);
    if (!writing_ && !done_) next = TakeNextLocked();
  }
  Start(next);
}

Stream::Next Stream::TakeNextLocked() {
  const auto now = Clock::now();
  while (!pending_.empty()) {
    const auto [k, scheduled] = pending_.front();
    pending_.pop_front();
    int64_t budget_us = 0;
    if (o_.concurrency <= 0 && o_.deadline_ms > 0) {
      budget_us = o_.deadline_ms * 1000 - Us(now - scheduled);
      if (budget_us <= 0) {  // expired while it waited here: not worth sending
        std::lock_guard<std::mutex> lock(outcomes.mu);
        outcomes.Add(kDeadlineExceeded, Us(now - scheduled), 0, "expired before it was sent");
        gen_->Settled();
        continue;
      }
    }
    in_flight_[k] = Times{scheduled, now};
    {
      std::lock_guard<std::mutex> lock(outcomes.mu);
      client_wait.Add(Us(now - scheduled));
    }
    const std::string m = gen_->Message(k, budget_us);
    grpc::Slice slice(m.data(), m.size());
    write_ = grpc::ByteBuffer(&slice, 1);
    writing_ = true;
    return Next::kWrite;
  }
  writing_ = false;
  if (closing_ && !half_closed_) {
    half_closed_ = true;
    return Next::kHalfClose;
  }
  return Next::kNothing;
}

void Stream::OnWriteDone(bool ok) {
  Next next = Next::kNothing;
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (ok && !done_) next = TakeNextLocked();  // !ok: the stream is over; OnDone follows
  }
  Start(next);
}

void Stream::OnReadDone(bool ok) {
  if (!ok) return;  // the server ended the stream: OnDone follows
  const auto now = Clock::now();
  std::string raw;
  {
    grpc::Slice slice;
    if (read_.TrySingleSlice(&slice).ok()) {
      raw.assign(reinterpret_cast<const char*>(slice.begin()), slice.size());
    } else {
      std::vector<grpc::Slice> slices;
      (void)read_.Dump(&slices);
      for (const auto& s : slices) raw.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  Answer a = gen_->Parse(raw);
  bool known = false;
  Times t{};
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_flight_.find(a.id);
    if (a.parsed && it != in_flight_.end()) {
      known = true;
      t = it->second;
      in_flight_.erase(it);
    }
  }
  if (known) {
    const int64_t from_sched = Us(now - t.scheduled);
    if (a.code == 0 && o_.concurrency <= 0 && o_.deadline_ms > 0 &&
        from_sched > o_.deadline_ms * 1000) {
      a.code = kDeadlineExceeded;
      a.detail = "answered after its deadline";
    }
    {
      std::lock_guard<std::mutex> lock(outcomes.mu);
      if (gen_->Running() || o_.concurrency <= 0) {
        outcomes.Add(a.code, from_sched, Us(now - t.sent), a.detail);
      }
    }
    gen_->Settled();
    if (o_.concurrency > 0 && gen_->Running()) {
      gen_->Started();
      Enqueue(gen_->NextId(), Clock::now());
    }
  }
  StartRead(&read_);
}

void Stream::OnDone(const grpc::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  status_ = status;
  done_ = true;
  cv_.notify_all();
}

void Stream::Close() {
  bool half_close = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
    // The run is over. Open loop: what is still unanswered is what a caller with a deadline
    // gave up on, and counts so; closed loop: the last answers are not part of the run.
    const auto now = Clock::now();
    lost_ = in_flight_.size() + pending_.size();
    if (o_.concurrency <= 0) {
      std::lock_guard<std::mutex> olock(outcomes.mu);
      for (const auto& [k, scheduled] : pending_) {
        outcomes.Add(kDeadlineExceeded, Us(now - scheduled), 0, "never sent");
      }
      for (const auto& [k, t] : in_flight_) {
        outcomes.Add(kDeadlineExceeded, Us(now - t.scheduled), Us(now - t.sent), "never answered");
      }
    }
    pending_.clear();
    in_flight_.clear();
    if (!writing_ && !done_ && !half_closed_) half_close = half_closed_ = true;
  }
  if (half_close) StartWritesDone();
  RemoveHold();
}

bool Stream::WaitDone(Clock::time_point until) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_until(lock, until, [this] { return done_; });
}

size_t Stream::Unanswered() {
  std::lock_guard<std::mutex> lock(mu_);
  return lost_;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  Generator g(o);
  g.Run();
  return 0;
}
