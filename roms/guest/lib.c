/* Serial output, the failure record, memory helpers and the 8259 PIC helpers of the guest program. */
#include "guest.h"

const char base_magic[] = "SPINDLE-BASE";

void putc_serial(char c) {
  /* Transmitter holding register empty; bounded so a missing UART cannot hang the program. */
  for (int spins = 0; !(inb(0x3fd) & 0x20) && spins < 100000; spins++) {}
  outb(0x3f8, (u8)c);
}

void puts_serial(const char *s) {
  while (*s) putc_serial(*s++);
}

/* digits 0: as many as needed. */
void put_hex(u32 v, int digits) {
  if (!digits)
    for (digits = 1; digits < 8 && (v >> (4 * digits)); digits++) {}
  for (int i = digits - 1; i >= 0; i--) putc_serial("0123456789abcdef"[(v >> (4 * i)) & 0xf]);
}

/* Decimal of a 64-bit value by shift-and-subtract (no libgcc division helpers here). */
void put_dec(u64 v) {
  char buf[21];
  int n = 0;
  do {
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
      r = (r << 1) | ((v >> i) & 1);
      if (r >= 10) {
        r -= 10;
        q |= 1ull << i;
      }
    }
    buf[n++] = (char)('0' + (int)r);
    v = q;
  } while (v && n < 20);
  while (n) putc_serial(buf[--n]);
}

void say(const char *s) {
  puts_serial("spindle guest: ");
  puts_serial(s);
}

static int fails;
static char first_reason[80];

/* Records a failed check "who what" (who may be empty); the first one is kept for the verdict. */
void fail2(const char *who, const char *what) {
  say("check failed: ");
  puts_serial(who);
  if (*who) putc_serial(' ');
  puts_serial(what);
  putc_serial('\n');
  if (!fails) {
    unsigned int n = 0;
    while (*who && n < sizeof first_reason - 1) first_reason[n++] = *who++;
    if (n && n < sizeof first_reason - 1) first_reason[n++] = ' ';
    while (*what && n < sizeof first_reason - 1) first_reason[n++] = *what++;
    first_reason[n] = 0;
  }
  fails++;
}
void fail(const char *reason) { fail2("", reason); }
int fail_count(void) { return fails; }
const char *first_fail(void) { return first_reason; }

void *memset(void *d, int c, unsigned int n) {
  u8 *p = d;
  while (n--) *p++ = (u8)c;
  return d;
}
void *memcpy(void *d, const void *s, unsigned int n) {
  u8 *p = d;
  const u8 *q = s;
  while (n--) *p++ = *q++;
  return d;
}
int memcmp(const void *a, const void *b, unsigned int n) {
  const u8 *p = a, *q = b;
  for (; n; n--, p++, q++)
    if (*p != *q) return *p < *q ? -1 : 1;
  return 0;
}

/*
 * ICW1-4 on both 8259s (edge, cascade, vectors 0x20 and 0x28, 8086 mode), then every line
 * masked: the program never takes an interrupt, it only watches the request register.
 * ICW1 also clears the edge latches of the IRR, so calling this again before an operation
 * forgets requests left over from earlier ones. The ELCR makes the PCI IRQs 10 and 11
 * level-triggered, as firmware would for PCI INTx lines.
 */
void pic_init(void) {
  outb(0x20, 0x11);
  outb(0xa0, 0x11);
  outb(0x21, 0x20);
  outb(0xa1, 0x28);
  outb(0x21, 0x04); /* slave on IR2 */
  outb(0xa1, 0x02); /* slave id 2 */
  outb(0x21, 0x01);
  outb(0xa1, 0x01);
  outb(0x21, 0xff);
  outb(0xa1, 0xff);
  outb(0x4d0, 0x00);
  outb(0x4d1, 0x0c);
}

int pic_irr(int irq) {
  u16 port = irq < 8 ? 0x20 : 0xa0;
  outb(port, 0x0a); /* OCW3: read IRR on the next read of the command port */
  return (inb(port) >> (irq & 7)) & 1;
}

int pic_level_mode(int irq) {
  u8 lo = inb(0x4d0), hi = inb(0x4d1);
  if (lo != 0x00 || hi != 0x0c) return 0; /* no (or no sane) ELCR: treat as edge */
  return irq >= 8 ? (hi >> (irq - 8)) & 1 : 0;
}

int pic_wait_irr(int irq, int want) {
  int bit = pic_irr(irq);
  for (int spins = 0; bit != want && spins < 100000; spins++) bit = pic_irr(irq);
  return bit;
}
