/* A prototype of a compiled worker, for (d) of dev/bench.py: what snapfs's data path would cost
 * if its worker were not Python. Not a product: no dirty bitmap, no read-ahead, no confinement
 * (the bench reads 64 KiB regions aligned to 64 KiB, which no copy-before-write cluster spans),
 * no structured replies, one export.
 *
 * MNT/f is the export, opened with direct I/O. Each READ becomes one NBD read; its reply is
 * moved as snapfs's worker moves it: the FUSE header written into a pipe, the payload spliced
 * from the socket behind it, and the pipe spliced into /dev/fuse. poll(2) in each thread.
 *
 * THREADS (default 1) runs that many such threads, each with its own NBD connection, pipe and
 * descriptor of the mount (FUSE_DEV_IOC_CLONE: a request is answered on the descriptor it was
 * read from). The bench runs one; more are for finding out whether a second worker helps.
 *
 *   cc -O2 -o cworker dev/cworker.c && ./cworker MNT NBD_SOCKET EXPORT [THREADS] &
 *   (root; umount MNT)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define SLOTS 64 /* READs in flight at most (the kernel's max_background below) */

static uint64_t size;
static const char *nbd_path, *nbd_export;
static int first_fuse; /* the mount's own descriptor: the other threads clone it */
/* Each thread's own: its request buffer, descriptor of the mount, connection, pipe, READs. */
static __thread char req[(1 << 20) + 8192];
static __thread int fuse, sock, pipe_r, pipe_w, inflight;
static __thread struct {
  uint64_t unique;
  uint32_t len;
  int used;
} slot[SLOTS];

static void die(const char *what) {
  fprintf(stderr, "cworker: %s: %s\n", what, errno ? strerror(errno) : "protocol error");
  exit(1);
}

static void recv_all(void *p, size_t n) {
  while (n) {
    ssize_t r = read(sock, p, n);
    if (r <= 0) die("NBD receive");
    p = (char *)p + r;
    n -= r;
  }
}

static void send_all(const void *p, size_t n) {
  while (n) {
    ssize_t r = write(sock, p, n);
    if (r <= 0) die("NBD send");
    p = (const char *)p + r;
    n -= r;
  }
}

static void reply(uint64_t unique, int err, const void *p, size_t n) {
  struct fuse_out_header h = {.len = sizeof h + (err ? 0 : n), .error = -err, .unique = unique};
  struct iovec iov[2] = {{&h, sizeof h}, {(void *)p, err ? 0 : n}};
  if (writev(fuse, iov, 2) < 0 && errno != ENOENT) die("reply");
}

static void attr(struct fuse_attr *a, uint64_t ino) {
  memset(a, 0, sizeof *a);
  a->ino = ino;
  a->mode = ino == FUSE_ROOT_ID ? (S_IFDIR | 0755) : (S_IFREG | 0444);
  a->nlink = 1;
  a->size = ino == FUSE_ROOT_ID ? 0 : size;
  a->blksize = 4096;
}

/* Fixed newstyle handshake, NBD_OPT_GO: no structured replies, the export's size. */
static void nbd_connect(const char *path, const char *name) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof sa.sun_path) die("socket path too long");
  strcpy(sa.sun_path, path);
  sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof sa)) die("connect");
  struct __attribute__((packed)) {
    uint64_t magic, opt_magic;
    uint16_t flags;
  } hello;
  recv_all(&hello, sizeof hello);
  if (be64toh(hello.magic) != 0x4e42444d41474943ULL || be64toh(hello.opt_magic) != 0x49484156454F5054ULL)
    die("not a newstyle NBD server");
  uint32_t cflags = htonl(3); /* FIXED_NEWSTYLE | NO_ZEROES */
  send_all(&cflags, sizeof cflags);
  uint32_t n = strlen(name);
  struct __attribute__((packed)) {
    uint64_t magic;
    uint32_t option, len, name_len;
  } go = {htobe64(0x49484156454F5054ULL), htonl(7), htonl(4 + n + 2), htonl(n)};
  uint16_t infos = 0;
  send_all(&go, sizeof go);
  send_all(name, n);
  send_all(&infos, sizeof infos);
  for (;;) {
    struct __attribute__((packed)) {
      uint64_t magic;
      uint32_t option, type, len;
    } r;
    char data[4096];
    recv_all(&r, sizeof r);
    uint32_t type = ntohl(r.type), len = ntohl(r.len);
    if (be64toh(r.magic) != 0x3e889045565a9ULL || len > sizeof data) die("bad option reply");
    recv_all(data, len);
    if (type & 0x80000000u) die("NBD_OPT_GO refused");
    if (type == 3 && len >= 12 && data[0] == 0 && data[1] == 0) { /* NBD_INFO_EXPORT */
      memcpy(&size, data + 2, 8);
      size = be64toh(size);
    }
    if (type == 1) /* NBD_REP_ACK */
      return;
  }
}

