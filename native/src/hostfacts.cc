// Synchronous host facts Node lacks: open with O_DIRECT, block-device size,
// SEEK_DATA/SEEK_HOLE, OFD locks, alignment probing.  Every function returns a
// number; negative values are -errno, so errors are built in JS (EngineError).
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common.h"

namespace spindle {
namespace {

double Num(const Napi::CallbackInfo& info, size_t i) {
  return info[i].As<Napi::Number>().DoubleValue();
}
int Fd(const Napi::CallbackInfo& info) { return info[0].As<Napi::Number>().Int32Value(); }
Napi::Value Ret(const Napi::CallbackInfo& info, double v) {
  return Napi::Number::New(info.Env(), v);
}
Napi::Value Err(const Napi::CallbackInfo& info) { return Ret(info, -(double)errno); }

// open(path, write, create, direct, truncate) -> fd | -errno
Napi::Value Open(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int flags = O_CLOEXEC | (info[1].ToBoolean() ? O_RDWR : O_RDONLY);
  if (info[2].ToBoolean()) flags |= O_CREAT;
  if (info[3].ToBoolean()) flags |= O_DIRECT;
  if (info[4].ToBoolean()) flags |= O_TRUNC;
  int fd;
  do fd = open(path.c_str(), flags, 0644); while (fd < 0 && errno == EINTR);
  return fd < 0 ? Err(info) : Ret(info, fd);
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  // No EINTR retry: on Linux the fd is gone even when close is interrupted.
  return close(Fd(info)) < 0 ? Err(info) : Ret(info, 0);
}

Napi::Value StrError(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), strerror(info[0].As<Napi::Number>().Int32Value()));
}

// fstat(fd) -> [size, blocks*512, isBlock, blksize] | -errno
Napi::Value Fstat(const Napi::CallbackInfo& info) {
  struct stat st;
  int fd = Fd(info);
  if (fstat(fd, &st) < 0) return Err(info);
  double size = (double)st.st_size;
  bool blk = S_ISBLK(st.st_mode);
  if (blk) {
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) < 0) return Err(info);
    size = (double)bytes;
  }
  Napi::Array a = Napi::Array::New(info.Env(), 4);
  a.Set(0u, Napi::Number::New(info.Env(), size));
  a.Set(1u, Napi::Number::New(info.Env(), (double)st.st_blocks * 512.0));
  a.Set(2u, Napi::Boolean::New(info.Env(), blk));
  a.Set(3u, Napi::Number::New(info.Env(), (double)st.st_blksize));
  return a;
}

Napi::Value Ftruncate(const Napi::CallbackInfo& info) {
  int rc;
  do rc = ftruncate(Fd(info), (off_t)Num(info, 1)); while (rc < 0 && errno == EINTR);
  return rc < 0 ? Err(info) : Ret(info, 0);
}

// lseek(fd, offset, hole) -> position | -errno
Napi::Value Seek(const Napi::CallbackInfo& info) {
  off_t r = lseek(Fd(info), (off_t)Num(info, 1), info[2].ToBoolean() ? SEEK_HOLE : SEEK_DATA);
  return r < 0 ? Err(info) : Ret(info, (double)r);
}

// Probe the O_DIRECT alignment the way a careful user would: open the same
// file again with O_DIRECT and try the smallest aligned read that works.
int ProbeAlignment(int fd, int fallback) {
  std::string self = "/proc/self/fd/" + std::to_string(fd);
  int dfd = open(self.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (dfd < 0) return fallback;
  void* buf = nullptr;
  int found = fallback;
  if (posix_memalign(&buf, 4096, 4096) == 0) {
    for (int size : {512, 1024, 2048, 4096}) {
      // Buffer and length both at `size` alignment: EINVAL means too small.
      if (pread(dfd, buf, size, 0) >= 0) { found = size; break; }
      if (errno != EINVAL) break;
    }
    free(buf);
  }
  close(dfd);
  return found;
}

// blockSize(fd) -> [logical, physical] | -errno
Napi::Value BlockSize(const Napi::CallbackInfo& info) {
  int fd = Fd(info);
  struct stat st;
  if (fstat(fd, &st) < 0) return Err(info);
  int logical = 0;
  unsigned int physical = 0;
  if (S_ISBLK(st.st_mode)) {
    if (ioctl(fd, BLKSSZGET, &logical) < 0) logical = 0;
    if (ioctl(fd, BLKPBSZGET, &physical) < 0) physical = 0;
  }
  if (logical <= 0) logical = ProbeAlignment(fd, (int)st.st_blksize);
  if (physical < (unsigned)logical) physical = (unsigned)(st.st_blksize > logical ? st.st_blksize : logical);
  Napi::Array a = Napi::Array::New(info.Env(), 2);
  a.Set(0u, Napi::Number::New(info.Env(), logical));
  a.Set(1u, Napi::Number::New(info.Env(), physical));
  return a;
}

short LockType(int t) { return t == 1 ? F_RDLCK : t == 2 ? F_WRLCK : F_UNLCK; }

// lock(fd, start, len, type 0=unlock 1=read 2=write) -> 0 | -errno
Napi::Value Lock(const Napi::CallbackInfo& info) {
  struct flock fl;
  memset(&fl, 0, sizeof fl);  // OFD locks require l_pid == 0
  fl.l_type = LockType(info[3].As<Napi::Number>().Int32Value());
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)Num(info, 1);
  fl.l_len = (off_t)Num(info, 2);
  return fcntl(Fd(info), F_OFD_SETLK, &fl) < 0 ? Err(info) : Ret(info, 0);
}

// testLock(fd, start, len, type) -> 1 if a conflicting lock exists, 0, -errno
Napi::Value TestLock(const Napi::CallbackInfo& info) {
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = LockType(info[3].As<Napi::Number>().Int32Value());
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)Num(info, 1);
  fl.l_len = (off_t)Num(info, 2);
  if (fcntl(Fd(info), F_OFD_GETLK, &fl) < 0) return Err(info);
  return Ret(info, fl.l_type != F_UNLCK ? 1 : 0);
}

}  // namespace

void InitHostFacts(Napi::Env env, Napi::Object exports) {
  exports.Set("open", Napi::Function::New(env, Open, "open"));
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("strerror", Napi::Function::New(env, StrError, "strerror"));
  exports.Set("fstat", Napi::Function::New(env, Fstat, "fstat"));
  exports.Set("ftruncate", Napi::Function::New(env, Ftruncate, "ftruncate"));
  exports.Set("seek", Napi::Function::New(env, Seek, "seek"));
  exports.Set("blockSize", Napi::Function::New(env, BlockSize, "blockSize"));
  exports.Set("lock", Napi::Function::New(env, Lock, "lock"));
  exports.Set("testLock", Napi::Function::New(env, TestLock, "testLock"));
}

}  // namespace spindle
