// Executing one virtio-blk request popped by the ring code: read/write
// between the image file and guest memory (on a mapped queue through the
// cluster map), flush, get-id, discard and write-zeroes, and the status byte;
// or, on a mapped queue, the decision to forward it to JavaScript.  Reads,
// writes and flushes go to aio.cc when the worker has an io_uring; the rest,
// and everything without a ring, are synchronous syscalls on this thread (see
// the I/O note in worker.h).
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "io.h"
#include "worker.h"

namespace spindle {
namespace vhostblk {
namespace {

constexpr uint32_t kMaxDiscardSectors = 0x3fffff;

enum : uint32_t {
  T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13,
};
constexpr uint32_t kWzUnmap = 1;

}  // namespace

int RwFull(int fd, iovec* iov, size_t cnt, uint64_t off, bool write) {
  while (cnt > 0) {
    int n = cnt > (size_t)IOV_MAX ? IOV_MAX : (int)cnt;
    ssize_t r = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) {
      if (write) return -EIO;
      ZeroIov(iov, cnt);  // a file shorter than its capacity reads as zeroes (QEMU's raw driver)
      return 0;
    }
    off += (uint64_t)r;
    AdvanceIov(&iov, &cnt, (size_t)r);
  }
  return 0;
}

void AdvanceIov(iovec** iov, size_t* cnt, size_t n) {
  iovec* v = *iov;
  size_t c = *cnt;
  while (c > 0 && (n > 0 || v->iov_len == 0)) {
    if (n >= v->iov_len) {
      n -= v->iov_len;
      v++;
      c--;
    } else {
      v->iov_base = (uint8_t*)v->iov_base + n;
      v->iov_len -= n;
      n = 0;
    }
  }
  *iov = v;
  *cnt = c;
}

void ZeroIov(const iovec* iov, size_t cnt) {
  for (size_t i = 0; i < cnt; i++) memset(iov[i].iov_base, 0, iov[i].iov_len);
}

void SliceIov(const std::vector<iovec>& src, size_t* i, size_t* skip, uint64_t len, std::vector<iovec>* out) {
  while (len > 0) {
    const iovec& v = src[*i];
    size_t k = (size_t)std::min<uint64_t>(v.iov_len - *skip, len);
    out->push_back({(uint8_t*)v.iov_base + *skip, k});
    len -= k;
    *skip += k;
    if (*skip == v.iov_len) {
      ++*i;
      *skip = 0;
    }
  }
}

int Fdatasync(int fd) {
  for (;;) {
    if (fdatasync(fd) == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

namespace {

int Fallocate(int fd, int mode, uint64_t off, uint64_t len) {
  for (;;) {
    if (fallocate(fd, mode, (off_t)off, (off_t)len) == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

int WriteZeroes(int fd, uint64_t off, uint64_t len) {
  static const uint8_t zeroes[65536] = {};
  while (len > 0) {
    size_t n = len > sizeof zeroes ? sizeof zeroes : (size_t)len;
    iovec v{(void*)zeroes, n};
    int r = RwFull(fd, &v, 1, off, true);
    if (r < 0) return r;
    off += n;
    len -= n;
  }
  return 0;
}

}  // namespace

// Copies `n` bytes from the device-readable buffers, starting `skip` bytes in.
void Worker::CopyOut(uint8_t* dst, size_t skip, size_t n) {
  for (const iovec& v : e_.out) {
    if (n == 0) return;
    if (skip >= v.iov_len) {
      skip -= v.iov_len;
      continue;
    }
    size_t k = std::min(v.iov_len - skip, n);
    memcpy(dst, (uint8_t*)v.iov_base + skip, k);
    dst += k;
    n -= k;
    skip = 0;
  }
}

// data_ = device-readable bytes after the header (write) or device-writable
// bytes before the status byte (read); returns their size.
uint64_t Worker::Gather(bool write) {
  data_.clear();
  uint64_t bytes = 0;
  if (write) {
    size_t skip = 16;
    for (const iovec& v : e_.out) {
      if (skip >= v.iov_len) {
        skip -= v.iov_len;
        continue;
      }
      data_.push_back({(uint8_t*)v.iov_base + skip, v.iov_len - skip});
      bytes += v.iov_len - skip;
      skip = 0;
    }
  } else {
    size_t n = e_.in.size();
    for (size_t i = 0; i < n; i++) {
      size_t len = i == n - 1 ? e_.in[i].iov_len - 1 : e_.in[i].iov_len;
      if (len == 0) continue;
      data_.push_back({e_.in[i].iov_base, len});
      bytes += len;
    }
  }
  return bytes;
}

// Inside the disk, and starting and ending on a logical block.
bool Worker::InRange(const Queue* q, uint64_t sector, uint64_t count) {
  return sector <= q->capacity && count <= q->capacity - sector && ((sector | count) & q->block_mask) == 0;
}

// The status byte: the last byte of the last device-writable buffer (e_.in
// is not empty).
uint8_t* Worker::StatusAt() const {
  const iovec& last = e_.in.back();
  return (uint8_t*)last.iov_base + last.iov_len - 1;
}

// Executes the request in e_ (popped from `head`); writes and returns its
// status, or returns kForward (nothing written: JavaScript answers it) or
// kAsync (nothing written yet: its I/O is on the ring).
uint8_t Worker::Run(Queue* q, uint16_t head) {
  if (e_.in.empty()) return S_IOERR;  // no status byte to write
  uint8_t* status_at = StatusAt();
  uint8_t s = Request(q, head);
  if (s != kForward && s != kAsync) *status_at = s;
  return s;
}

uint8_t Worker::Request(Queue* q, uint16_t head) {
  if (e_.fault || e_.out_bytes < 16) return S_IOERR;
  uint8_t hdr[16];
  CopyOut(hdr, 0, 16);
  uint32_t type;
  uint64_t sector;
  memcpy(&type, hdr, 4);
  memcpy(&sector, hdr + 8, 8);
  switch (type) {
    case T_IN:
    case T_OUT: {
      bool write = type == T_OUT;
      uint64_t bytes = Gather(write);
      if (bytes % kSector != 0 || !InRange(q, sector, bytes / kSector)) return S_IOERR;
      if (write && q->read_only) return S_IOERR;
      if (bytes == 0) return S_OK;
      if (q->map && !MapRuns(q, sector * kSector, bytes, write)) return kForward;
      if (ring_) return ReadWrite(q, head, sector * kSector, bytes, write);
      if (q->map) {
        if (MappedSync(q, write) < 0) return S_IOERR;
      } else if (RwFull(q->fd, data_.data(), data_.size(), sector * kSector, write) < 0) {
        return S_IOERR;
      }
      if (write) {
        q->bytes_written.fetch_add(bytes, std::memory_order_relaxed);
        if (!q->write_cache.load(std::memory_order_relaxed) && Fdatasync(q->fd) < 0) return S_IOERR;
      } else {
        q->bytes_read.fetch_add(bytes, std::memory_order_relaxed);
      }
      return S_OK;
    }
    case T_FLUSH:
      if (q->map) return kForward;  // the format's metadata too
      if (ring_) return FlushAsync(q, head);
      return Fdatasync(q->fd) < 0 ? S_IOERR : S_OK;
    case T_GET_ID: {
      Gather(false);
      uint32_t off = 0;
      for (const iovec& v : data_)
        for (size_t i = 0; i < v.iov_len && off < kIdBytes; i++, off++) ((uint8_t*)v.iov_base)[i] = q->serial[off];
      return S_OK;
    }
    case T_DISCARD:
    case T_WRITE_ZEROES:
      if (!(type == T_DISCARD ? q->discard : q->write_zeroes)) return S_UNSUPP;
      if (q->map) return kForward;  // clusters to free or zero in the format
      return DiscardOrZero(q, type == T_DISCARD);
    default:
      return S_UNSUPP;
  }
}

// A read/write of [off, +bytes) (data in data_) on a mapped queue: runs_ =
// the runs of host-contiguous clusters; false (forward it) unless every
// cluster is mapped (writable, for a write).
bool Worker::MapRuns(Queue* q, uint64_t off, uint64_t bytes, bool write) {
  const ClusterMap& m = *q->map;
  uint64_t csize = (uint64_t)1 << m.bits(), end = off + bytes;
  runs_.clear();
  for (uint64_t pos = off; pos < end;) {
    uint64_t e = m.Lookup(pos >> m.bits());
    if (!(e & ClusterMap::kValid) || (write && !(e & ClusterMap::kWritable))) return false;
    uint64_t in = pos & (csize - 1), n = std::min(csize - in, end - pos);
    uint64_t host = (e & ~(ClusterMap::kValid | ClusterMap::kWritable)) + in;
    if (!runs_.empty() && runs_.back().host + runs_.back().len == host)
      runs_.back().len += n;
    else
      runs_.push_back({host, n});
    pos += n;
  }
  return true;
}

// MapRuns' runs, one synchronous transfer each; 0 or -errno.
int Worker::MappedSync(Queue* q, bool write) {
  size_t i = 0, skip = 0;  // cursor in data_, which holds exactly the runs' bytes
  for (const HostRun& r : runs_) {
    slice_.clear();
    SliceIov(data_, &i, &skip, r.len, &slice_);
    int e = RwFull(q->fd, slice_.data(), slice_.size(), r.host, write);
    if (e < 0) return e;
  }
  return 0;
}

uint8_t Worker::DiscardOrZero(Queue* q, bool discard) {
  uint64_t n = Gather(true);
  if (n != 16) return n > 16 && n % 16 == 0 ? S_UNSUPP : S_IOERR;  // one segment at most
  uint8_t seg[16];
  CopyOut(seg, 16, 16);
  uint64_t sector;
  uint32_t count, flags;
  memcpy(&sector, seg, 8);
  memcpy(&count, seg + 8, 4);
  memcpy(&flags, seg + 12, 4);
  bool unmap = (flags & kWzUnmap) != 0;
  if ((flags & ~kWzUnmap) || (discard && unmap)) return S_UNSUPP;
  if (count > kMaxDiscardSectors || !InRange(q, sector, count) || q->read_only) return S_IOERR;
  if (count == 0 || (discard && !q->unmap)) return S_OK;
  unmap = unmap && q->unmap;
  uint64_t off = sector * kSector, len = (uint64_t)count * kSector;
  int r;
  if (discard) {
    r = Fallocate(q->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
    // Discard is advisory: a file system that cannot punch holes keeps the data.
    if (r == -EOPNOTSUPP) r = 0;
  } else {
    r = Fallocate(q->fd, unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE, off, len);
    if (r == -EOPNOTSUPP && unmap) r = Fallocate(q->fd, FALLOC_FL_ZERO_RANGE, off, len);
    if (r == -EOPNOTSUPP) r = WriteZeroes(q->fd, off, len);
  }
  if (r == 0 && !q->write_cache.load(std::memory_order_relaxed)) r = Fdatasync(q->fd);
  return r < 0 ? S_IOERR : S_OK;
}

}  // namespace vhostblk
}  // namespace spindle
