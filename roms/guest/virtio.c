/*
 * virtio-blk through the legacy (transitional) PCI interface in I/O BAR0: reset, negotiate,
 * one queue in a page-aligned buffer (legacy split layout), then the sector-0 base check,
 * a 16-sector write/read/compare at sector 32, FLUSH (if offered) and GET_ID. Every request
 * must raise the device's INTx (routed through a PIRQ to IRQ 10 or 11) in the PIC's request
 * register; reading the ISR must show bit 0 and drop the line.
 */
#include "guest.h"

#define REG_DEVICE_FEATURES 0x00
#define REG_GUEST_FEATURES 0x04
#define REG_QUEUE_PFN 0x08
#define REG_QUEUE_SIZE 0x0c
#define REG_QUEUE_SELECT 0x0e
#define REG_QUEUE_NOTIFY 0x10
#define REG_STATUS 0x12
#define REG_ISR 0x13
#define REG_CONFIG 0x14 /* no MSI-X enabled */

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FAILED 0x80

#define F_RO (1u << 5)
#define F_FLUSH (1u << 9)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

#define DESC_NEXT 1
#define DESC_WRITE 2

#define SECTORS 16
#define LBA 32

struct vdesc {
  u64 addr;
  u32 len;
  u16 flags;
  u16 next;
};

static u8 vq_mem[32768] __attribute__((aligned(4096)));
static struct {
  u32 type, reserved;
  u64 sector;
} vhdr __attribute__((aligned(16)));
static volatile u8 vstatus;
static u8 vbuf[SECTORS * 512] __attribute__((aligned(16)));

struct vq {
  u16 io, size, avail_idx, last_used;
  int irq, level;
  volatile struct vdesc *desc;
  volatile u16 *avail; /* flags, idx, ring[size] */
  volatile u16 *used;  /* flags, idx, then {u32 id, u32 len}[size] */
  int irq_ok, irq_missing, isr_bad, line_stuck, timeouts;
  const char *name;
};

/* One request: header, optional data, status byte. The status, or -1 on timeout. */
static int vreq(struct vq *q, u32 type, u64 sector, void *buf, u32 len, int device_writes) {
  vhdr.type = type;
  vhdr.reserved = 0;
  vhdr.sector = sector;
  vstatus = 0xff;
  q->desc[0].addr = (u32)&vhdr;
  q->desc[0].len = sizeof vhdr;
  q->desc[0].flags = DESC_NEXT;
  q->desc[0].next = len ? 1 : 2;
  q->desc[1].addr = (u32)buf;
  q->desc[1].len = len;
  q->desc[1].flags = (u16)(DESC_NEXT | (device_writes ? DESC_WRITE : 0));
  q->desc[1].next = 2;
  q->desc[2].addr = (u32)&vstatus;
  q->desc[2].len = 1;
  q->desc[2].flags = DESC_WRITE;
  q->desc[2].next = 0;
  (void)inb((u16)(q->io + REG_ISR)); /* drop a stale interrupt */
  pic_init();
  int stale = pic_irr(q->irq);
  q->avail[2 + q->avail_idx % q->size] = 0;
  barrier();
  q->avail_idx++;
  q->avail[1] = q->avail_idx;
  barrier();
  outw((u16)(q->io + REG_QUEUE_NOTIFY), 0);
  int spins = 0;
  while (q->used[1] == q->last_used && spins < SPIN_LIMIT) {
    (void)inb((u16)(q->io + REG_STATUS)); /* a port read per spin paces the loop */
    spins++;
  }
  if (q->used[1] == q->last_used) {
    q->timeouts++;
    return -1;
  }
  q->last_used++;
  barrier();
  if (!stale && pic_wait_irr(q->irq, 1)) q->irq_ok++;
  else q->irq_missing++;
  u8 isr = inb((u16)(q->io + REG_ISR));
  if (!(isr & 1)) q->isr_bad++;
  if (q->level && pic_wait_irr(q->irq, 0)) q->line_stuck++;
  return vstatus;
}

static u32 vword(int index, int sector, int w) {
  return 0x71000000u ^ ((u32)(index + 1) * 0x00370101u) ^ ((u32)(LBA + sector) << 12) ^ (u32)w;
}

static void put_fn(struct pci_fn *f, const char *what) {
  say("virtio ");
  put_bdf(f);
  puts_serial(what);
}

