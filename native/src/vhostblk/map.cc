// ClusterMap (see map.h) and its JS class VhostBlkMap:
//   new VhostBlkMap(clusterBits, lengthBytes, maxBytes?); set(guestOffset,
//   bytes, hostOffset, writable); invalidate(guestOffset, bytes); clear();
//   reclaim(); size; retired.
// The JS object holds the table through a shared_ptr, and so does every queue
// using it, so the table outlives a JS object collected while queues still
// read it.
#include "map.h"

#include <napi.h>

#include <cmath>
#include <string>

namespace spindle {
namespace vhostblk {

namespace {
// ~2^36 clusters: a 128 MiB top level; 32 TiB at 512-byte clusters, 4 PiB at 64 KiB.
constexpr uint64_t kMaxClusters = (uint64_t)1 << 36;
constexpr double kMaxSafe = 9007199254740991.0;  // 2^53 - 1
// Tags VhostBlkMap objects, so addQueue({map}) refuses any other wrapped object.
const napi_type_tag kMapTag = {0x5370696e646c654dULL, 0x6170763142c7a3e1ULL};
}  // namespace

ClusterMap::ClusterMap(uint32_t cluster_bits, uint64_t clusters, uint64_t max_chunks)
    : bits_(cluster_bits), clusters_(clusters), chunks_((clusters + kChunk - 1) >> kChunkBits), max_chunks_(max_chunks) {
  for (auto& c : chunks_) c.store(nullptr, std::memory_order_relaxed);
}

ClusterMap::~ClusterMap() {
  for (auto& c : chunks_) delete[] c.load(std::memory_order_relaxed);
  Reclaim();
}

void ClusterMap::Store(uint64_t c, uint64_t entry) {
  std::atomic<std::atomic<uint64_t>*>& top = chunks_[c >> kChunkBits];
  std::atomic<uint64_t>* chunk = top.load(std::memory_order_relaxed);  // only this thread writes
  if (!chunk) {
    if (entry == 0) return;
    if (max_chunks_ && order_.size() >= max_chunks_) Evict();
    chunk = new std::atomic<uint64_t>[kChunk];
    for (uint64_t i = 0; i < kChunk; i++) chunk[i].store(0, std::memory_order_relaxed);
    top.store(chunk, std::memory_order_release);  // zeroed entries before the pointer
    order_.push_back(c >> kChunkBits);
  }
  std::atomic<uint64_t>& e = chunk[c & (kChunk - 1)];
  uint64_t old = e.load(std::memory_order_relaxed);
  if (!old && entry) mapped_++;
  if (old && !entry) mapped_--;
  e.store(entry, std::memory_order_release);
}

void ClusterMap::Set(uint64_t first, uint64_t count, uint64_t host, bool writable) {
  uint64_t flags = kValid | (writable ? kWritable : 0);
  for (uint64_t i = 0; i < count && first + i < clusters_; i++) Store(first + i, (host + (i << bits_)) | flags);
}

uint64_t ClusterMap::Invalidate(uint64_t first, uint64_t count) {
  uint64_t before = mapped_;
  uint64_t end = first + count < clusters_ ? first + count : clusters_;
  uint64_t retired = retired_.empty() ? 0 : ClearRetired(first, end);
  for (uint64_t c = first; c < end;) {
    if (!chunks_[c >> kChunkBits].load(std::memory_order_relaxed)) {
      c = ((c >> kChunkBits) + 1) << kChunkBits;  // nothing mapped in this chunk
      continue;
    }
    Store(c++, 0);
  }
  return before - mapped_ + retired;
}

// Unpublishes the oldest chunk; its memory waits in retired_ for Reclaim.
void ClusterMap::Evict() {
  uint64_t index = order_.front();
  order_.pop_front();
  std::atomic<std::atomic<uint64_t>*>& top = chunks_[index];
  std::atomic<uint64_t>* chunk = top.load(std::memory_order_relaxed);
  for (uint64_t i = 0; i < kChunk; i++)
    if (chunk[i].load(std::memory_order_relaxed)) mapped_--;
  top.store(nullptr, std::memory_order_release);
  retired_.push_back({index, chunk});
}

// Clears the entries of [first, end) in retired chunks; returns how many were set.
uint64_t ClusterMap::ClearRetired(uint64_t first, uint64_t end) {
  uint64_t n = 0;
  for (RetiredChunk& r : retired_) {
    uint64_t lo = r.index << kChunkBits, hi = lo + kChunk;
    for (uint64_t c = first > lo ? first : lo; c < end && c < hi; c++) {
      if (r.entries[c - lo].load(std::memory_order_relaxed)) n++;
      r.entries[c - lo].store(0, std::memory_order_release);
    }
  }
  return n;
}

void ClusterMap::Reclaim() {
  for (RetiredChunk& r : retired_) delete[] r.entries;
  retired_.clear();
}

void ClusterMap::Clear() { Invalidate(0, clusters_); }

namespace {

class VhostBlkMap : public Napi::ObjectWrap<VhostBlkMap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "VhostBlkMap",
                       {InstanceMethod<&VhostBlkMap::Set>("set"),
                        InstanceMethod<&VhostBlkMap::Invalidate>("invalidate"),
                        InstanceMethod<&VhostBlkMap::Clear>("clear"),
                        InstanceMethod<&VhostBlkMap::Reclaim>("reclaim"),
                        InstanceAccessor<&VhostBlkMap::GetSize>("size"),
                        InstanceAccessor<&VhostBlkMap::GetRetired>("retired")});
  }

