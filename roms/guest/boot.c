/*
 * Spindle's guest program, booted by multiboot (no firmware needed). This first version
 * reports that it runs: it prints a banner and a verdict on COM1, then halts. The disk checks (PCI scan, IDE and virtio-blk patterns) come with the boot issue.
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

void guest_main(unsigned int magic) {
  puts_serial("spindle guest: booted\n");
  /* A multiboot loader says so in eax. */
  puts_serial(magic == 0x2BADB002u ? "spindle guest: PASS\n" : "spindle guest: FAIL (not loaded by multiboot)\n");
  for (;;) __asm__ volatile("cli; hlt");
}

/* The multiboot loader jumps here with the magic in eax and the info pointer in ebx. */
__asm__(".globl _start\n_start:\n  mov $0x200000, %esp\n  push %eax\n  call guest_main\n1: hlt\n  jmp 1b\n");
