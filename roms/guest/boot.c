/*
 * Spindle's guest program, booted by multiboot (no firmware needed). This first version
 * reports that it runs and what it finds on the primary IDE channel (IDENTIFY by PIO), with
 * a verdict on COM1, then halts. The disk checks (PCI scan, IDE and virtio-blk patterns) come with the boot issue.
 */
#define MULTIBOOT_MAGIC 0x1BADB002u
#define MULTIBOOT_FLAGS 0x00000000u

__attribute__((section(".multiboot"), used, aligned(4)))
static const unsigned int multiboot_header[3] = {MULTIBOOT_MAGIC, MULTIBOOT_FLAGS, -(MULTIBOOT_MAGIC + MULTIBOOT_FLAGS)};

static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline unsigned char inb(unsigned short port) {
  unsigned char v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}

static void putc_serial(char c) {
  while (!(inb(0x3fd) & 0x20)) {} /* transmitter holding register empty */
  outb(0x3f8, (unsigned char)c);
}

static void puts_serial(const char *s) {
  while (*s) putc_serial(*s++);
}

static inline unsigned short inw(unsigned short port) {
  unsigned short v;
  __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}

/* IDENTIFY DEVICE on the primary master by PIO, polling: prints the model, or "none". 1 if a disk answered. */
static int ide_identify(void) {
  unsigned short id[256];
  outb(0x1f6, 0xa0);
  outb(0x1f7, 0xec);
  unsigned char st = inb(0x1f7);
  if (st == 0 || st == 0xff) {
    puts_serial("spindle guest: ide0 none\n");
    return 0;
  }
  for (int spins = 0; (st & 0x80) && spins < 1000000; spins++) st = inb(0x1f7);
  if (!(st & 0x08) || (st & 0x01)) {
    puts_serial("spindle guest: ide0 no data\n");
    return 0;
  }
  for (int i = 0; i < 256; i++) id[i] = inw(0x1f0);
  char model[41];
  for (int i = 0; i < 20; i++) {
    model[2 * i] = (char)(id[27 + i] >> 8);
    model[2 * i + 1] = (char)(id[27 + i] & 0xff);
  }
  int n = 40;
  while (n > 0 && model[n - 1] == ' ') n--;
  model[n] = 0;
  puts_serial("spindle guest: ide0 model ");
  puts_serial(model);
  putc_serial('\n');
  return 1;
}

static inline void outw(unsigned short port, unsigned short v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }

static int ide_wait(void) {
  unsigned char st = inb(0x1f7);
  for (int spins = 0; (st & 0x80) && spins < 10000000; spins++) st = inb(0x1f7);
  return (st & 0x80) || (st & 0x01) ? -1 : st;
}

/* One sector by PIO, LBA28, on the primary master. */
static int ide_sector(int write, unsigned int lba, unsigned short *buf) {
  outb(0x1f6, (unsigned char)(0xe0 | ((lba >> 24) & 0x0f)));
  outb(0x1f2, 1);
  outb(0x1f3, (unsigned char)lba);
  outb(0x1f4, (unsigned char)(lba >> 8));
  outb(0x1f5, (unsigned char)(lba >> 16));
  outb(0x1f7, write ? 0x30 : 0x20);
  int st = ide_wait();
  if (st < 0 || !(st & 0x08)) return -1;
  for (int i = 0; i < 256; i++) {
    if (write) outw(0x1f0, buf[i]);
    else buf[i] = inw(0x1f0);
  }
  return ide_wait() < 0 ? -1 : 0;
}

/* Writes a pattern to sectors 1-8, reads it back, compares: 1 if it matches. */
static int ide_pattern(void) {
  unsigned short buf[256];
  for (unsigned int lba = 1; lba <= 8; lba++) {
    for (int i = 0; i < 256; i++) buf[i] = (unsigned short)(lba * 0x101u + (unsigned int)i * 7u);
    if (ide_sector(1, lba, buf) < 0) return 0;
  }
  for (unsigned int lba = 1; lba <= 8; lba++) {
    if (ide_sector(0, lba, buf) < 0) return 0;
    for (int i = 0; i < 256; i++) if (buf[i] != (unsigned short)(lba * 0x101u + (unsigned int)i * 7u)) return 0;
  }
  return 1;
}

void guest_main(unsigned int magic) {
  puts_serial("spindle guest: booted\n");
  int disk = ide_identify();
  int ok = 1;
  if (disk) {
    ok = ide_pattern();
    puts_serial(ok ? "spindle guest: ide0 pio pattern ok\n" : "spindle guest: ide0 pio pattern FAILED\n");
  }
  /* A multiboot loader says so in eax. */
  if (magic != 0x2BADB002u) puts_serial("spindle guest: FAIL (not loaded by multiboot)\n");
  else puts_serial(ok ? "spindle guest: PASS\n" : "spindle guest: FAIL\n");
  for (;;) __asm__ volatile("cli; hlt");
}

/* The multiboot loader jumps here with the magic in eax and the info pointer in ebx. */
__asm__(".globl _start\n_start:\n  mov $0x200000, %esp\n  push %eax\n  call guest_main\n1: hlt\n  jmp 1b\n");