  VhostBlkMap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<VhostBlkMap>(info) {
    Napi::Env env = info.Env();
    double bits, length;
    if (!Num(env, info[0], "clusterBits", &bits) || !Num(env, info[1], "lengthBytes", &length)) return;
    if (bits < 9 || bits > 21) {
      Range(env, "clusterBits must be in [9, 21]");
      return;
    }
    uint64_t cluster = (uint64_t)1 << (uint32_t)bits;
    uint64_t clusters = ((uint64_t)length + cluster - 1) >> (uint32_t)bits;
    if (clusters > kMaxClusters) {
      Range(env, "the table would have more than 2^36 clusters");
      return;
    }
    // maxBytes: a bound on the entries' memory (whole chunks of kChunk 8-byte entries; 0 or absent: none).
    double max_bytes = 0;
    if (!info[2].IsUndefined() && !Num(env, info[2], "maxBytes", &max_bytes)) return;
    uint64_t chunk_bytes = ClusterMap::kChunk * sizeof(uint64_t);
    uint64_t max_chunks = max_bytes > 0 ? ((uint64_t)max_bytes + chunk_bytes - 1) / chunk_bytes : 0;
    map_ = std::make_shared<ClusterMap>((uint32_t)bits, clusters, max_chunks);
    napi_type_tag_object(env, info.This(), &kMapTag);
  }

  std::shared_ptr<ClusterMap> map_;

 private:
  static bool Range(Napi::Env env, const std::string& msg) {
    Napi::RangeError::New(env, "VhostBlkMap: " + msg).ThrowAsJavaScriptException();
    return false;
  }

  // A non-negative safe integer, or an exception.
  static bool Num(Napi::Env env, const Napi::Value& v, const char* what, double* out) {
    if (!v.IsNumber()) {
      Napi::TypeError::New(env, std::string("VhostBlkMap: ") + what + " must be a number").ThrowAsJavaScriptException();
      return false;
    }
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= kMaxSafe) || std::floor(d) != d)
      return Range(env, std::string(what) + " must be an integer in [0, 2^53), got " + std::to_string(d));
    *out = d;
    return true;
  }

  bool Aligned(Napi::Env env, double v, const char* what) {
    uint64_t mask = ((uint64_t)1 << map_->bits()) - 1;
    if (((uint64_t)v & mask) == 0) return true;
    return Range(env, std::string(what) + " " + std::to_string((uint64_t)v) + " is not a multiple of the cluster size " +
                          std::to_string(mask + 1));
  }

  // set(guestOffset, bytes, hostOffset, writable): all cluster aligned.
  Napi::Value Set(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    double guest, bytes, host;
    if (!map_ || !Num(env, info[0], "guestOffset", &guest) || !Num(env, info[1], "bytes", &bytes) ||
        !Num(env, info[2], "hostOffset", &host) || !Aligned(env, guest, "set: guestOffset") ||
        !Aligned(env, bytes, "set: bytes") || !Aligned(env, host, "set: hostOffset"))
      return env.Undefined();
    uint32_t b = map_->bits();
    map_->Set((uint64_t)guest >> b, (uint64_t)bytes >> b, (uint64_t)host, info[3].ToBoolean().Value());
    return env.Undefined();
  }

  // invalidate(guestOffset, bytes): every cluster overlapping the range.
  Napi::Value Invalidate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    double guest, bytes;
    if (!map_ || !Num(env, info[0], "guestOffset", &guest) || !Num(env, info[1], "bytes", &bytes) || bytes == 0)
      return env.Undefined();
    uint32_t b = map_->bits();
    uint64_t first = (uint64_t)guest >> b, last = ((uint64_t)guest + (uint64_t)bytes - 1) >> b;
    return Napi::Number::New(env, (double)map_->Invalidate(first, last - first + 1));
  }

  Napi::Value Clear(const Napi::CallbackInfo& info) {
    if (map_) map_->Clear();
    return info.Env().Undefined();
  }

  Napi::Value Reclaim(const Napi::CallbackInfo& info) {
    if (map_) map_->Reclaim();
    return info.Env().Undefined();
  }

  Napi::Value GetRetired(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), map_ ? (double)map_->Retired() : 0);
  }

  Napi::Value GetSize(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), map_ ? (double)map_->Size() : 0);
  }
};

}  // namespace

std::shared_ptr<ClusterMap> MapOf(Napi::Env env, Napi::Value v) {
  if (!v.IsObject()) return nullptr;
  bool tagged = false;
  if (napi_check_object_type_tag(env, v, &kMapTag, &tagged) != napi_ok || !tagged) return nullptr;
  VhostBlkMap* m = VhostBlkMap::Unwrap(v.As<Napi::Object>());
  return m ? m->map_ : nullptr;
}

void InitVhostBlkMap(Napi::Env env, Napi::Object exports) { exports.Set("VhostBlkMap", VhostBlkMap::Define(env)); }

}  // namespace vhostblk
}  // namespace spindle
