// B_cat (B packed as [d_out, E·r]) and G = B_catᵀ B_cat (float64), kept across calls while
// B is unchanged. Decoding and inference reuse them call after call; in training the
// backward reuses the forward's.
//
// "Unchanged" is checked on the contents, bitwise: a lookup compares B with the entry's
// B_cat where that is B's packed copy in B's dtype, else with a copy of B the entry keeps
// (few-token calls make no B_cat; 16-bit weights pack into float32; one expert's B_cat
// can be a view of B). Version counters would miss edits made through `.data`
// (gradcheck's perturbations, hand-written optimizers, EMA updates), and a stale G is a
// silent wrong answer. The compare reads d_out·E·r values twice, in ranges across the
// intra-op threads; forming G costs E·r times that. Entries are found by B's TensorImpl
// (a weak reference, so freed weights drop out) and must match its dtype, device, sizes
// and strides too.
// Only CPU weights are cached (see `cacheable`).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace omoe {
namespace weight_cache {

struct Stats {
  int64_t hits = 0, misses = 0, entries = 0, bytes = 0;
  int64_t packed_bytes = 0;  // of those bytes, the B_cats held
};

// What the cache holds for B: whether B was used before with exactly these contents,
// its B_cat if one was made (few-token calls on the CPU make none), and G if it was formed
// since (undefined otherwise).
struct Found {
  bool seen = false;
  at::Tensor B_cat, G;
};

// Whether same(i0, i1) holds for every range of [0, n), ranges of at least `grain` taken
// by the intra-op threads: a compare of a large B reads it at the speed of every core the
// call's own GEMMs use. A range that finds a difference stops the ranges not yet started.
template <typename Same>
bool all_ranges(int64_t n, int64_t grain, const Same& same) {
  std::atomic<bool> differ{false};
  at::parallel_for(0, n, std::max<int64_t>(grain, 1), [&](int64_t i0, int64_t i1) {
    if (!differ.load(std::memory_order_relaxed) && !same(i0, i1))
      differ.store(true, std::memory_order_relaxed);
  });
  return !differ.load();
}

// Bytes of a compare below which one thread does it all (a range's start-up cost).
constexpr int64_t kCompareGrainBytes = 64 << 10;

inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {  // CPU tensors
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type() || a.device() != b.device())
    return false;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const auto* x = static_cast<const unsigned char*>(ac.data_ptr());
  const auto* y = static_cast<const unsigned char*>(bc.data_ptr());
  return all_ranges(int64_t(ac.nbytes()), kCompareGrainBytes, [&](int64_t i0, int64_t i1) {
    return std::memcmp(x + i0, y + i0, size_t(i1 - i0)) == 0;
  });
}

// Whether B_cat is B ([E, d_out, r]) packed as [d_out, E·r] in B's dtype, in storage of its
// own (with one expert the packing can be a view of B, which no compare could trust).
inline bool packs(const at::Tensor& B, const at::Tensor& B_cat) {
  return B_cat.defined() && B.dim() == 3 && B_cat.dim() == 2 && B_cat.is_contiguous() &&
         B_cat.scalar_type() == B.scalar_type() && B_cat.device() == B.device() &&
         B_cat.size(0) == B.size(1) && B_cat.size(1) == B.size(0) * B.size(2) &&
         B_cat.has_storage() && !B_cat.storage().is_alias_of(B.storage());
}

// The bits of rows x and y (bytes a multiple of W) that differ, OR-ed into diff, W bytes
// at a time (two 8-byte words of a vector register, or four).
template <int W>
inline void or_differences(const unsigned char* x, const unsigned char* y, int64_t bytes,
                           uint64_t (&diff)[W / 8]) {
  for (int64_t at = 0; at < bytes; at += W)
    for (int w = 0; w < W / 8; ++w) {
      uint64_t u, v;
      std::memcpy(&u, x + at + 8 * w, 8);
      std::memcpy(&v, y + at + 8 * w, 8);
      diff[w] |= u ^ v;
    }
}

