// Synchronous I/O helpers shared by request.cc (the synchronous path) and
// aio.cc (inline tries and the io_uring path).
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <vector>

namespace spindle {
namespace vhostblk {

// Full transfer between fd and iov (modified in place): loops over short
// transfers, EINTR and IOV_MAX.  A read that meets EOF zero-fills the rest.
// 0 or -errno.
int RwFull(int fd, iovec* iov, size_t cnt, uint64_t off, bool write);

// Advances (*iov, *cnt) past n bytes (which they hold) and past empty entries.
void AdvanceIov(iovec** iov, size_t* cnt, size_t n);

// Zero-fills iov[0, cnt).
void ZeroIov(const iovec* iov, size_t cnt);

// Appends to `out` the next `len` bytes of `src` from the cursor (*i, *skip),
// and advances the cursor.  `src` must hold them.
void SliceIov(const std::vector<iovec>& src, size_t* i, size_t* skip, uint64_t len, std::vector<iovec>* out);

// fdatasync retried on EINTR; 0 or -errno.
int Fdatasync(int fd);

}  // namespace vhostblk
}  // namespace spindle