static void nbd_read(int s, uint64_t offset, uint32_t len) {
  struct __attribute__((packed)) {
    uint32_t magic;
    uint16_t flags, type;
    uint64_t handle, offset;
    uint32_t len;
  } r = {htonl(0x25609513), 0, 0, (uint64_t)s, htobe64(offset), htonl(len)};
  send_all(&r, sizeof r);
}

/* One reply off the socket, spliced behind its FUSE header into /dev/fuse. */
static void answer(void) {
  struct __attribute__((packed)) {
    uint32_t magic, error;
    uint64_t handle;
  } h;
  recv_all(&h, sizeof h);
  if (ntohl(h.magic) != 0x67446698 || h.handle >= SLOTS || !slot[h.handle].used) die("bad reply");
  uint64_t unique = slot[h.handle].unique;
  uint32_t len = slot[h.handle].len;
  slot[h.handle].used = 0;
  inflight--;
  if (h.error) {
    reply(unique, EIO, NULL, 0);
    return;
  }
  struct fuse_out_header oh = {.len = sizeof oh + len, .error = 0, .unique = unique};
  if (write(pipe_w, &oh, sizeof oh) != sizeof oh) die("pipe");
  for (uint32_t moved = 0; moved < len;) {
    ssize_t r = splice(sock, NULL, pipe_w, NULL, len - moved, SPLICE_F_MOVE);
    if (r <= 0) die("splice from the socket");
    moved += r;
  }
  ssize_t r = splice(pipe_r, NULL, fuse, NULL, sizeof oh + len, SPLICE_F_MOVE);
  if (r == (ssize_t)(sizeof oh + len))
    return;
  if (r >= 0 || errno != ENOENT) die("splice into /dev/fuse");
  for (size_t left = sizeof oh + len; left;) { /* the READ was interrupted: empty the pipe */
    ssize_t k = read(pipe_r, req, left);
    if (k <= 0) die("pipe");
    left -= k;
  }
}

