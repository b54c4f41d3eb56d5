/*
 * PCI bus 0 by configuration mechanism #1: scan, BAR assignment (no firmware has done it),
 * and INTx routing through the PIIX3 PIRQ route registers with the i440FX swizzle.
 */
#include "guest.h"

#define MAX_FNS 32
static struct pci_fn fns[MAX_FNS];
static int nfns;

/*
 * INTx swizzle of the i440FX/PIIX3 board: PIRQ = (slot + pin - 1 - PIRQ_SLOT_BIAS) & 3, pin 1 = INTA.
 * QEMU's i440fx (pci_slot_get_pirq: slot - 1), SeaBIOS and QEMU's ACPI _PRT all use bias 1:
 * slot 1 INTA -> PIRQA, slot 4 INTA -> PIRQD. Bias 0 would be (slot + pin - 1) & 3.
 */
#ifndef PIRQ_SLOT_BIAS
#define PIRQ_SLOT_BIAS 1
#endif

/* ISA IRQ for PIRQA..D, programmed into PIIX3 registers 0x60-0x63. */
static const u8 pirq_irq[4] = {10, 10, 11, 11};

static u32 cfg_addr(int dev, int fn, int off) {
  return 0x80000000u | ((u32)dev << 11) | ((u32)fn << 8) | ((u32)off & 0xfc);
}
u32 pci_read32(int dev, int fn, int off) {
  outl(0xcf8, cfg_addr(dev, fn, off));
  return inl(0xcfc);
}
void pci_write32(int dev, int fn, int off, u32 v) {
  outl(0xcf8, cfg_addr(dev, fn, off));
  outl(0xcfc, v);
}
u16 pci_read16(int dev, int fn, int off) {
  outl(0xcf8, cfg_addr(dev, fn, off));
  return inw((u16)(0xcfc + (off & 2)));
}
void pci_write16(int dev, int fn, int off, u16 v) {
  outl(0xcf8, cfg_addr(dev, fn, off));
  outw((u16)(0xcfc + (off & 2)), v);
}
u8 pci_read8(int dev, int fn, int off) {
  outl(0xcf8, cfg_addr(dev, fn, off));
  return inb((u16)(0xcfc + (off & 3)));
}
void pci_write8(int dev, int fn, int off, u8 v) {
  outl(0xcf8, cfg_addr(dev, fn, off));
  outb((u16)(0xcfc + (off & 3)), v);
}

void put_bdf(const struct pci_fn *f) {
  puts_serial("00:");
  put_hex(f->dev, 2);
  putc_serial('.');
  put_hex(f->fn, 1);
}

static u32 io_next = 0xc000, mem_next = 0xe0000000u;

static u32 align_up(u32 v, u32 a) { return (v + a - 1) & ~(a - 1); }

/* Sizes each BAR by writing all-ones and gives it the next free, size-aligned range. */
static void assign_bars(struct pci_fn *f) {
  u16 cmd = pci_read16(f->dev, f->fn, 0x04);
  pci_write16(f->dev, f->fn, 0x04, cmd & ~3u); /* no decoding while the BARs move */
  for (int i = 0; i < 6; i++) {
    int off = 0x10 + 4 * i;
    pci_write32(f->dev, f->fn, off, 0xffffffffu);
    u32 probe = pci_read32(f->dev, f->fn, off);
    if (probe == 0 || probe == 0xffffffffu) {
      pci_write32(f->dev, f->fn, off, 0);
      continue;
    }
    u32 size, base;
    if (probe & 1) {
      u32 mask = probe & ~3u;
      if (!(mask & 0xffff0000u)) mask |= 0xffff0000u; /* 16-bit I/O decoders read 0 up there */
      size = ~mask + 1;
      base = align_up(io_next, size);
      io_next = base + size;
      f->bar_io[i] = 1;
    } else {
      size = ~(probe & ~0xfu) + 1;
      base = align_up(mem_next, size);
      mem_next = base + size;
    }
    pci_write32(f->dev, f->fn, off, base | (probe & 1));
    f->bar[i] = base;
    say("pci ");
    put_bdf(f);
    puts_serial(" bar");
    put_hex((u32)i, 1);
    puts_serial(f->bar_io[i] ? " io " : " mem ");
    put_hex(base, f->bar_io[i] ? 4 : 8);
    puts_serial(" size ");
    put_hex(size, 0);
    putc_serial('\n');
    if (!(probe & 1) && ((probe >> 1) & 3) == 2 && i < 5) { /* 64-bit: upper half below 4 GiB */
      pci_write32(f->dev, f->fn, off + 4, 0);
      i++;
    }
  }
  pci_write16(f->dev, f->fn, 0x04, cmd);
}

