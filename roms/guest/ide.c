/*
 * PIIX3 IDE (legacy ports) checks: every drive on the primary and secondary channel is
 * identified; ATAPI drives are only named, hard disks get the sector-0 base check, a PIO
 * write/read/compare on sectors 1-8 and a bus-master DMA write/read/compare on sectors
 * 16-31 whose completion must raise IRQ 14/15 in the (masked) 8259's request register.
 */
#include "guest.h"

#define ST_ERR 0x01
#define ST_DRQ 0x08
#define ST_DF 0x20
#define ST_BSY 0x80

struct chan {
  u16 cmd, ctl, bm;
  int irq;
};

#define DMA_SECTORS 16
#define DMA_LBA 16
static u16 idbuf[256];
static u16 secbuf[256];
static u8 dmabuf[DMA_SECTORS * 512] __attribute__((aligned(8192))); /* cannot cross 64 KiB */
static volatile u32 prd[2] __attribute__((aligned(16)));

static void delay400(const struct chan *c) {
  for (int i = 0; i < 5; i++) (void)inb(c->ctl); /* alternate status: does not clear INTRQ */
}

/* Polls the alternate status (which leaves INTRQ alone) until BSY clears: the status, or -2 after spins polls. */
static int wait_notbusy(const struct chan *c, int spins) {
  u8 st = inb(c->ctl);
  for (int i = 0; (st & ST_BSY) && i < spins; i++) st = inb(c->ctl);
  return (st & ST_BSY) ? -2 : st;
}

/* wait_notbusy, then the status register itself (which clears the drive's INTRQ). */
static int wait_ready(const struct chan *c, int spins) {
  if (wait_notbusy(c, spins) < 0) return -2;
  return inb((u16)(c->cmd + 7));
}

static void select_lba(const struct chan *c, int slave, u32 lba, int count) {
  outb((u16)(c->cmd + 6), (u8)(0xe0 | (slave << 4) | ((lba >> 24) & 0x0f)));
  delay400(c);
  (void)wait_ready(c, SPIN_LIMIT);
  outb((u16)(c->cmd + 2), (u8)count);
  outb((u16)(c->cmd + 3), (u8)lba);
  outb((u16)(c->cmd + 4), (u8)(lba >> 8));
  outb((u16)(c->cmd + 5), (u8)(lba >> 16));
}

/* IDENTIFY (0xec) or IDENTIFY PACKET (0xa1) into idbuf: 0 ok, -1 aborted, -2 timeout, -3 nothing there. */
static int identify(const struct chan *c, int slave, u8 command) {
  outb((u16)(c->cmd + 6), (u8)(0xa0 | (slave << 4)));
  delay400(c);
  outb((u16)(c->cmd + 7), command);
  delay400(c);
  u8 st = inb(c->ctl);
  if (st == 0 || st == 0xff) return -3;
  int s = wait_ready(c, SPIN_LIMIT);
  if (s < 0) return -2;
  if ((s & ST_ERR) || !(s & ST_DRQ)) return -1;
  for (int i = 0; i < 256; i++) idbuf[i] = inw(c->cmd);
  s = wait_ready(c, SPIN_LIMIT);
  return s < 0 ? -2 : 0;
}

static void put_model(void) {
  char model[41];
  for (int i = 0; i < 20; i++) {
    model[2 * i] = (char)(idbuf[27 + i] >> 8);
    model[2 * i + 1] = (char)(idbuf[27 + i] & 0xff);
  }
  int n = 40;
  while (n > 0 && (model[n - 1] == ' ' || model[n - 1] == 0)) n--;
  model[n] = 0;
  puts_serial(model);
}

/* One sector by PIO, LBA28: 0 ok, -1 error, -2 timeout. */
static int pio_sector(const struct chan *c, int slave, int write, u32 lba, u16 *buf) {
  select_lba(c, slave, lba, 1);
  outb((u16)(c->cmd + 7), write ? 0x30 : 0x20);
  delay400(c);
  int st = wait_ready(c, SPIN_LIMIT);
  if (st < 0) return -2;
  if ((st & (ST_ERR | ST_DF)) || !(st & ST_DRQ)) return -1;
  for (int i = 0; i < 256; i++) {
    if (write) outw(c->cmd, buf[i]);
    else buf[i] = inw(c->cmd);
  }
  st = wait_ready(c, SPIN_LIMIT);
  if (st < 0) return -2;
  return (st & (ST_ERR | ST_DF)) ? -1 : 0;
}