static void request(void) {
  struct fuse_in_header *in = (struct fuse_in_header *)req;
  void *arg = in + 1;
  switch (in->opcode) {
  case FUSE_INIT: {
    struct fuse_init_in *i = arg;
    struct fuse_init_out o = {.major = FUSE_KERNEL_VERSION, .minor = 31,
                              .max_readahead = i->max_readahead,
                              .flags = FUSE_MAX_PAGES | FUSE_ASYNC_READ | FUSE_SPLICE_WRITE |
                                       FUSE_SPLICE_MOVE,
                              .max_background = SLOTS, .congestion_threshold = SLOTS * 3 / 4,
                              .max_write = 1 << 20, .max_pages = 256};
    reply(in->unique, 0, &o, sizeof o);
    break;
  }
  case FUSE_LOOKUP: {
    if (in->nodeid != FUSE_ROOT_ID || strcmp(arg, "f")) {
      reply(in->unique, ENOENT, NULL, 0);
      break;
    }
    struct fuse_entry_out e = {.nodeid = 2, .attr_valid = 3600, .entry_valid = 3600};
    attr(&e.attr, 2);
    reply(in->unique, 0, &e, sizeof e);
    break;
  }
  case FUSE_GETATTR: {
    struct fuse_attr_out a = {.attr_valid = 3600};
    attr(&a.attr, in->nodeid);
    reply(in->unique, 0, &a, sizeof a);
    break;
  }
  case FUSE_OPEN:
  case FUSE_OPENDIR: {
    struct fuse_open_out o = {.fh = 1, .open_flags = in->opcode == FUSE_OPEN ? FOPEN_DIRECT_IO : 0};
    reply(in->unique, 0, &o, sizeof o);
    break;
  }
  case FUSE_READ: {
    struct fuse_read_in *r = arg;
    uint64_t len = r->offset >= size ? 0 : r->size;
    if (len > size - r->offset)
      len = size - r->offset;
    if (!len) {
      reply(in->unique, 0, NULL, 0);
      break;
    }
    int s = 0;
    while (slot[s].used)
      s++; /* there is one: requests are read only while a slot is free */
    slot[s].used = 1;
    slot[s].unique = in->unique;
    slot[s].len = len;
    inflight++;
    nbd_read(s, r->offset, len);
    break;
  }
  case FUSE_RELEASE:
  case FUSE_RELEASEDIR:
  case FUSE_FLUSH:
    reply(in->unique, 0, NULL, 0);
    break;
  case FUSE_FORGET:
  case FUSE_BATCH_FORGET:
  case FUSE_INTERRUPT: /* no reply; the READ's own reply may then find it gone (ENOENT) */
    break;
  case FUSE_DESTROY:
    reply(in->unique, 0, NULL, 0);
    exit(0);
  default:
    reply(in->unique, ENOSYS, NULL, 0);
  }
}

/* One worker: requests from its descriptor of the mount, replies from its own connection. */
static void *serve(void *arg) {
  if (arg) { /* not the first thread: a descriptor of its own, cloned from the mount's */
    uint32_t from = (uint32_t)first_fuse;
    fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fuse < 0 || ioctl(fuse, FUSE_DEV_IOC_CLONE, &from)) die("FUSE_DEV_IOC_CLONE");
    nbd_connect(nbd_path, nbd_export);
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC) || fcntl(p[1], F_SETPIPE_SZ, 1 << 20) < 0) die("pipe");
  pipe_r = p[0];
  pipe_w = p[1];
  for (;;) {
    struct pollfd fds[2] = {{fuse, POLLIN, 0}, {sock, POLLIN, 0}};
    int room = inflight < SLOTS;
    if (poll(room ? fds : fds + 1, room ? 2 : 1, -1) < 0) {
      if (errno == EINTR)
        continue;
      die("poll");
    }
    for (int k = 0; room && fds[0].revents && k < 16 && inflight < SLOTS; k++) {
      if (read(fuse, req, sizeof req) >= 0) {
        request();
        continue;
      }
      if (errno == EAGAIN) /* another thread took it */
        break;
      if (errno == ENODEV) /* unmounted */
        exit(0);
      if (errno != EINTR && errno != ENOENT)
        die("/dev/fuse");
    }
    if (fds[1].revents)
      answer();
  }
}

int main(int argc, char **argv) {
  int threads = argc == 5 ? atoi(argv[4]) : 1;
  if ((argc != 4 && argc != 5) || threads < 1 || threads > 64) {
    fprintf(stderr, "usage: cworker MOUNTPOINT NBD_SOCKET EXPORT [THREADS]\n");
    return 2;
  }
  nbd_path = argv[2];
  nbd_export = argv[3];
  nbd_connect(nbd_path, nbd_export);
  fuse = first_fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (fuse < 0) die("/dev/fuse");
  char opts[128];
  snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fuse);
  if (mount("cworker", argv[1], "fuse.cworker", MS_NOSUID | MS_NODEV | MS_RDONLY, opts))
    die("mount");
  for (int t = 1; t < threads; t++) {
    pthread_t id;
    if (pthread_create(&id, NULL, serve, (void *)1)) die("pthread_create");
  }
  serve(NULL);
}
