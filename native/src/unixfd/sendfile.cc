// sendFileRange: one read reply of an NBD export straight from a file's page
// cache to a socket (a header from memory, then sendfile), without the copy
// into JavaScript's memory and back.  Synchronous on the calling thread, so it
// refuses, before sending anything, a range not wholly in the page cache
// (cachestat): a disk read must not stall the event loop.
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "args.h"

namespace spindle {
namespace unixfd {
namespace {

#ifndef __NR_cachestat
#define __NR_cachestat 451  // the same number on every architecture (Linux 6.5)
#endif

struct CachestatRange {
  uint64_t off, len;
};
struct Cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

// 0 when every page of [off, off+len) is cached, -ENODATA when one is not,
// -errno when the kernel cannot tell (ENOSYS before 6.5).
int AllCached(int fd, uint64_t off, uint64_t len) {
  static const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  CachestatRange r{off, len};
  Cachestat cs{};
  if (syscall(__NR_cachestat, fd, &r, &cs, 0) < 0) return -errno;
  uint64_t pages = (off + len - 1) / page - off / page + 1;
  return cs.nr_cache >= pages ? 0 : -ENODATA;
}

// sendFileRange(sockFd, head, fileFd, offset, length): bytes sent (head, then
// data), which may be fewer than all when the socket is full; -errno when
// nothing was sent: -ENODATA (not all cached), -ENOSYS (no cachestat),
// -EAGAIN (socket full), others from send.
Napi::Value SendFileRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock, file;
  uint8_t* head;
  size_t head_len;
  if (!FdArg(info, 0, "sendFileRange", &sock)) return env.Undefined();
  if (!BytesArg(info[1], &head, &head_len)) return Throw(env, "sendFileRange: head must be bytes");
  if (!FdArg(info, 2, "sendFileRange", &file)) return env.Undefined();
  if (!IsInt(info[3]) || !IsInt(info[4])) return Throw(env, "sendFileRange(sockFd, head, fileFd, offset, length)");
  double off_d = info[3].As<Napi::Number>().DoubleValue(), len_d = info[4].As<Napi::Number>().DoubleValue();
  if (off_d < 0 || len_d <= 0 || off_d + len_d > 9007199254740991.0 || len_d > 1073741824.0)
    return Throw(env, "sendFileRange: offset or length out of range", true);
  off_t off = (off_t)off_d;
  size_t len = (size_t)len_d;
  int r = AllCached(file, (uint64_t)off, len);
  if (r < 0) return Ret(env, r);
  size_t sent = 0;
  while (sent < head_len) {
    ssize_t n = send(sock, head + sent, head_len - sent, MSG_MORE | MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return sent ? Ret(env, (double)sent) : Errno(env);
    sent += (size_t)n;
  }
  size_t data = 0;
  while (data < len) {
    ssize_t n = sendfile(sock, file, &off, len - data);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // full (EAGAIN), an error, or the file ended: the caller sends the rest
    data += (size_t)n;
  }
  return Ret(env, (double)(sent + data));
}

}  // namespace

void ExportSendFile(Napi::Env env, Napi::Object exports) {
  exports.Set("sendFileRange", Napi::Function::New(env, SendFileRange, "sendFileRange"));
}

}  // namespace unixfd
}  // namespace spindle
