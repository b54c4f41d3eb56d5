/*
 * Shared declarations of Spindle's guest program: port I/O, serial output, the failure
 * record, the 8259 PIC helpers, and the interfaces of the PCI, IDE and virtio-blk parts.
 * Everything runs with paging off and interrupts disabled, so a pointer is a physical address.
 */
#ifndef SPINDLE_GUEST_H
#define SPINDLE_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* Port I/O; the "memory" clobber keeps buffer stores ordered before a device is started. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline u8 inb(u16 port) {
  u8 v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
  return v;
}
static inline u16 inw(u16 port) {
  u16 v;
  __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory");
  return v;
}
static inline u32 inl(u16 port) {
  u32 v;
  __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
  return v;
}
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

/* Upper bound of every busy-wait loop (iterations, each at least one port read). */
#define SPIN_LIMIT 20000000

/* lib.c: serial output on COM1, always line-prefixed by the callers with say(). */
void putc_serial(char c);
void puts_serial(const char *s);
void put_hex(u32 v, int digits);  /* digits 0: as many as needed */
void put_dec(u64 v);
void say(const char *s);          /* "spindle guest: " + s (no newline) */
void fail(const char *reason);    /* records a failed check; the first reason goes in the verdict */
void fail2(const char *who, const char *what); /* the same, reason "who what" */
int fail_count(void);
const char *first_fail(void);
void *memset(void *d, int c, unsigned int n);
void *memcpy(void *d, const void *s, unsigned int n);
int memcmp(const void *a, const void *b, unsigned int n);

/* lib.c: 8259 pair, initialised (vectors 0x20/0x28) and fully masked; IRR read with OCW3. */
void pic_init(void);
int pic_irr(int irq);              /* 1 if the IRR bit of ISA irq is set */
int pic_level_mode(int irq);       /* 1 if ELCR says irq is level-triggered (and ELCR reads back sanely) */
int pic_wait_irr(int irq, int want); /* polls (bounded) until the IRR bit equals want; returns the final bit */

/* pci.c */
struct pci_fn {
  u8 dev, fn, cls, sub, progif, pin, line;
  u16 vendor, device;
  u32 bar[6];                      /* assigned base (flag bits stripped), 0 if none */
  u8 bar_io[6];
};
int pci_setup(void);               /* scans bus 0, assigns BARs, routes PIRQs; returns the count */
struct pci_fn *pci_find(u16 vendor, u16 device, int nth);
void pci_enable(struct pci_fn *f); /* command: I/O + memory + bus master */
void put_bdf(const struct pci_fn *f);
u32 pci_read32(int dev, int fn, int off);
void pci_write32(int dev, int fn, int off, u32 v);
u16 pci_read16(int dev, int fn, int off);
void pci_write16(int dev, int fn, int off, u16 v);
u8 pci_read8(int dev, int fn, int off);
void pci_write8(int dev, int fn, int off, u8 v);

/* ide.c: every drive on both legacy channels; returns the number of hard disks checked. */
int ide_run(struct pci_fn *ide);

/* virtio.c: one legacy virtio-blk function; returns 1 if it was checked as a disk. */
int virtio_blk_run(struct pci_fn *f, int index);

extern const char base_magic[];    /* "SPINDLE-BASE", at byte 0 of sector 0 of Spindle-made images */
#define BASE_MAGIC_LEN 12

#endif
