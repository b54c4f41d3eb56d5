// Shared declarations of the Spindle native I/O core: the descriptor layout that
// JavaScript writes, the slab registry, and the backend interface that the
// io_uring and thread-pool engines implement.
#pragma once

#include <napi.h>
#include <sys/uio.h>

#include <cstdint>
#include <vector>

namespace spindle {

// ---- Submission descriptors -------------------------------------------------
// One descriptor = 8 int32 slots (32 bytes) in a shared ArrayBuffer, so JS can
// fill it through an Int32Array and a Float64Array over the same memory.
// Must match src/native/engine.ts.
constexpr int kDescInts = 8;
enum DescSlot {
  kOp = 0,      // Op below
  kId = 1,      // request id, < entries
  kFd = 2,
  kSlab = 3,    // single segment: slab id; vectored: first iov triple; fallocate: mode
  kBufOff = 4,  // single segment: offset in slab; vectored: segment count
  kLen = 5,     // single segment: byte count
  // slots 4-5 as float64 index 2: fallocate length
  // slots 6-7 as float64 index 3: file offset
};
enum Op : int32_t {
  OP_READ = 1,
  OP_WRITE = 2,
  OP_READV = 3,
  OP_WRITEV = 4,
  OP_FSYNC = 5,
  OP_FDATASYNC = 6,
  OP_FALLOCATE = 7,
};
// Or'ed into a write's op: the file is page-cached, so the write may run at once
// on the calling thread (see NativeEngine::TryInline).
constexpr int32_t kOpInline = 0x100;
// Vectored slab segments live in a second Int32Array as (slab, offset, len).
constexpr int kIovInts = 3;

// A decoded request, handed to a backend.  For vectored ops `iov` points into
// per-request storage owned by the engine that stays valid until completion.
struct Request {
  int32_t op;
  int32_t id;
  int fd;
  int mode;          // fallocate mode
  uint64_t off;      // file offset
  uint64_t flen;     // fallocate length
  uint8_t* ptr;      // single-segment buffer
  uint32_t len;
  const struct iovec* iov;
  int nseg;
  int32_t slab;      // single segment: slab id of ptr, else -1
};

// ---- Slabs ------------------------------------------------------------------
// 4 KiB-aligned memory exposed to JS as external ArrayBuffers.  Slabs live as
// long as the addon instance (env), so any engine in the same env may use any
// slab, and in-flight I/O never targets freed memory.
struct Slab {
  uint8_t* base;
  size_t size;
};

class Backend;
struct AddonData {
  std::vector<Slab> slabs;
  // Live backends, told about every new slab (io_uring registers it as a
  // fixed buffer).  Only touched on the env's JS thread.
  std::vector<Backend*> backends;
  ~AddonData();
};

// ---- Backends ---------------------------------------------------------------
class Backend {
 public:
  virtual ~Backend() {}
  // eventfd that becomes readable when completions may be available.
  virtual int EventFd() const = 0;
  // Queue one request; it is not started before Flush() (io_uring) or may be
  // started at once (threads).  Returns false when full (a JS accounting bug).
  virtual bool Prepare(const Request& r) = 0;
  // Hand everything prepared to the kernel / workers. Returns 0 or -errno.
  virtual int Flush() = 0;
  // Copy up to `cap` completions as (id, result) pairs into out; returns count.
  virtual int Reap(int32_t* out, int cap) = 0;
  // Block until `inflight` completions are reapable, then stop any threads.
  virtual void Shutdown(int inflight) = 0;
  // A slab was allocated after the backend was created (ids are dense, never reused).
  virtual void AddSlab(uint32_t id, const Slab& s) {}
  // What the backend enabled, for tests and diagnostics (io_uring: setup
  // flags, fixed-buffer table size; 0 when registration was refused).
  virtual void Features(uint32_t* setup_flags, uint32_t* fixed_slots) const {
    *setup_flags = 0;
    *fixed_slots = 0;
  }
  uint64_t enters = 0;
  uint64_t fixed = 0;  // requests issued as READ_FIXED / WRITE_FIXED
};

// Engine creation options (bits of the `flags` argument from JS).
enum EngineFlags : uint32_t {
  kNoFixedBuffers = 1,  // never register slabs as fixed buffers
  kNoInlineReads = 2,   // every read goes through the ring or pool (completion a loop turn later)
};

// Factories; on failure return nullptr and set *err to a positive errno.
Backend* CreateUringBackend(unsigned entries, uint32_t flags, const std::vector<Slab>& slabs, int* err);
Backend* CreatePoolBackend(unsigned entries, unsigned threads, int* err);

// Executes one request synchronously with plain syscalls (thread pool).
int32_t RunSync(const Request& r);

void InitEngine(Napi::Env env, Napi::Object exports);
void InitHostFacts(Napi::Env env, Napi::Object exports);
void InitUnixFd(Napi::Env env, Napi::Object exports);
void InitVhostBlk(Napi::Env env, Napi::Object exports);

}  // namespace spindle