void pci_enable(struct pci_fn *f) {
  u16 cmd = pci_read16(f->dev, f->fn, 0x04);
  pci_write16(f->dev, f->fn, 0x04, (u16)(cmd | 0x0007)); /* I/O space, memory space, bus master */
}

struct pci_fn *pci_find(u16 vendor, u16 device, int nth) {
  for (int i = 0; i < nfns; i++)
    if (fns[i].vendor == vendor && fns[i].device == device && nth-- == 0) return &fns[i];
  return 0;
}

static void add_fn(int dev, int fn, u32 id) {
  if (nfns == MAX_FNS) return;
  struct pci_fn *f = &fns[nfns++];
  memset(f, 0, sizeof *f);
  f->dev = (u8)dev;
  f->fn = (u8)fn;
  f->vendor = (u16)id;
  f->device = (u16)(id >> 16);
  u32 cls = pci_read32(dev, fn, 0x08);
  f->cls = (u8)(cls >> 24);
  f->sub = (u8)(cls >> 16);
  f->progif = (u8)(cls >> 8);
  f->pin = pci_read8(dev, fn, 0x3d);
  say("pci ");
  put_bdf(f);
  putc_serial(' ');
  put_hex(f->vendor, 4);
  putc_serial(':');
  put_hex(f->device, 4);
  puts_serial(" class ");
  put_hex(f->cls, 2);
  put_hex(f->sub, 2);
  putc_serial('\n');
}

int pci_setup(void) {
  nfns = 0;
  io_next = 0xc000;
  mem_next = 0xe0000000u;
  for (int dev = 0; dev < 32; dev++) {
    for (int fn = 0; fn < 8; fn++) {
      u32 id = pci_read32(dev, fn, 0x00);
      if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
        if (fn == 0) break;
        continue;
      }
      add_fn(dev, fn, id);
      if (fn == 0 && !(pci_read8(dev, fn, 0x0e) & 0x80)) break; /* single-function device */
    }
  }
  for (int i = 0; i < nfns; i++)
    if ((pci_read8(fns[i].dev, fns[i].fn, 0x0e) & 0x7f) == 0) assign_bars(&fns[i]);

  struct pci_fn *isa = pci_find(0x8086, 0x7000, 0);
  if (isa) {
    for (int p = 0; p < 4; p++) pci_write8(isa->dev, isa->fn, 0x60 + p, pirq_irq[p]);
    say("pci ");
    put_bdf(isa);
    puts_serial(" PIRQ A-D -> IRQ");
    for (int p = 0; p < 4; p++) {
      putc_serial(p ? ',' : ' ');
      put_dec(pci_read8(isa->dev, isa->fn, 0x60 + p));
    }
    putc_serial('\n');
  } else {
    say("pci no PIIX3 ISA bridge (8086:7000): PIRQ routing not programmed\n");
  }
  for (int i = 0; i < nfns; i++) {
    struct pci_fn *f = &fns[i];
    if (f->pin < 1 || f->pin > 4) continue;
    int pirq = (f->dev + f->pin - 1 - PIRQ_SLOT_BIAS) & 3;
    f->line = pirq_irq[pirq];
    pci_write8(f->dev, f->fn, 0x3c, f->line);
    say("pci ");
    put_bdf(f);
    puts_serial(" INT");
    putc_serial((char)('A' + f->pin - 1));
    puts_serial(" -> PIRQ");
    putc_serial((char)('A' + pirq));
    puts_serial(" -> IRQ ");
    put_dec(f->line);
    putc_serial('\n');
  }
  return nfns;
}
