// What both load generators (openloop.cc, openstream.cc) report with: gRPC's code names, a
// bounded latency histogram, and the few JSON helpers their one-line reports need.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace loadgen {

// gRPC's own spelling of the status codes, indexed by code.
const char* const kCodeNames[] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED"};
constexpr int kNumCodes = 17;
static_assert(sizeof(kCodeNames) / sizeof(kCodeNames[0]) == kNumCodes, "one name per code");

// Log-linear histogram of microseconds: exact below 256 us, then 128 buckets per power of two
// (under 1% error), bounded memory whatever the run length. Values from 2^40 us are clamped
// to 2^40 - 1, the last value the buckets hold (the clamp was 2^41 - 1, whose buckets lie past
// the end of counts_: a write out of bounds).
class Histogram {
 public:
  static constexpr int kSubBits = 7;
  static constexpr int kSub = 1 << kSubBits;
  static constexpr int kMaxMsb = 40;
  static constexpr int kSize = (kMaxMsb - kSubBits + 1) * kSub;

  Histogram() : counts_(kSize, 0) {}

  void Add(int64_t us) {
    if (us < 0) us = 0;
    const int64_t cap = (int64_t{1} << kMaxMsb) - 1;
    if (us > cap) us = cap;
    ++counts_[Index(static_cast<uint64_t>(us))];
    ++total_;
    max_us_ = std::max(max_us_, us);
  }

  void Merge(const Histogram& other) {
    for (int i = 0; i < kSize; ++i) counts_[i] += other.counts_[i];
    total_ += other.total_;
    max_us_ = std::max(max_us_, other.max_us_);
  }

  // Milliseconds at quantile q (a bucket's midpoint); NaN when empty.
  double QuantileMs(double q) const {
    if (total_ == 0) return NAN;
    uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(total_));
    if (rank >= total_) rank = total_ - 1;
    uint64_t seen = 0;
    for (int i = 0; i < kSize; ++i) {
      seen += counts_[i];
      if (seen > rank) return std::min(Midpoint(i), static_cast<double>(max_us_)) / 1000.0;
    }
    return max_us_ / 1000.0;
  }

  uint64_t total() const { return total_; }
  double MaxMs() const { return total_ ? max_us_ / 1000.0 : NAN; }

 private:
  static int Index(uint64_t v) {
    if (v < 2 * kSub) return static_cast<int>(v);
    const int msb = 63 - __builtin_clzll(v);
    const int shift = msb - kSubBits;
    return (shift + 1) * kSub + static_cast<int>((v >> shift) - kSub);
  }
  static double Midpoint(int i) {
    if (i < 2 * kSub) return i;
    const int shift = i / kSub - 1;
    const double low = static_cast<double>((i % kSub + kSub)) * std::ldexp(1.0, shift);
    return low + std::ldexp(1.0, shift) / 2.0;
  }

  std::vector<uint64_t> counts_;
  uint64_t total_ = 0;
  int64_t max_us_ = 0;
};

inline std::string JsonEscape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

inline std::string Num(double x) {
  if (std::isnan(x)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", x);
  return buf;
}

inline std::string Quantiles(const Histogram& h) {
  return "{\"p50\": " + Num(h.QuantileMs(0.5)) + ", \"p90\": " + Num(h.QuantileMs(0.9)) +
         ", \"p99\": " + Num(h.QuantileMs(0.99)) + ", \"max\": " + Num(h.MaxMs()) +
         ", \"n\": " + std::to_string(h.total()) + "}";
}

// Outcomes seen by one thread; merged once the run is over. Latencies are kept from the
// request's scheduled time (what a caller waits) and from its actual send.
struct Outcomes {
  std::mutex mu;  // uncontended except when a run ends with requests still outstanding
  uint64_t codes[kNumCodes] = {};
  std::map<int, std::string> details;  // first message per code
  Histogram ok_sched, ok_send, rejected;
  Histogram by_code[kNumCodes];  // every outcome, from the scheduled time: when do errors come?

  // Callers hold mu.
  void Add(int code, int64_t from_sched_us, int64_t from_send_us, const std::string& detail) {
    if (code < 0 || code >= kNumCodes) code = 2;  // UNKNOWN
    ++codes[code];
    by_code[code].Add(from_sched_us);
    if (code == 0) {
      ok_sched.Add(from_sched_us);
      ok_send.Add(from_send_us);
    } else if (code == 8) {  // RESOURCE_EXHAUSTED: a refusal, whose speed is a target
      rejected.Add(from_sched_us);
    }
    if (code != 0 && !details.count(code)) details[code] = detail;
  }

  void Merge(Outcomes& other) {
    std::lock_guard<std::mutex> lock(other.mu);
    for (int c = 0; c < kNumCodes; ++c) codes[c] += other.codes[c];
    for (const auto& d : other.details) details.emplace(d.first, d.second);
    ok_sched.Merge(other.ok_sched);
    ok_send.Merge(other.ok_send);
    rejected.Merge(other.rejected);
    for (int c = 0; c < kNumCodes; ++c) by_code[c].Merge(other.by_code[c]);
  }

  // The report's fields after its header: "codes", "details", "codes_ms", "ok_ms",
  // "ok_ms_from_send", "rejected_ms" (a fragment that starts with ", ").
  std::string Json() const {
    std::string out = ", \"codes\": {";
    bool first = true;
    for (int c = 0; c < kNumCodes; ++c) {
      if (!codes[c]) continue;
      out += std::string(first ? "" : ", ") + "\"" + kCodeNames[c] + "\": " +
             std::to_string(codes[c]);
      first = false;
    }
    out += "}, \"details\": {";
    first = true;
    for (const auto& d : details) {
      out += std::string(first ? "" : ", ") + "\"" + kCodeNames[d.first] + "\": \"" +
             JsonEscape(d.second.substr(0, 300)) + "\"";
      first = false;
    }
    out += "}, \"codes_ms\": {";
    first = true;
    for (int c = 0; c < kNumCodes; ++c) {
      if (!by_code[c].total()) continue;
      out += std::string(first ? "" : ", ") + "\"" + kCodeNames[c] + "\": " + Quantiles(by_code[c]);
      first = false;
    }
    return out + "}, \"ok_ms\": " + Quantiles(ok_sched) + ", \"ok_ms_from_send\": " +
           Quantiles(ok_send) + ", \"rejected_ms\": " + Quantiles(rejected);
  }
};

}  // namespace loadgen
