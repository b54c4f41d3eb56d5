// Argument parsing shared by the VhostBlkWorker JS class (napi.cc): numbers,
// memory spans, and addQueue's options turned into a Queue.
#pragma once

#include <napi.h>

#include <string>
#include <vector>

#include "worker.h"

namespace spindle {
namespace vhostblk {

enum class Err { kError, kRange, kType };

// Throws "VhostBlkWorker: <msg>"; returns undefined.
Napi::Value Throw(Napi::Env env, const std::string& msg, Err kind = Err::kError);

// An integer number in [lo, hi].
bool Int(const Napi::Value& v, double lo, double hi, double* out);

// [start, end) spans inside a layout of `size` bytes, or an exception.
bool ParseSpans(Napi::Env env, const Napi::Value& v, double size, std::vector<Span>* out);

// The worker's default guest memory (setMemory).
struct DefaultMemory {
  bool set = false;
  uint8_t* mem = nullptr;
  std::vector<Span> spans;
};

// What the caller must keep alive while the queue is attached.
struct QueueRefs {
  Napi::Object memory;  // the queue's own layout ArrayBuffer, or empty (the default)
  Napi::Object ring;    // forward.ring, or empty
  Napi::Object inflight;  // inflight.region, or empty
};

// A new Queue from addQueue(index, options) with its fds dup'd, or nullptr
// with an exception pending.
Queue* NewQueue(Napi::Env env, uint32_t index, Napi::Object o, const DefaultMemory& def, QueueRefs* refs);

// Closes the fds a Queue holds (one that never reached the worker).
void CloseFds(Queue* q);

}  // namespace vhostblk
}  // namespace spindle