int virtio_blk_run(struct pci_fn *f, int index) {
  static char name[16];
  char *n = name;
  for (const char *p = "virtio 00:"; *p;) *n++ = *p++;
  *n++ = "0123456789abcdef"[f->dev >> 4];
  *n++ = "0123456789abcdef"[f->dev & 15];
  *n++ = '.';
  *n++ = (char)('0' + f->fn);
  *n = 0;
  int fails0 = fail_count();
  if (!f->bar_io[0]) {
    fail2(name, "no legacy I/O BAR0");
    return 0;
  }
  if (!f->line) {
    fail2(name, "no interrupt pin");
    return 0;
  }
  pci_enable(f);
  struct vq q;
  memset(&q, 0, sizeof q);
  q.io = (u16)f->bar[0];
  q.irq = f->line;
  q.name = name;
  u16 io = q.io;
  outb((u16)(io + REG_STATUS), 0);
  if (inb((u16)(io + REG_STATUS)) != 0) {
    fail2(name, "reset did not clear the status");
    return 0;
  }
  outb((u16)(io + REG_STATUS), STATUS_ACK);
  outb((u16)(io + REG_STATUS), STATUS_ACK | STATUS_DRIVER);
  u32 features = inl((u16)(io + REG_DEVICE_FEATURES));
  u32 accept = features & F_FLUSH;
  outl((u16)(io + REG_GUEST_FEATURES), accept);
  outw((u16)(io + REG_QUEUE_SELECT), 0);
  q.size = inw((u16)(io + REG_QUEUE_SIZE));
  u32 used_off = ((u32)q.size * 18 + 6 + 4095) & ~4095u;
  u32 total = used_off + (((u32)q.size * 8 + 6 + 4095) & ~4095u);
  if (q.size == 0 || (q.size & (q.size - 1)) || total > sizeof vq_mem) {
    fail2(name, "queue 0 size unusable");
    outb((u16)(io + REG_STATUS), STATUS_FAILED);
    return 0;
  }
  memset(vq_mem, 0, sizeof vq_mem);
  q.desc = (volatile struct vdesc *)vq_mem;
  q.avail = (volatile u16 *)(vq_mem + 16u * q.size);
  q.used = (volatile u16 *)(vq_mem + used_off);
  outl((u16)(io + REG_QUEUE_PFN), (u32)vq_mem >> 12);
  outb((u16)(io + REG_STATUS), STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
  q.level = pic_level_mode(q.irq);

  u64 capacity = (u64)inl((u16)(io + REG_CONFIG)) | ((u64)inl((u16)(io + REG_CONFIG + 4)) << 32);
  put_fn(f, " features ");
  put_hex(features, 8);
  puts_serial(", queue ");
  put_dec(q.size);
  puts_serial(", irq ");
  put_dec((u32)q.irq);
  puts_serial(q.level ? " (level)\n" : " (edge)\n");

  /* Sector 0: the base image's marker, if the host made this image. */
  memset(vbuf, 0, 512);
  int st = vreq(&q, T_IN, 0, vbuf, 512, 1);
  if (st != 0) fail2(name, st < 0 ? "sector 0 read timeout" : "sector 0 read error");
  else put_fn(f, memcmp(vbuf, base_magic, BASE_MAGIC_LEN) == 0 ? " base ok\n" : " base missing\n");

  if (capacity < LBA + SECTORS) {
    fail2(name, "disk too small for the checks");
  } else if (features & F_RO) {
    put_fn(f, " read-only: write check skipped\n");
  } else {
    u32 *words = (u32 *)vbuf;
    for (int s = 0; s < SECTORS; s++)
      for (int w = 0; w < 128; w++) words[s * 128 + w] = vword(index, s, w);
    st = vreq(&q, T_OUT, LBA, vbuf, sizeof vbuf, 0);
    if (st != 0) fail2(name, st < 0 ? "write timeout" : "write error");
    memset(vbuf, 0, sizeof vbuf);
    st = vreq(&q, T_IN, LBA, vbuf, sizeof vbuf, 1);
    if (st != 0) fail2(name, st < 0 ? "read timeout" : "read error");
    int match = 1;
    for (int s = 0; s < SECTORS && match; s++)
      for (int w = 0; w < 128; w++)
        if (words[s * 128 + w] != vword(index, s, w)) match = 0;
    if (!match) fail2(name, "pattern mismatch");
    put_fn(f, match && st == 0 ? " pattern 16 sectors ok\n" : " pattern FAILED\n");
  }

  if (accept & F_FLUSH) {
    st = vreq(&q, T_FLUSH, 0, 0, 0, 0);
    if (st != 0) fail2(name, st < 0 ? "flush timeout" : "flush error");
    else put_fn(f, " flush ok\n");
  }

  /* GET_ID has no feature bit in the legacy interface: UNSUPP (2) is an answer, not a failure. */
  memset(vbuf, 0, 512);
  st = vreq(&q, T_GET_ID, 0, vbuf, 20, 1);
  if (st == 0) {
    put_fn(f, " serial \"");
    for (int i = 0; i < 20 && vbuf[i]; i++) putc_serial(vbuf[i] >= 0x20 && vbuf[i] < 0x7f ? (char)vbuf[i] : '?');
    puts_serial("\"\n");
  } else if (st == 2) {
    put_fn(f, " get_id unsupported\n");
  } else {
    fail2(name, st < 0 ? "get_id timeout" : "get_id error");
  }

  put_fn(f, " IRQ ");
  put_dec((u32)q.irq);
  if (q.irq_missing || q.timeouts) {
    puts_serial(", irq missing\n");
    fail2(name, "irq missing");
  } else {
    puts_serial(", irq ok");
    puts_serial(q.level ? ", line lowered by ISR read" : ", edge-triggered (line drop not visible)");
    putc_serial('\n');
  }
  if (q.isr_bad) fail2(name, "ISR bit 0 not set after a request");
  if (q.line_stuck) fail2(name, "ISR read did not lower the line");
  outb((u16)(io + REG_STATUS), 0); /* reset: the device lets go of the queue memory */

  if (fail_count() == fails0) {
    put_fn(f, " capacity ");
    put_dec(capacity);
    puts_serial(" sectors ok\n");
  } else {
    put_fn(f, " FAILED\n");
  }
  return 1;
}