static u16 pio_word(int drive, u32 lba, int i) { return (u16)(lba * 0x101u + (u32)i * 7u + (u32)drive * 0x3131u); }

static int pio_pattern(const struct chan *c, int slave, int drive, const char *name) {
  for (u32 lba = 1; lba <= 8; lba++) {
    for (int i = 0; i < 256; i++) secbuf[i] = pio_word(drive, lba, i);
    int r = pio_sector(c, slave, 1, lba, secbuf);
    if (r < 0) {
      fail2(name, r == -2 ? "pio write timeout" : "pio write error");
      return 0;
    }
  }
  for (u32 lba = 1; lba <= 8; lba++) {
    memset(secbuf, 0, sizeof secbuf);
    int r = pio_sector(c, slave, 0, lba, secbuf);
    if (r < 0) {
      fail2(name, r == -2 ? "pio read timeout" : "pio read error");
      return 0;
    }
    for (int i = 0; i < 256; i++)
      if (secbuf[i] != pio_word(drive, lba, i)) {
        fail2(name, "pio pattern mismatch");
        return 0;
      }
  }
  return 1;
}

/*
 * One READ DMA / WRITE DMA of count sectors through dmabuf. Returns 1 if it completed without
 * error; *irq_seen tells whether the channel's IRQ reached the PIC request register.
 */
static int dma_xfer(const struct chan *c, int slave, int write, u32 lba, int count, const char *name, int *irq_seen) {
  u16 bm = c->bm;
  outb(bm, 0);                                               /* stopped */
  outb((u16)(bm + 2), (u8)((inb((u16)(bm + 2)) & 0x60) | 0x06)); /* clear interrupt + error */
  prd[0] = (u32)dmabuf;
  prd[1] = 0x80000000u | (((u32)count * 512) & 0xffff);     /* end of table */
  outl((u16)(bm + 4), (u32)prd);
  select_lba(c, slave, lba, count);
  (void)inb((u16)(c->cmd + 7)); /* drop any INTRQ left by earlier commands */
  pic_init();                   /* forget earlier requests latched in the IRR */
  int stale = pic_irr(c->irq);
  outb((u16)(c->cmd + 7), write ? 0xca : 0xc8);
  outb(bm, write ? 0x01 : 0x09); /* start; bit 3 = the bus master writes memory */
  /* Done when the bus master reports the interrupt, or (interrupt missing) when it went idle
   * and the drive is no longer busy. */
  u8 bs = inb((u16)(bm + 2));
  for (int i = 0; !(bs & 0x04) && i < SPIN_LIMIT; i++) {
    if (!(bs & 0x01) && !(inb(c->ctl) & ST_BSY)) break;
    bs = inb((u16)(bm + 2));
  }
  outb(bm, write ? 0x00 : 0x08);
  if (!(bs & 0x04) && (bs & 0x01)) {
    fail2(name, write ? "dma write timeout" : "dma read timeout");
    return 0;
  }
  /* Not busy any more: the request must be in the PIC now, before the status register read
   * below clears the drive's interrupt. */
  int st = wait_notbusy(c, SPIN_LIMIT);
  *irq_seen = st >= 0 && (bs & 0x04) && pic_wait_irr(c->irq, 1);
  if (stale) {
    *irq_seen = 0;
    fail2(name, "dma: irq already pending before the command");
  }
  if (st >= 0) st = inb((u16)(c->cmd + 7));
  if (st < 0) {
    fail2(name, "dma: drive still busy");
    return 0;
  }
  if (bs & 0x02) {
    fail2(name, "dma: bus-master error");
    return 0;
  }
  if (st & (ST_ERR | ST_DF | ST_DRQ)) {
    fail2(name, "dma: ATA error");
    return 0;
  }
  return 1;
}

