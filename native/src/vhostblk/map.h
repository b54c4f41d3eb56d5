// ClusterMap: guest cluster -> host offset table of a mapped vhost-blk queue
// (see worker.h).  JavaScript (the format driver) writes it; worker threads
// read it concurrently, without a lock.
//
// Two levels: a top-level array sized at construction holds pointers to
// chunks of kChunk entries, allocated lazily by the JS thread and published
// with a release store.  An entry is host offset | kValid | kWritable (host
// offsets are cluster aligned, so the low bits are free); 0 = unmapped.
//
// Bounded: with max_chunks, allocating one more evicts the oldest chunk (its
// clusters are forwarded again until relearned).  An evicted chunk is only
// unpublished, "retired": a worker may be between loading its pointer and
// its entry, or using an entry from it.  JS frees retired chunks (Reclaim)
// after the worker's barrier; until then Invalidate clears their entries too
// and counts them, so a withdrawal still waits for requests that use them.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

namespace Napi {
class Env;
class Object;
class Value;
}  // namespace Napi

namespace spindle {
namespace vhostblk {

class ClusterMap {
 public:
  static constexpr uint64_t kValid = 1, kWritable = 2;
  static constexpr uint32_t kChunkBits = 12;
  static constexpr uint64_t kChunk = 1u << kChunkBits;

  // max_chunks: 0 for no bound.
  ClusterMap(uint32_t cluster_bits, uint64_t clusters, uint64_t max_chunks = 0);
  ~ClusterMap();
  ClusterMap(const ClusterMap&) = delete;
  ClusterMap& operator=(const ClusterMap&) = delete;

  uint32_t bits() const { return bits_; }
  uint64_t clusters() const { return clusters_; }

  // The entry of cluster c, or 0 (also beyond the table).  Any thread.
  uint64_t Lookup(uint64_t c) const {
    if (c >= clusters_) return 0;
    const std::atomic<uint64_t>* chunk = chunks_[c >> kChunkBits].load(std::memory_order_acquire);
    return chunk ? chunk[c & (kChunk - 1)].load(std::memory_order_acquire) : 0;
  }

  // JS thread only (one writer).  Cluster numbers; ranges are clipped to the table.
  void Set(uint64_t first, uint64_t count, uint64_t host, bool writable);
  // Returns how many of them were mapped.
  uint64_t Invalidate(uint64_t first, uint64_t count);
  void Clear();
  uint64_t Size() const { return mapped_; }
  // Evicted chunks not yet freed; Reclaim frees them (JS thread, after a
  // barrier: no request may still use them).
  size_t Retired() const { return retired_.size(); }
  void Reclaim();

 private:
  void Store(uint64_t c, uint64_t entry);
  void Evict();
  uint64_t ClearRetired(uint64_t first, uint64_t end);

  const uint32_t bits_;
  const uint64_t clusters_;
  std::vector<std::atomic<std::atomic<uint64_t>*>> chunks_;
  uint64_t mapped_ = 0;
  const uint64_t max_chunks_;
  std::deque<uint64_t> order_;  // indices of the published chunks, oldest first
  struct RetiredChunk {
    uint64_t index;
    std::atomic<uint64_t>* entries;
  };
  std::vector<RetiredChunk> retired_;
};

// The ClusterMap of a VhostBlkMap JS object, or null (not a VhostBlkMap).
std::shared_ptr<ClusterMap> MapOf(Napi::Env env, Napi::Value v);
// Registers the VhostBlkMap class (called by InitVhostBlk).
void InitVhostBlkMap(Napi::Env env, Napi::Object exports);

}  // namespace vhostblk
}  // namespace spindle
