// addQueue's options for the VhostBlkWorker JS class (see napi_queue.h).
#include "napi_queue.h"

#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

namespace spindle {
namespace vhostblk {

namespace {
constexpr double kMaxSafe = 9007199254740991.0;  // 2^53 - 1

int DupFd(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

// The forward option of a queue of `num` entries into q (fds not yet dup'd):
// false with an exception pending.
bool ParseForward(Napi::Env env, Napi::Object o, Queue* q, double* notify, double* complete, QueueRefs* refs) {
  Napi::Value mv = o.Get("map"), fv = o.Get("forward");
  bool has_map = !mv.IsUndefined() && !mv.IsNull(), has_fwd = !fv.IsUndefined() && !fv.IsNull();
  if (has_map) {
    q->map = MapOf(env, mv);
    if (!q->map) return Throw(env, "addQueue: map must be a VhostBlkMap", Err::kType), false;
    if (!has_fwd) return Throw(env, "addQueue: a queue with a map needs forward: {ring, notifyFd, completeFd}", Err::kType), false;
  }
  if (!has_fwd) return true;
  if (!fv.IsObject()) return Throw(env, "addQueue: forward must be {ring, notifyFd, completeFd}", Err::kType), false;
  Napi::Object f = fv.As<Napi::Object>();
  Napi::Value rv = f.Get("ring");
  if (!rv.IsTypedArray() || rv.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    return Throw(env, "addQueue: forward.ring must be an Int32Array", Err::kType), false;
  Napi::Int32Array ring = rv.As<Napi::Int32Array>();
  size_t need = kFwdEntries + 3 * (size_t)q->num;
  if (ring.ElementLength() < need || ring.Data() == nullptr)
    return Throw(env, "addQueue: forward.ring must hold at least 16 + 3 * num = " + std::to_string(need) + " Int32s",
                 Err::kRange), false;
  if (!Int(f.Get("notifyFd"), 0, INT_MAX, notify) || !Int(f.Get("completeFd"), 0, INT_MAX, complete))
    return Throw(env, "addQueue: forward.notifyFd/completeFd must be fds", Err::kRange), false;
  q->fring = (uint32_t*)ring.Data();
  // The worker's counters continue from the ring (a fresh ring: 0).
  q->fwd_prod = __atomic_load_n(q->fring + kFwdProd, __ATOMIC_ACQUIRE);
  q->cpl_cons = __atomic_load_n(q->fring + kCplCons, __ATOMIC_ACQUIRE);
  refs->ring = ring;
  return true;
}
// The inflight option (vhost-user inflight tracking) into q: false with an
// exception pending.
bool ParseInflight(Napi::Env env, Napi::Object o, Queue* q, QueueRefs* refs) {
  Napi::Value v = o.Get("inflight");
  if (v.IsUndefined() || v.IsNull()) return true;
  if (!v.IsObject()) return Throw(env, "addQueue: inflight must be {region, counter, resubmit}", Err::kType), false;
  Napi::Object f = v.As<Napi::Object>();
  Napi::Value rv = f.Get("region");
  if (!rv.IsTypedArray() || rv.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    return Throw(env, "addQueue: inflight.region must be a Uint8Array", Err::kType), false;
  Napi::Uint8Array region = rv.As<Napi::Uint8Array>();
  size_t need = kLogHeader + kLogDesc * (size_t)q->num;
  if (region.ByteLength() < need || region.Data() == nullptr || (uintptr_t)region.Data() % 8 != 0)
    return Throw(env, "addQueue: inflight.region must be 8-byte aligned and hold 16 + 16 * num = " +
                 std::to_string(need) + " bytes", Err::kRange), false;
  double counter;
  if (!Int(f.Get("counter"), 0, kMaxSafe, &counter))
    return Throw(env, "addQueue: inflight.counter must be a non-negative integer", Err::kRange), false;
  Napi::Value lv = f.Get("resubmit");
  if (!lv.IsArray()) return Throw(env, "addQueue: inflight.resubmit must be an array of heads", Err::kType), false;
  Napi::Array list = lv.As<Napi::Array>();
  if (list.Length() > q->num) return Throw(env, "addQueue: inflight.resubmit is longer than the queue", Err::kRange), false;
  std::vector<uint8_t> seen(q->num, 0);
  for (uint32_t i = 0; i < list.Length(); i++) {
    double h;
    if (!Int(list[i], 0, q->num - 1, &h) || seen[(uint32_t)h]++)
      return Throw(env, "addQueue: inflight.resubmit[" + std::to_string(i) + "] is not a distinct head below num",
                   Err::kRange), false;
    q->resubmit.push_back((uint16_t)h);
  }
  q->ilog = region.Data();
  q->icounter = (uint64_t)counter;
  q->ibatch.reserve(q->num);
  refs->inflight = region;
  return true;
}
}  // namespace

Napi::Value Throw(Napi::Env env, const std::string& msg, Err kind) {
  std::string m = "VhostBlkWorker: " + msg;
  if (kind == Err::kRange)
    Napi::RangeError::New(env, m).ThrowAsJavaScriptException();
  else if (kind == Err::kType)
    Napi::TypeError::New(env, m).ThrowAsJavaScriptException();
  else
    Napi::Error::New(env, m).ThrowAsJavaScriptException();
  return env.Undefined();
}

bool Int(const Napi::Value& v, double lo, double hi, double* out) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= lo && d <= hi) || std::floor(d) != d) return false;
  *out = d;
  return true;
}

bool ParseSpans(Napi::Env env, const Napi::Value& v, double size, std::vector<Span>* out) {
  if (!v.IsArray()) return Throw(env, "spans must be [start, end] pairs"), false;
  Napi::Array arr = v.As<Napi::Array>();
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value e = arr[i];
    if (!e.IsArray()) return Throw(env, "spans must be [start, end] pairs"), false;
    Napi::Array p = e.As<Napi::Array>();
    double s, t;
    if (p.Length() != 2 || !Int(p[0u], 0, size, &s) || !Int(p[1u], 0, size, &t) || !(s < t))
      return Throw(env, "span " + std::to_string(i) + " is not inside the layout", Err::kRange), false;
    out->push_back({(uint64_t)s, (uint64_t)t});
  }
  return true;
}

void CloseFds(Queue* q) {
  for (int* f : {&q->kick_fd, &q->fd, &q->call_fd, &q->err_fd, &q->notify_fd, &q->complete_fd}) {
    if (*f >= 0) close(*f);
    *f = -1;
  }
}

// addQueue(index, {memory?, spans?, num, desc, avail, used, lastAvail, usedIdx,
//   eventIdx, kickFd, callFd, errFd?, fd, blockSize?, capacitySectors, readOnly, serial, writeCache,
//   discard?, writeZeroes?, unmap?, map?, forward?: {ring, notifyFd, completeFd},
//   inflight?: {region, counter, resubmit}})
Queue* NewQueue(Napi::Env env, uint32_t index, Napi::Object o, const DefaultMemory& def, QueueRefs* refs) {
  // The queue's own memory ({memory, spans}), or the worker's (setMemory).
  Napi::Value mv = o.Get("memory");
  std::vector<Span> qspans;
  uint8_t* qmem;
  if (mv.IsArrayBuffer()) {
    Napi::ArrayBuffer ab = mv.As<Napi::ArrayBuffer>();
    if (!ParseSpans(env, o.Get("spans"), (double)ab.ByteLength(), &qspans)) return nullptr;
    if (ab.Data() == nullptr || qspans.empty()) return Throw(env, "addQueue: the queue's memory is empty"), nullptr;
    qmem = (uint8_t*)ab.Data();
    refs->memory = ab;
  } else {
    if (!def.set) return Throw(env, "addQueue before setMemory"), nullptr;
    qspans = def.spans;
    qmem = def.mem;
  }
  double num, desc, avail, used, last, uidx, kick, call, err = -1, fd, cap, notify = -1, complete = -1;
  if (!Int(o.Get("num"), 1, kMaxQueueSize, &num) || ((uint32_t)num & ((uint32_t)num - 1)))
    return Throw(env, "num must be a power of 2 in [1, 32768]", Err::kRange), nullptr;
  if (!Int(o.Get("desc"), 0, kMaxSafe, &desc) || !Int(o.Get("avail"), 0, kMaxSafe, &avail) ||
      !Int(o.Get("used"), 0, kMaxSafe, &used))
    return Throw(env, "desc/avail/used must be guest addresses", Err::kRange), nullptr;
  if (!Int(o.Get("lastAvail"), 0, 65535, &last) || !Int(o.Get("usedIdx"), 0, 65535, &uidx))
    return Throw(env, "lastAvail/usedIdx must be in [0, 65535]", Err::kRange), nullptr;
  if (!Int(o.Get("kickFd"), 0, INT_MAX, &kick) || !Int(o.Get("callFd"), -1, INT_MAX, &call) ||
      !Int(o.Get("fd"), 0, INT_MAX, &fd))
    return Throw(env, "kickFd/fd must be fds, callFd an fd or -1", Err::kRange), nullptr;
  if (!o.Get("errFd").IsUndefined() && !Int(o.Get("errFd"), -1, INT_MAX, &err))
    return Throw(env, "errFd must be an fd or -1", Err::kRange), nullptr;
  if (!Int(o.Get("capacitySectors"), 0, kMaxSafe / kSector, &cap))
    return Throw(env, "capacitySectors out of range", Err::kRange), nullptr;
  double bs = kSector;
  if (!o.Get("blockSize").IsUndefined() &&
      (!Int(o.Get("blockSize"), kSector, 1 << 21, &bs) || ((uint32_t)bs & ((uint32_t)bs - 1))))
    return Throw(env, "blockSize must be a power of 2 from 512 to 2 MiB", Err::kRange), nullptr;
  std::string serial = o.Get("serial").IsString() ? o.Get("serial").As<Napi::String>().Utf8Value() : "";
  if (serial.size() > kIdBytes) return Throw(env, "serial is longer than 20 bytes", Err::kRange), nullptr;

  Queue* q = new Queue();
  q->num = (uint32_t)num;
  if (!ParseForward(env, o, q, &notify, &complete, refs) || !ParseInflight(env, o, q, refs)) {
    delete q;
    return nullptr;
  }
  q->index = index;
  q->mem = qmem;
  q->spans = std::move(qspans);
  q->desc = (uint64_t)desc;
  q->avail = (uint64_t)avail;
  q->used = (uint64_t)used;
  q->last_avail = (uint16_t)last;
  q->used_idx = q->published = (uint16_t)uidx;
  q->pos.store((uint32_t)q->last_avail | ((uint32_t)q->published << 16));
  q->event_idx = o.Get("eventIdx").ToBoolean();
  q->read_only = o.Get("readOnly").ToBoolean();
  q->discard = o.Get("discard").IsUndefined() || o.Get("discard").ToBoolean().Value();
  q->write_zeroes = o.Get("writeZeroes").IsUndefined() || o.Get("writeZeroes").ToBoolean().Value();
  q->unmap = o.Get("unmap").IsUndefined() || o.Get("unmap").ToBoolean().Value();
  q->write_cache.store(o.Get("writeCache").IsUndefined() ? true : o.Get("writeCache").ToBoolean().Value());
  q->capacity = (uint64_t)cap;
  q->block_mask = (uint64_t)bs / kSector - 1;
  memcpy(q->serial, serial.data(), serial.size());
  q->stamp.assign(q->num, 0);
  q->inflight.assign(q->num, 0);
  bool ok = (q->kick_fd = DupFd((int)kick)) >= 0 && (q->fd = DupFd((int)fd)) >= 0 &&
            (call < 0 || (q->call_fd = DupFd((int)call)) >= 0) && (err < 0 || (q->err_fd = DupFd((int)err)) >= 0) &&
            (notify < 0 || (q->notify_fd = DupFd((int)notify)) >= 0) &&
            (complete < 0 || (q->complete_fd = DupFd((int)complete)) >= 0);
  if (!ok) {
    int e = errno;
    CloseFds(q);
    delete q;
    return Throw(env, std::string("addQueue: dup: ") + strerror(e)), nullptr;
  }
  return q;
}

}  // namespace vhostblk
}  // namespace spindle