static u32 dma_word(int drive, int sector, int w) {
  return 0xd0000000u ^ ((u32)(drive + 1) * 0x01010101u) ^ ((u32)(DMA_LBA + sector) << 16) ^ (u32)w;
}

static void dma_test(const struct chan *c, int slave, int drive, const char *name) {
  u32 *words = (u32 *)dmabuf;
  for (int s = 0; s < DMA_SECTORS; s++)
    for (int w = 0; w < 128; w++) words[s * 128 + w] = dma_word(drive, s, w);
  int irq_w = 0, irq_r = 0;
  if (!dma_xfer(c, slave, 1, DMA_LBA, DMA_SECTORS, name, &irq_w)) return;
  memset(dmabuf, 0, sizeof dmabuf);
  if (!dma_xfer(c, slave, 0, DMA_LBA, DMA_SECTORS, name, &irq_r)) return;
  for (int s = 0; s < DMA_SECTORS; s++)
    for (int w = 0; w < 128; w++)
      if (words[s * 128 + w] != dma_word(drive, s, w)) {
        fail2(name, "dma pattern mismatch");
        return;
      }
  say(name);
  puts_serial(" dma 16 sectors ok (IRQ ");
  put_dec((u32)c->irq);
  puts_serial(irq_w && irq_r ? "), irq ok\n" : "), irq missing\n");
  if (!(irq_w && irq_r)) fail2(name, "dma irq missing");
}

/*
 * Code that arrives by DMA must run as it arrived: a CPU with a JIT (v86) has to forget what
 * it compiled from those bytes. Two tiny functions go to disk, the first is read into the
 * buffer and called until it is hot, then the second is read over it and must be what runs.
 */
typedef u32 (*code_fn)(void);

static u32 run_code(u32 times) {
  u32 v = 0;
  for (u32 i = 0; i < times; i++) v = ((code_fn)(void *)dmabuf)();
  return v;
}

static void dma_code_test(const struct chan *c, int slave, const char *name) {
  static const u32 value[2] = {0x11111111u, 0x22222222u};
  int irq = 0;
  memset(dmabuf, 0x90, 1024);
  for (int k = 0; k < 2; k++) {
    u8 *p = dmabuf + 512 * k;
    p[0] = 0xb8; /* mov eax, imm32; ret */
    memcpy(p + 1, &value[k], 4);
    p[5] = 0xc3;
  }
  if (!dma_xfer(c, slave, 1, DMA_LBA + DMA_SECTORS, 2, name, &irq)) return;
  memset(dmabuf, 0xc3, 1024);
  if (!dma_xfer(c, slave, 0, DMA_LBA + DMA_SECTORS, 1, name, &irq)) return;
  u32 first = run_code(200000);
  if (!dma_xfer(c, slave, 0, DMA_LBA + DMA_SECTORS + 1, 1, name, &irq)) return;
  u32 second = run_code(1);
  if (first != value[0] || second != value[1]) {
    fail2(name, second == value[0] ? "dma code: stale code ran after DMA replaced it" : "dma code: wrong result");
    return;
  }
  say(name);
  puts_serial(" dma code ok\n");
}

static void base_check(const struct chan *c, int slave, const char *name) {
  memset(secbuf, 0, sizeof secbuf);
  int r = pio_sector(c, slave, 0, 0, secbuf);
  if (r < 0) {
    fail2(name, "sector 0 read failed");
    return;
  }
  say(name);
  puts_serial(memcmp(secbuf, base_magic, BASE_MAGIC_LEN) == 0 ? " base ok\n" : " base missing\n");
}

