/* The cheapest FUSE server one thread can be: what the kernel's FUSE path itself costs, with no
 * NBD and no QEMU behind it (docs/performance.md, "What the FUSE hop itself costs").
 *
 * One file, MNT/f, of 2 GiB; every READ is answered from one static buffer of zeros with one
 * writev, so the reply's only copy is the kernel's, into the reader's pages, as with snapfs's
 * splice. The file is opened with direct I/O, as snapfs's incremental views are. Root only.
 *
 *   cc -O2 -o /tmp/nullfuse dev/nullfuse.c && mkdir -p /tmp/nf && /tmp/nullfuse /tmp/nf &
 *   python -m dev.readers pread /tmp/nf/f REGIONS /dev/shm/nf.raw --threads 8
 *   umount /tmp/nf
 */
#define _GNU_SOURCE
#include <linux/fuse.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define SIZE (2ULL << 30)
static char buf[(1 << 20) + 8192];
static char data[1 << 20];

static void reply(int fd, uint64_t unique, int err, const void *p, size_t n) {
  struct fuse_out_header h = {.len = sizeof h + (err ? 0 : n), .error = -err, .unique = unique};
  struct iovec iov[2] = {{&h, sizeof h}, {(void *)p, err ? 0 : n}};
  if (writev(fd, iov, 2) < 0 && errno != ENOENT) perror("writev");
}

static void attr(struct fuse_attr *a, uint64_t ino) {
  memset(a, 0, sizeof *a);
  a->ino = ino;
  a->mode = ino == 1 ? (S_IFDIR | 0755) : (S_IFREG | 0444);
  a->nlink = 1;
  a->size = ino == 1 ? 0 : SIZE;
  a->blksize = 4096;
}

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: nullfuse MOUNTPOINT\n"); return 2; }
  int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fd < 0) { perror("/dev/fuse"); return 1; }
  char opts[128];
  snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fd);
  if (mount("nullfuse", argv[1], "fuse.nullfuse", MS_NOSUID | MS_NODEV, opts)) { perror("mount"); return 1; }
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) { if (errno == EINTR || errno == ENOENT) continue; if (errno == ENODEV) return 0; perror("read"); return 1; }
    struct fuse_in_header *in = (void *)buf;
    void *arg = in + 1;
    switch (in->opcode) {
    case FUSE_INIT: {
      struct fuse_init_in *i = arg;
      struct fuse_init_out o = {.major = 7, .minor = 31, .max_readahead = i->max_readahead,
        .flags = FUSE_MAX_PAGES | FUSE_BIG_WRITES | FUSE_ASYNC_READ, .max_background = 64,
        .congestion_threshold = 48, .max_write = 1 << 20, .max_pages = 256};
      reply(fd, in->unique, 0, &o, sizeof o);
      break;
    }
    case FUSE_LOOKUP: {
      if (strcmp(arg, "f")) { reply(fd, in->unique, ENOENT, 0, 0); break; }
      struct fuse_entry_out e = {.nodeid = 2, .attr_valid = 3600, .entry_valid = 3600};
      attr(&e.attr, 2);
      reply(fd, in->unique, 0, &e, sizeof e);
      break;
    }
    case FUSE_GETATTR: {
      struct fuse_attr_out a = {.attr_valid = 3600};
      attr(&a.attr, in->nodeid);
      reply(fd, in->unique, 0, &a, sizeof a);
      break;
    }
    case FUSE_OPEN: case FUSE_OPENDIR: {
      struct fuse_open_out o = {.fh = 1, .open_flags = in->opcode == FUSE_OPEN ? FOPEN_DIRECT_IO : 0};
      reply(fd, in->unique, 0, &o, sizeof o);
      break;
    }
    case FUSE_READ: {
      struct fuse_read_in *r = arg;
      size_t len = r->size;
      if (r->offset >= SIZE) len = 0; else if (r->offset + len > SIZE) len = SIZE - r->offset;
      reply(fd, in->unique, 0, data, len);
      break;
    }
    case FUSE_RELEASE: case FUSE_RELEASEDIR: case FUSE_FLUSH:
      reply(fd, in->unique, 0, 0, 0);
      break;
    case FUSE_FORGET: case FUSE_BATCH_FORGET:
      break;
    case FUSE_DESTROY:
      reply(fd, in->unique, 0, 0, 0);
      return 0;
    default:
      reply(fd, in->unique, ENOSYS, 0, 0);
    }
  }
}
