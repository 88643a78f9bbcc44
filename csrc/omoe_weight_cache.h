// Tensors that the weights alone determine, kept across calls while the weights are
// unchanged: the packed shrink operand [A_cat; W], the packed expand operand B_cat, and
// G = B_catᵀ B_cat (float64). Decoding and inference reuse them call after call; in
// training the backward reuses the forward's G (same weights until the optimizer step).
//
// An entry is valid only for exactly the tensors it was made from. Each weight is
// fingerprinted by weak references to its TensorImpl and StorageImpl (a freed tensor or
// storage never matches, even if a new one lands at the same address), its version counter
// (every in-place edit: optimizer steps, load_state_dict's copy_, `with no_grad: w.mul_()`),
// its data pointer, sizes, strides, offset, dtype and device (`.to()`, `p.data = …`).
// Inference tensors have no version counter and are never cached.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace omoe {
namespace weight_cache {

enum class Kind : int { kPackedShrink = 0, kPackedExpand = 1, kGram = 2 };

class Fingerprint {
 public:
  explicit Fingerprint(const at::Tensor& t)
      : impl_(t.getIntrusivePtr()),
        storage_(t.storage().getWeakStorageImpl()),
        version_(t._version()),
        data_(t.data_ptr()),
        sizes_(t.sizes().vec()),
        strides_(t.strides().vec()),
        offset_(t.storage_offset()),
        dtype_(t.scalar_type()),
        device_(t.device()) {}

  bool matches(const at::Tensor& t) const {
    if (impl_.expired() || storage_.expired()) return false;
    if (impl_._unsafe_get_target() != t.unsafeGetTensorImpl()) return false;
    if (storage_._unsafe_get_target() != t.storage().unsafeGetStorageImpl()) return false;
    return t._version() == version_ && t.data_ptr() == data_ && t.sizes() == sizes_ &&
           t.strides() == strides_ && t.storage_offset() == offset_ &&
           t.scalar_type() == dtype_ && t.device() == device_;
  }
  bool expired() const { return impl_.expired() || storage_.expired(); }

 private:
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl_;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage_;
  int64_t version_;
  const void* data_;
  std::vector<int64_t> sizes_, strides_;
  int64_t offset_;
  at::ScalarType dtype_;
  at::Device device_;
};

struct Stats {
  int64_t hits = 0, misses = 0, entries = 0, bytes = 0;
};

class Cache {
 public:
  // The value for `kind` made from `weights` in `dtype`, made by `make` on a miss (and
  // kept when it fits the byte limit). Never hands out a tensor of other weights.
  at::Tensor get(Kind kind, std::initializer_list<at::Tensor> weights, at::ScalarType dtype,
                 const std::function<at::Tensor()>& make) {
    if (!cacheable(weights)) return make();
    const Key key = key_of(kind, weights, dtype);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = entries_.find(key);
      if (it != entries_.end() && it->second.matches(weights)) {
        ++stats_.hits;
        it->second.last_use = ++clock_;
        return it->second.value;
      }
      ++stats_.misses;
    }
    at::Tensor value = make();
    insert(key, weights, value);
    return value;
  }

  // The cached value if there is a valid one, else an undefined tensor (no counting).
  at::Tensor find(Kind kind, std::initializer_list<at::Tensor> weights, at::ScalarType dtype) {
    if (!cacheable(weights)) return {};
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(key_of(kind, weights, dtype));
    return it != entries_.end() && it->second.matches(weights) ? it->second.value : at::Tensor();
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    Stats s = stats_;
    s.entries = int64_t(entries_.size());
    s.bytes = bytes_;
    return s;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    bytes_ = 0;
    stats_ = Stats{};
  }

 private:
  struct Key {
    const void* first_impl;
    int kind;
    int dtype;
    bool operator==(const Key& o) const {
      return first_impl == o.first_impl && kind == o.kind && dtype == o.dtype;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.first_impl) ^ (size_t(k.kind) << 1) ^
             (size_t(k.dtype) << 4);
    }
  };
  struct Entry {
    std::vector<Fingerprint> weights;
    at::Tensor value;
    int64_t bytes;
    uint64_t last_use;
    bool matches(std::initializer_list<at::Tensor> ws) const {
      if (ws.size() != weights.size()) return false;
      size_t n = 0;
      for (const auto& w : ws)
        if (!weights[n++].matches(w)) return false;
      return true;
    }
    bool expired() const {
      for (const auto& w : weights)
        if (w.expired()) return true;
      return false;
    }
  };

  static bool cacheable(std::initializer_list<at::Tensor> weights) {
    for (const auto& w : weights)
      if (!w.defined() || w.is_inference() || !w.has_storage()) return false;
    return true;
  }
  static Key key_of(Kind kind, std::initializer_list<at::Tensor> weights, at::ScalarType dtype) {
    return Key{weights.begin()->unsafeGetTensorImpl(), int(kind), int(dtype)};
  }
  static int64_t limit_bytes() {
    static const int64_t limit = [] {
      const char* mb = std::getenv("OMOE_WEIGHT_CACHE_MB");
      return (mb ? std::atoll(mb) : 256) * (int64_t(1) << 20);
    }();
    return limit;
  }

  void insert(const Key& key, std::initializer_list<at::Tensor> weights, const at::Tensor& value) {
    const int64_t bytes = int64_t(value.nbytes());
    std::lock_guard<std::mutex> lock(mutex_);
    erase_if([](const Entry& e) { return e.expired(); });  // weights that died since
    auto old = entries_.find(key);
    if (old != entries_.end()) {
      bytes_ -= old->second.bytes;
      entries_.erase(old);
    }
    if (bytes > limit_bytes()) return;
    while (bytes_ + bytes > limit_bytes() && !entries_.empty()) {  // least recently used
      auto lru = entries_.begin();
      for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (it->second.last_use < lru->second.last_use) lru = it;
      bytes_ -= lru->second.bytes;
      entries_.erase(lru);
    }
    Entry entry{{}, value, bytes, ++clock_};
    for (const auto& w : weights) entry.weights.emplace_back(w);
    entries_.emplace(key, std::move(entry));
    bytes_ += bytes;
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
  std::unordered_map<Key, Entry, KeyHash> entries_;
  int64_t bytes_ = 0;
  uint64_t clock_ = 0;
  Stats stats_;
};

// The one cache of the process (the ops are process-wide too).
inline Cache& instance() {
  static Cache cache;
  return cache;
}

}  // namespace weight_cache
}  // namespace omoe