/* One drive: 1 if it was a hard disk (checked), 0 otherwise. */
static int drive_run(const struct chan *c, int slave, int drive) {
  char name[5] = {'i', 'd', 'e', (char)('0' + drive), 0};
  outb((u16)(c->cmd + 6), (u8)(0xa0 | (slave << 4)));
  delay400(c);
  u8 st = inb(c->ctl);
  if (st != 0xff && st != 0x7f && (st & ST_BSY)) { /* still resetting */
    int w = wait_notbusy(c, SPIN_LIMIT);
    if (w < 0) {
      fail2(name, "busy after reset");
      return 0;
    }
    st = (u8)w;
  }
  int atapi = inb((u16)(c->cmd + 4)) == 0x14 && inb((u16)(c->cmd + 5)) == 0xeb;
  if (st == 0xff || st == 0x7f) return 0; /* floating bus */
  if (!atapi) {
    if (st == 0) return 0; /* QEMU reads 0 from an absent drive */
    int r = identify(c, slave, 0xec);
    if (r == -3) return 0;
    if (r == -2) {
      fail2(name, "identify timeout");
      return 0;
    }
    if (r == -1) {
      atapi = inb((u16)(c->cmd + 4)) == 0x14 && inb((u16)(c->cmd + 5)) == 0xeb;
      if (!atapi) {
        /* A hard disk never aborts IDENTIFY: this is the shadow of an absent master whose
         * slave is present (QEMU answers so). Reported, not a failure. */
        say(name);
        puts_serial(" no drive (IDENTIFY aborted, no ATAPI signature)\n");
        return 0;
      }
    }
  }
  if (atapi) {
    say(name);
    puts_serial(" atapi");
    if (identify(c, slave, 0xa1) == 0) {
      puts_serial(" model ");
      put_model();
    }
    puts_serial(" (skipped)\n");
    return 0;
  }
  u32 sectors = (u32)idbuf[60] | ((u32)idbuf[61] << 16);
  say(name);
  puts_serial(" model ");
  put_model();
  puts_serial(", ");
  put_dec(sectors);
  puts_serial(" sectors\n");
  if (sectors < DMA_LBA + DMA_SECTORS + 2) {
    fail2(name, "disk too small for the checks");
    return 1;
  }
  base_check(c, slave, name);
  if (pio_pattern(c, slave, drive, name)) {
    say(name);
    puts_serial(" pio pattern ok\n");
  }
  if (c->bm) {
    dma_test(c, slave, drive, name);
    dma_code_test(c, slave, name);
  } else {
    fail2(name, "no bus-master BAR");
  }
  return 1;
}

int ide_run(struct pci_fn *ide) {
  u16 bm = 0;
  if (ide) {
    pci_enable(ide);
    pci_write16(ide->dev, ide->fn, 0x40, 0x8000); /* IDETIM: primary decode enable */
    pci_write16(ide->dev, ide->fn, 0x42, 0x8000); /* secondary */
    if (ide->bar_io[4]) bm = (u16)ide->bar[4];
  }
  const struct chan chans[2] = {{0x1f0, 0x3f6, bm, 14}, {0x170, 0x376, (u16)(bm ? bm + 8 : 0), 15}};
  int disks = 0;
  for (int ch = 0; ch < 2; ch++) {
    const struct chan *c = &chans[ch];
    u8 s0, s1;
    outb((u16)(c->cmd + 6), 0xa0);
    delay400(c);
    s0 = inb(c->ctl);
    outb((u16)(c->cmd + 6), 0xb0);
    delay400(c);
    s1 = inb(c->ctl);
    if ((s0 == 0xff || s0 == 0x7f) && (s1 == 0xff || s1 == 0x7f)) continue; /* nothing on the channel */
    /* Master selected before the reset: QEMU ignores register writes (the drive select
     * too) while the selected drive is busy, finishes the reset later (in a bottom half),
     * and an absent slave reads 0, never busy. So wait on the master, which reads busy
     * until the reset is done. */
    outb((u16)(c->cmd + 6), 0xa0);
    delay400(c);
    outb(c->ctl, 0x06);  /* SRST (with nIEN while resetting) */
    delay400(c);
    outb(c->ctl, 0x00);  /* release; interrupts enabled */
    delay400(c);
    if (s0 != 0xff && s0 != 0x7f && wait_notbusy(c, SPIN_LIMIT) < 0) {
      fail2(ch ? "ide secondary" : "ide primary", "busy after reset");
      continue;
    }
    if (bm) outb((u16)(c->bm + 2), 0x66); /* both drives DMA-capable; clear interrupt + error */
    for (int slave = 0; slave < 2; slave++) disks += drive_run(c, slave, ch * 2 + slave);
  }
  return disks;
}