// B against B_cat, its packed copy (packs), bitwise: row o of B_cat is B[i, o, :] for
// every i in turn. Rows of a multiple of 32 (or 8) bytes are compared 32 (8) at a time.
inline bool equals_packed(const at::Tensor& B, const at::Tensor& B_cat) {
  if (!packs(B, B_cat)) return false;
  const at::Tensor Bc = B.contiguous();
  const int64_t E = B.size(0), d_out = B.size(1);
  const int64_t row = B.size(2) * int64_t(B.element_size());  // bytes of one r-row
  const auto* b = static_cast<const unsigned char*>(Bc.data_ptr());
  const auto* p = static_cast<const unsigned char*>(B_cat.data_ptr());
  const auto same_rows = [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const unsigned char* packed_row = p + o * E * row;
      if (row % 32 == 0) {
        uint64_t diff[4] = {};
        for (int64_t i = 0; i < E; ++i)
          or_differences<32>(b + (i * d_out + o) * row, packed_row + i * row, row, diff);
        if ((diff[0] | diff[1] | diff[2] | diff[3]) != 0) return false;
      } else if (row % 8 == 0) {
        uint64_t diff[1] = {};
        for (int64_t i = 0; i < E; ++i)
          or_differences<8>(b + (i * d_out + o) * row, packed_row + i * row, row, diff);
        if (diff[0] != 0) return false;
      } else {
        for (int64_t i = 0; i < E; ++i)
          if (std::memcmp(b + (i * d_out + o) * row, packed_row + i * row, size_t(row)) != 0)
            return false;
      }
    }
    return true;
  };
  return all_ranges(d_out, kCompareGrainBytes / (E * row), same_rows);
}

class GramCache {
 public:
  Found find(const at::Tensor& B) {
    if (!cacheable(B)) return {};
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(B.unsafeGetTensorImpl());
    if (it == entries_.end() || !it->second.matches(B)) {
      ++stats_.misses;
      return {};
    }
    it->second.last_use = ++clock_;
    if (it->second.G.defined()) ++stats_.hits;
    else ++stats_.misses;
    return {true, it->second.B_cat, it->second.G};
  }

  // Remembers B's contents (so a later call knows B is being reused) with its B_cat and G
  // when given: as B_cat where that is B's packed copy (packs), else as a copy of B.
  void remember(const at::Tensor& B, const at::Tensor& B_cat,
                const at::Tensor& G = at::Tensor()) {
    if (!cacheable(B)) return;
    Entry entry{
        c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(B.getIntrusivePtr()),
        packs(B, B_cat) ? at::Tensor() : B.clone(at::MemoryFormat::Contiguous),
        B_cat,
        G,
        0,
        0};
    entry.bytes = (entry.copy.defined() ? int64_t(entry.copy.nbytes()) : 0) +
                  (B_cat.defined() ? int64_t(B_cat.nbytes()) : 0) +
                  (G.defined() ? int64_t(G.nbytes()) : 0);
    std::lock_guard<std::mutex> lock(mutex_);
    erase_if([](const Entry& e) { return e.impl.expired(); });  // weights freed since
    if (auto old = entries_.find(B.unsafeGetTensorImpl()); old != entries_.end()) {
      bytes_ -= old->second.bytes;
      entries_.erase(old);
    }
    if (entry.bytes > limit_bytes()) return;
    while (bytes_ + entry.bytes > limit_bytes() && !entries_.empty()) {  // least recently used
      auto lru = entries_.begin();
      for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (it->second.last_use < lru->second.last_use) lru = it;
      bytes_ -= lru->second.bytes;
      entries_.erase(lru);
    }
    entry.last_use = ++clock_;
    bytes_ += entry.bytes;
    entries_.emplace(B.unsafeGetTensorImpl(), std::move(entry));
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    Stats s = stats_;
    s.entries = int64_t(entries_.size());
    s.bytes = bytes_;
    for (const auto& kv : entries_)
      if (kv.second.B_cat.defined()) s.packed_bytes += int64_t(kv.second.B_cat.nbytes());
    return s;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    bytes_ = 0;
    stats_ = Stats{};
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
    at::Tensor copy;  // B's contents when the entry was made; undefined: B_cat holds them
    at::Tensor B_cat, G;
    int64_t bytes;
    uint64_t last_use;
    bool matches(const at::Tensor& B) const {
      if (impl.expired()) return false;
      return copy.defined() ? bitwise_equal(B, copy) : equals_packed(B, B_cat);
    }
  };

  // CPU tensors only: on a GPU the bitwise compare would return its answer to the host,
  // a synchronisation in every call.
  static bool cacheable(const at::Tensor& B) {
    return B.defined() && B.is_cpu() && B.has_storage() && B.numel() > 0;
  }
  static int64_t limit_bytes() {
    static const int64_t limit = [] {
      const char* mb = std::getenv("OMOE_WEIGHT_CACHE_MB");
      return (mb ? std::atoll(mb) : 256) * (int64_t(1) << 20);
    }();
    return limit;
  }

  template <typename Pred>
  void erase_if(Pred pred) {
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (pred(it->second)) {
        bytes_ -= it->second.bytes;
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }

  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  int64_t bytes_ = 0;
  uint64_t clock_ = 0;
  Stats stats_;
};

// The one cache of the process (the ops are process-wide too).
inline GramCache& instance() {
  static GramCache cache;
  return cache;
}

}  // namespace weight_cache
}  // namespace omoe
