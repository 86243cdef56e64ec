/* snapfs._fastpath: the compiled part of the splice data path (see snapfs/fastpath.py).
 *
 * An Intake reads the FUSE requests in the worker thread that owns it, with the GIL released,
 * and answers the READs it can on its own: a READ of a registered Disk whose whole range is
 * readable now, lies inside one confinement block, does not continue a large sequential read
 * (those go to Python, which reads ahead) and is not wholly a known zero of the snapshot
 * (Python answers those without QEMU). For each it sends one NBD read on the disk's
 * own connection (simple replies: the payload right behind a 16-byte header, holes as zeros),
 * and moves the reply as the Python worker does: the FUSE header written into a pipe, the
 * payload spliced from the socket behind it, the pipe spliced into /dev/fuse. Several READs
 * are in flight at once; QEMU may answer them in any order.
 *
 * Everything else is handed back, unanswered, as the request's bytes: other requests, READs it
 * declines, READs QEMU answered with an error (punched meanwhile: Python's check then says
 * so; or a broken snapshot: Python's path reports it) and the READs in flight on a connection
 * that failed (the disk is then not used again). A READ is answered exactly once, here or in
 * Python.
 *
 * Invariants: the reply pipe is empty between replies. A Disk's readable set only shrinks
 * (remove), under its mutex, which is never held while waiting for the GIL or for I/O. A Disk
 * added to an Intake stays referenced until the Intake is closed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fuse.h>
#include <poll.h>
#include <sys/epoll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_DISKS 64
#define MAX_PENDING 64            /* READs in flight at once, all disks */
#define HANDBACK_BATCH 16         /* requests handed back at once at most (Python's batch) */
#define MAX_READ (1u << 20)       /* the largest READ the mount negotiates */
#define REQ_BUF ((1u << 20) + 8192)
#define PIPE_BYTES (1 << 20)
#define READ_IN_BYTES (sizeof(struct fuse_in_header) + sizeof(struct fuse_read_in))

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_CMD_READ 0

struct nbd_request {
  uint32_t magic;
  uint16_t flags, type;
  uint64_t cookie, offset;
  uint32_t length;
} __attribute__((packed));

struct nbd_simple_reply {
  uint32_t magic, error;
  uint64_t cookie;
} __attribute__((packed));

/* -- Disk ------------------------------------------------------------------------------------ */

typedef struct {
  PyObject_HEAD
  pthread_mutex_t lock; /* guards lo, hi, n */
  uint64_t *lo, *hi;    /* readable: sorted, disjoint [lo, hi) */
  size_t n;
  uint64_t *zlo, *zhi;  /* known zeros: sorted, disjoint [zlo, zhi); fixed, so no lock */
  size_t zn;
  uint64_t ino, size, confine, read_ahead_min;
  int sock;             /* our own descriptor of the NBD connection */
  int alive;            /* atomic; 0 once closed or failed */
  uint64_t next;        /* where the last READ of this disk ended (sequential readers) */
  uint64_t cookie;
  struct nbd_request *out; /* requests made and not yet sent */
  int nout;
  /* counters (read by any thread; exact only in the worker) */
  unsigned long long reads, bytes, declined, copied, errors;
} Disk;

/* Whether [off, off + len) lies in one of the n sorted, disjoint ranges [lo, hi). */
static int ranges_contain(const uint64_t *lo, const uint64_t *hi, size_t n, uint64_t off,
                          uint64_t len) {
  size_t a = 0, b = n; /* the first range with lo > off */
  while (a < b) {
    size_t m = a + (b - a) / 2;
    if (lo[m] <= off)
      a = m + 1;
    else
      b = m;
  }
  return a > 0 && hi[a - 1] >= off + len;
}

static int disk_readable(Disk *d, uint64_t off, uint64_t len) {
  pthread_mutex_lock(&d->lock);
  int ok = ranges_contain(d->lo, d->hi, d->n, off, len);
  pthread_mutex_unlock(&d->lock);
  return ok;
}

/* Take [a, b) out of the readable set (the caller holds the lock). */
static int disk_remove_locked(Disk *d, uint64_t a, uint64_t b) {
  size_t i = 0, j = d->n; /* the first extent with hi > a */
  while (i < j) {
    size_t m = i + (j - i) / 2;
    if (d->hi[m] <= a)
      i = m + 1;
    else
      j = m;
  }
  if (i == d->n || d->lo[i] >= b)
    return 0;
  if (d->lo[i] < a && d->hi[i] > b) { /* inside one extent: it splits in two */
    uint64_t *lo = PyMem_RawRealloc(d->lo, (d->n + 1) * sizeof *lo);
    if (!lo)
      return -1;
    d->lo = lo;
    uint64_t *hi = PyMem_RawRealloc(d->hi, (d->n + 1) * sizeof *hi);
    if (!hi)
      return -1;
    d->hi = hi;
    memmove(lo + i + 1, lo + i, (d->n - i) * sizeof *lo);
    memmove(hi + i + 1, hi + i, (d->n - i) * sizeof *hi);
    d->n++;
    hi[i] = a;
    lo[i + 1] = b;
    return 0;
  }
  if (d->lo[i] < a) {
    d->hi[i] = a;
    i++;
  }
  j = i;
  while (j < d->n && d->hi[j] <= b)
    j++;
  if (j < d->n && d->lo[j] < b)
    d->lo[j] = b;
  memmove(d->lo + i, d->lo + j, (d->n - j) * sizeof *d->lo);
  memmove(d->hi + i, d->hi + j, (d->n - j) * sizeof *d->hi);
  d->n -= j - i;
  return 0;
}

static void disk_fail(Disk *d) {
  __atomic_store_n(&d->alive, 0, __ATOMIC_RELEASE);
  shutdown(d->sock, SHUT_RDWR);
}

/* Copy the ranges of two arrays of starts and ends (sorted, disjoint, inside [0, size)) into
 * new *lo and *hi; -1 with an exception set if they are not such ranges or memory runs out. */
static int copy_ranges(const Py_buffer *starts, const Py_buffer *ends, uint64_t size,
                       const char *what, uint64_t **lo, uint64_t **hi, size_t *n) {
  if (starts->len != ends->len || starts->len % sizeof(uint64_t)) {
    PyErr_Format(PyExc_ValueError, "the %s starts and ends must be arrays of the same length",
                 what);
    return -1;
  }
  size_t count = (size_t)starts->len / sizeof(uint64_t);
  const uint64_t *s = starts->buf, *e = ends->buf;
  for (size_t k = 0; k < count; k++) {
    if (e[k] <= s[k] || e[k] > size || (k && s[k] <= e[k - 1])) {
      PyErr_Format(PyExc_ValueError, "the %s ranges are not sorted and disjoint", what);
      return -1;
    }
  }
  *lo = PyMem_RawMalloc((count ? count : 1) * sizeof(uint64_t));
  *hi = PyMem_RawMalloc((count ? count : 1) * sizeof(uint64_t));
  if (!*lo || !*hi) {
    PyErr_NoMemory();
    return -1;
  }
  if (count) {
    memcpy(*lo, s, count * sizeof(uint64_t));
    memcpy(*hi, e, count * sizeof(uint64_t));
  }
  *n = count;
  return 0;
}

static int Disk_init(Disk *self, PyObject *args, PyObject *kwds) {
  static char *kwlist[] = {"ino",  "size",           "confine",     "sock",      "starts",
                           "ends", "read_ahead_min", "zero_starts", "zero_ends", NULL};
  unsigned long long ino, size, confine, ra_min;
  int sock;
  Py_buffer starts, ends, zstarts = {0}, zends = {0};
  if (self->lo) {
    PyErr_SetString(PyExc_RuntimeError, "a Disk is made once");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKKiy*y*K|y*y*", kwlist, &ino, &size, &confine,
                                   &sock, &starts, &ends, &ra_min, &zstarts, &zends))
    return -1;
  int rc = -1;
  if (copy_ranges(&starts, &ends, size, "readable", &self->lo, &self->hi, &self->n) < 0 ||
      copy_ranges(&zstarts, &zends, size, "zero", &self->zlo, &self->zhi, &self->zn) < 0)
    goto out;
  self->out = PyMem_RawMalloc(MAX_PENDING * sizeof *self->out);
  if (!self->out) {
    PyErr_NoMemory();
    goto out;
  }
  self->sock = fcntl(sock, F_DUPFD_CLOEXEC, 0);
  if (self->sock < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    goto out;
  }
  self->ino = ino;
  self->size = size;
  self->confine = confine;
  self->read_ahead_min = ra_min;
  self->next = UINT64_MAX;
  self->alive = 1;
  rc = 0;
out:
  PyBuffer_Release(&starts);
  PyBuffer_Release(&ends);
  PyBuffer_Release(&zstarts);
  PyBuffer_Release(&zends);
  return rc;
}

static PyObject *Disk_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
  Disk *self = (Disk *)type->tp_alloc(type, 0);
  if (!self)
    return NULL;
  pthread_mutex_init(&self->lock, NULL);
  self->sock = -1;
  return (PyObject *)self;
}

static void Disk_dealloc(Disk *self) {
  if (self->sock >= 0)
    close(self->sock);
  PyMem_RawFree(self->lo);
  PyMem_RawFree(self->hi);
  PyMem_RawFree(self->zlo);
  PyMem_RawFree(self->zhi);
  PyMem_RawFree(self->out);
  pthread_mutex_destroy(&self->lock);
  Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Disk_remove(Disk *self, PyObject *args) {
  unsigned long long off, len;
  if (!PyArg_ParseTuple(args, "KK", &off, &len))
    return NULL;
  if (!len)
    Py_RETURN_NONE;
  if (off + len < off) {
    PyErr_SetString(PyExc_ValueError, "range past 2**64");
    return NULL;
  }
  int rc;
  Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&self->lock);
  rc = disk_remove_locked(self, off, off + len);
  pthread_mutex_unlock(&self->lock);
  Py_END_ALLOW_THREADS if (rc < 0) {
    /* Out of memory splitting an extent: nothing is read here any more, Python checks. */
    disk_fail(self);
    return PyErr_NoMemory();
  }
  Py_RETURN_NONE;
}

static PyObject *Disk_contains(Disk *self, PyObject *args) {
  unsigned long long off, len;
  if (!PyArg_ParseTuple(args, "KK", &off, &len))
    return NULL;
  if (off + len < off)
    Py_RETURN_FALSE;
  return PyBool_FromLong(!len || disk_readable(self, off, len));
}

static PyObject *Disk_close(Disk *self, PyObject *unused) {
  disk_fail(self);
  Py_RETURN_NONE;
}

static PyObject *Disk_get_alive(Disk *self, void *c) {
  return PyBool_FromLong(__atomic_load_n(&self->alive, __ATOMIC_ACQUIRE));
}

static PyObject *Disk_get_next(Disk *self, void *c) {
  uint64_t v = __atomic_load_n(&self->next, __ATOMIC_RELAXED);
  return v == UINT64_MAX ? PyLong_FromLong(-1) : PyLong_FromUnsignedLongLong(v);
}

static int Disk_set_next(Disk *self, PyObject *value, void *c) {
  if (!value) {
    PyErr_SetString(PyExc_AttributeError, "next cannot be deleted");
    return -1;
  }
  long long v = PyLong_AsLongLong(value);
  if (v == -1 && PyErr_Occurred())
    return -1;
  __atomic_store_n(&self->next, v < 0 ? UINT64_MAX : (uint64_t)v, __ATOMIC_RELAXED);
  return 0;
}

static PyObject *Disk_get_counters(Disk *self, void *c) {
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K}", "reads", self->reads, "bytes", self->bytes,
                       "declined", self->declined, "copied", self->copied, "errors",
                       self->errors);
}

static PyObject *Disk_get_bytes(Disk *self, void *c) {
  return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->bytes, __ATOMIC_RELAXED));
}

static PyMethodDef Disk_methods[] = {
    {"remove", (PyCFunction)Disk_remove, METH_VARARGS,
     "remove(offset, length): take the range out of the readable set (any thread)."},
    {"contains", (PyCFunction)Disk_contains, METH_VARARGS,
     "contains(offset, length): whether the whole range is readable now."},
    {"close", (PyCFunction)Disk_close, METH_NOARGS,
     "Read nothing more here; break off a blocked receive (any thread)."},
    {NULL}};

static PyGetSetDef Disk_getset[] = {
    {"alive", (getter)Disk_get_alive, NULL, "Whether READs are still answered here.", NULL},
    {"next", (getter)Disk_get_next, (setter)Disk_set_next,
     "Where the last READ of this disk ended (-1: none).", NULL},
    {"counters", (getter)Disk_get_counters, NULL, "READs answered, bytes, ... (a dict).", NULL},
    {"bytes", (getter)Disk_get_bytes, NULL, "Bytes answered here.", NULL},
    {NULL}};

static PyTypeObject DiskType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "snapfs._fastpath.Disk",
    .tp_doc = "Disk(ino, size, confine, sock, starts, ends, read_ahead_min): one disk's READs.",
    .tp_basicsize = sizeof(Disk),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Disk_new,
    .tp_init = (initproc)Disk_init,
    .tp_dealloc = (destructor)Disk_dealloc,
    .tp_methods = Disk_methods,
    .tp_getset = Disk_getset,
};

/* -- Intake ---------------------------------------------------------------------------------- */

struct slot {
  Disk *disk; /* NULL: free */
  uint64_t cookie, unique;
  uint32_t len;
  unsigned char raw[READ_IN_BYTES]; /* the request, to hand back */
};

struct handback {
  unsigned char *buf;
  size_t len;
};

typedef struct {
  PyObject_HEAD
  int fuse;          /* our own descriptor of /dev/fuse (non-blocking) */
  int pipe_r, pipe_w;
  unsigned char *req, *copy;
  Disk *disks[MAX_DISKS];
  int ndisks;        /* atomic: disks[0..ndisks) are set */
  struct slot slots[MAX_PENDING];
  int pending;
  struct handback *back;
  size_t nback, capback;
  int end_errno;     /* the connection ended: why (ENODEV) */
  int wake[4];       /* descriptors of the caller's other work (take's argument) */
  int nwake;
  int ep;            /* epoll: /dev/fuse, the disks' sockets, the wake descriptors */
  int fuse_on, wake_on; /* whether those are watched for input now */
  int woken;         /* one of them became readable: stop reading requests, return */
  int idle;          /* take's argument: wait for requests while none is in flight */
  int oom;
  unsigned long long requests, reads;
} Intake;

static void handback(Intake *in, const void *p, size_t n) {
  if (in->nback == in->capback) {
    size_t cap = in->capback ? 2 * in->capback : 64;
    struct handback *b = PyMem_RawRealloc(in->back, cap * sizeof *b);
    if (!b) {
      in->oom = 1;
      return;
    }
    in->back = b;
    in->capback = cap;
  }
  unsigned char *copy = PyMem_RawMalloc(n);
  if (!copy) {
    in->oom = 1;
    return;
  }
  memcpy(copy, p, n);
  in->back[in->nback].buf = copy;
  in->back[in->nback].len = n;
  in->nback++;
}

static void decline_slot(Intake *in, struct slot *s) {
  s->disk->declined++;
  handback(in, s->raw, sizeof s->raw);
  s->disk = NULL;
  in->pending--;
}

/* The disk's connection cannot go on: its READs in flight go back to Python. */
static void fail_disk(Intake *in, Disk *d) {
  disk_fail(d);
  epoll_ctl(in->ep, EPOLL_CTL_DEL, d->sock, NULL);
  d->nout = 0;
  for (int k = 0; k < MAX_PENDING; k++)
    if (in->slots[k].disk == d)
      decline_slot(in, &in->slots[k]);
}

static Disk *find_disk(Intake *in, uint64_t ino) {
  int n = __atomic_load_n(&in->ndisks, __ATOMIC_ACQUIRE);
  for (int k = 0; k < n; k++)
    if (in->disks[k]->ino == ino)
      return in->disks[k];
  return NULL;
}

/* A request just read: start answering it (a READ taken here) or hand it back. */
static void take_request(Intake *in, size_t n) {
  struct fuse_in_header *h = (struct fuse_in_header *)in->req;
  in->requests++;
  if (h->opcode != FUSE_READ || n < READ_IN_BYTES) {
    handback(in, in->req, n);
    return;
  }
  struct fuse_read_in *r = (struct fuse_read_in *)(h + 1);
  Disk *d = find_disk(in, h->nodeid);
  if (!d) {
    handback(in, in->req, n);
    return;
  }
  uint64_t off = r->offset, len = 0;
  if (off < d->size)
    len = r->size < d->size - off ? r->size : d->size - off;
  int take = __atomic_load_n(&d->alive, __ATOMIC_ACQUIRE) && r->size <= MAX_READ && len &&
             !(len >= d->read_ahead_min && off == d->next) &&
             !(d->confine && off / d->confine != (off + len - 1) / d->confine) &&
             !ranges_contain(d->zlo, d->zhi, d->zn, off, len) && disk_readable(d, off, len);
  if (!take) {
    /* Python answers it, and notes where it ended (SpliceReads.follow). */
    d->declined++;
    handback(in, in->req, n);
    return;
  }
  d->next = off + len;
  struct slot *s = NULL;
  for (int k = 0; k < MAX_PENDING; k++)
    if (!in->slots[k].disk) {
      s = &in->slots[k];
      break;
    }
  /* There is one: requests are read only while fewer than MAX_PENDING are in flight. */
  s->disk = d;
  s->cookie = ++d->cookie;
  s->unique = h->unique;
  s->len = (uint32_t)len;
  memcpy(s->raw, in->req, sizeof s->raw);
  in->pending++;
  struct nbd_request *q = &d->out[d->nout++];
  q->magic = htobe32(NBD_REQUEST_MAGIC);
  q->flags = 0;
  q->type = htobe16(NBD_CMD_READ);
  q->cookie = htobe64(s->cookie);
  q->offset = htobe64(off);
  q->length = htobe32((uint32_t)len);
}

static int send_all(int fd, const void *p, size_t n) {
  while (n) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return -1;
    p = (const char *)p + r;
    n -= (size_t)r;
  }
  return 0;
}

static int recv_all(int fd, void *p, size_t n) {
  while (n) {
    ssize_t r = recv(fd, p, n, MSG_WAITALL);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return -1;
    p = (char *)p + r;
    n -= (size_t)r;
  }
  return 0;
}

static void flush_requests(Intake *in) {
  int n = __atomic_load_n(&in->ndisks, __ATOMIC_ACQUIRE);
  for (int k = 0; k < n; k++) {
    Disk *d = in->disks[k];
    if (!d->nout)
      continue;
    /* All requests made since the last wait in one send: one wakeup of QEMU. */
    if (send_all(d->sock, d->out, (size_t)d->nout * sizeof *d->out) < 0)
      fail_disk(in, d);
    d->nout = 0;
  }
}

/* Read what is in the pipe and drop it (a reply nobody takes, or a stream that broke). */
static void drain_pipe(Intake *in, size_t n) {
  while (n) {
    ssize_t r = read(in->pipe_r, in->copy, n < REQ_BUF ? n : REQ_BUF);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return;
    n -= (size_t)r;
  }
}

static void deliver(Intake *in, size_t total) {
  for (;;) {
    ssize_t r = splice(in->pipe_r, NULL, in->fuse, NULL, total, SPLICE_F_MOVE);
    if (r == (ssize_t)total)
      return;
    if (r < 0 && errno == EINTR)
      continue;
    /* ENOENT: the READ was interrupted. ENODEV: unmounted. Either way nobody reads it. */
    if (r < 0 && errno != ENOENT)
      in->end_errno = errno;
    drain_pipe(in, r > 0 ? total - (size_t)r : total);
    return;
  }
}

/* One reply off the disk's socket, answered. */
static void receive(Intake *in, Disk *d) {
  struct nbd_simple_reply rep;
  if (recv_all(d->sock, &rep, sizeof rep) < 0 || be32toh(rep.magic) != NBD_SIMPLE_REPLY_MAGIC) {
    fail_disk(in, d);
    return;
  }
  uint64_t cookie = be64toh(rep.cookie);
  struct slot *s = NULL;
  for (int k = 0; k < MAX_PENDING; k++)
    if (in->slots[k].disk == d && in->slots[k].cookie == cookie) {
      s = &in->slots[k];
      break;
    }
  if (!s) { /* a reply to nothing we asked: the stream cannot be trusted */
    fail_disk(in, d);
    return;
  }
  if (rep.error) { /* no payload follows a simple error reply */
    d->errors++;
    decline_slot(in, s);
    return;
  }
  uint32_t len = s->len;
  struct fuse_out_header oh = {.len = (uint32_t)sizeof oh + len, .error = 0, .unique = s->unique};
  if (write(in->pipe_w, &oh, sizeof oh) != (ssize_t)sizeof oh) { /* an empty 1 MiB pipe */
    fail_disk(in, d);
    return;
  }
  uint32_t moved = 0;
  int after_poll = 0;
  while (moved < len) {
    ssize_t r = splice(d->sock, NULL, in->pipe_w, NULL, len - moved,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (r > 0) {
      moved += (uint32_t)r;
      after_poll = 0;
      continue;
    }
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0 && errno == EAGAIN && !after_poll) {
      struct pollfd p = {d->sock, POLLIN, 0};
      if (poll(&p, 1, -1) < 0 && errno != EINTR)
        break;
      after_poll = 1;
      continue;
    }
    if (r < 0 && errno == EAGAIN) {
      /* The socket has bytes and the pipe takes none: its slots are full of small pieces.
       * This reply goes the copying way. */
      size_t have = sizeof oh + moved;
      size_t got = 0;
      while (got < have) {
        ssize_t k = read(in->pipe_r, in->copy + got, have - got);
        if (k < 0 && errno == EINTR)
          continue;
        if (k <= 0)
          break;
        got += (size_t)k;
      }
      if (got != have || recv_all(d->sock, in->copy + have, len - moved) < 0) {
        drain_pipe(in, have - got);
        fail_disk(in, d);
        return;
      }
      d->copied++;
      if (write(in->fuse, in->copy, sizeof oh + len) < 0 && errno != ENOENT)
        in->end_errno = errno;
      goto answered;
    }
    break; /* EOF or an error of the socket */
  }
  if (moved < len) {
    drain_pipe(in, sizeof oh + moved);
    fail_disk(in, d);
    return;
  }
  deliver(in, sizeof oh + len);
answered:
  d->reads++;
  d->bytes += len;
  in->reads++;
  s->disk = NULL;
  in->pending--;
}

/* epoll tags of what is not a Disk (whose tag is the Disk itself). */
static char TAG_FUSE, TAG_WAKE;

/* Watch a registered descriptor for input or not (level-triggered: a descriptor we do not
 * want to read now would wake every wait). */
static void watch(Intake *in, int fd, void *tag, int on) {
  struct epoll_event ev = {.events = on ? EPOLLIN : 0, .data.ptr = tag};
  epoll_ctl(in->ep, EPOLL_CTL_MOD, fd, &ev);
}

/* Wait for a reply (or for a request while there is room); answer the replies that came.
 * Whether /dev/fuse has requests (level-triggered: it said so if it had any when the wait
 * ended; later ones end the next wait). epoll, not poll(2): poll adds a wait on /dev/fuse
 * and removes it again every time, under the lock that every reader's request takes too. */
static int wait_and_receive(Intake *in, int read_more) {
  if (read_more != in->fuse_on) {
    watch(in, in->fuse, &TAG_FUSE, read_more);
    in->fuse_on = read_more;
  }
  int wake = !in->woken;
  if (wake != in->wake_on) {
    for (int k = 0; k < in->nwake; k++)
      watch(in, in->wake[k], &TAG_WAKE, wake);
    in->wake_on = wake;
  }
  struct epoll_event evs[MAX_DISKS + 6];
  /* Unbounded as every view read: close() shuts the socket down, which ends the wait. */
  int n = epoll_wait(in->ep, evs, MAX_DISKS + 6, -1);
  if (n < 0) /* EINTR: look again */
    return read_more;
  int requests = 0;
  for (int k = 0; k < n; k++) {
    void *tag = evs[k].data.ptr;
    if (tag == &TAG_WAKE) {
      in->woken = 1;
      continue;
    }
    if (tag == &TAG_FUSE) {
      requests = 1; /* read by the caller */
      continue;
    }
    Disk *d = tag;
    int asked = 0;
    for (int j = 0; j < MAX_PENDING && !asked; j++)
      asked = in->slots[j].disk == d;
    if (asked)
      receive(in, d);
    else /* input nobody asked for, or a socket shut down: not watched again */
      fail_disk(in, d);
  }
  return requests;
}

/* Whether to read more requests now: not once the caller has other work (its descriptors
 * woke, or a batch of requests is to be handed back to it), so that waits for the READs in
 * flight only. Requests that come together are handed back together, as Python would have
 * read them. */
static int reading(Intake *in, unsigned long long taken, unsigned long long limit) {
  return in->pending < MAX_PENDING && taken < limit && !in->end_errno && !in->oom &&
         !in->woken && in->nback < HANDBACK_BATCH;
}

static void serve(Intake *in, unsigned long long limit) {
  unsigned long long taken = 0;
  int more = 1; /* /dev/fuse may have requests */
  in->woken = 0;
  for (;;) {
    while (more && reading(in, taken, limit)) {
      ssize_t n = read(in->fuse, in->req, REQ_BUF);
      if (n < 0) {
        if (errno == EINTR || errno == ENOENT) /* ENOENT: interrupted before we read it */
          continue;
        if (errno == EAGAIN)
          more = 0;
        else
          in->end_errno = errno;
        break;
      }
      if (n == 0) {
        in->end_errno = ENODEV;
        break;
      }
      taken++;
      take_request(in, (size_t)n);
    }
    flush_requests(in);
    int read_more = reading(in, taken, limit);
    /* Nothing in flight and nothing to hand back: wait here for the next request (or for the
     * caller's other work) when the caller allows it, rather than return to Python and come
     * back through its wait, which readers between two READs would cause all the time. */
    if (!in->pending && !(in->idle && read_more && !more && !in->nback))
      return;
    /* Read /dev/fuse again only when it has requests: after a wake for replies alone, a
     * read would only find it empty. */
    more = wait_and_receive(in, read_more) && read_more;
  }
}

static PyObject *Intake_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
  Intake *self = (Intake *)type->tp_alloc(type, 0);
  if (!self)
    return NULL;
  self->fuse = self->pipe_r = self->pipe_w = self->ep = -1;
  return (PyObject *)self;
}

static void intake_release(Intake *self) {
  for (int k = 0; k < self->ndisks; k++)
    Py_CLEAR(self->disks[k]);
  self->ndisks = 0;
  for (size_t k = 0; k < self->nback; k++)
    PyMem_RawFree(self->back[k].buf);
  self->nback = 0;
  int *fds[] = {&self->fuse, &self->pipe_r, &self->pipe_w, &self->ep};
  for (int k = 0; k < 4; k++)
    if (*fds[k] >= 0) {
      close(*fds[k]);
      *fds[k] = -1;
    }
}

static int Intake_init(Intake *self, PyObject *args, PyObject *kwds) {
  static char *kwlist[] = {"fuse", NULL};
  int fuse;
  if (self->req) {
    PyErr_SetString(PyExc_RuntimeError, "an Intake is made once");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &fuse))
    return -1;
  self->req = PyMem_RawMalloc(REQ_BUF);
  self->copy = PyMem_RawMalloc(REQ_BUF + sizeof(struct fuse_out_header));
  if (!self->req || !self->copy) {
    PyErr_NoMemory();
    return -1;
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
  }
  self->pipe_r = p[0];
  self->pipe_w = p[1];
  self->fuse = fcntl(fuse, F_DUPFD_CLOEXEC, 0);
  /* The read end never blocks: draining stops at an empty pipe (the kernel takes a reply's
   * pages out of the pipe even when it refuses the reply). */
  if (self->fuse < 0 || fcntl(self->pipe_w, F_SETPIPE_SZ, PIPE_BYTES) < 0 ||
      fcntl(self->pipe_r, F_SETFL, O_NONBLOCK) < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    intake_release(self);
    return -1;
  }
  self->ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &TAG_FUSE};
  if (self->ep < 0 || epoll_ctl(self->ep, EPOLL_CTL_ADD, self->fuse, &ev) < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    intake_release(self);
    return -1;
  }
  self->fuse_on = 1;
  return 0;
}

static void Intake_dealloc(Intake *self) {
  intake_release(self);
  PyMem_RawFree(self->back);
  PyMem_RawFree(self->req);
  PyMem_RawFree(self->copy);
  Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Intake_add(Intake *self, PyObject *arg) {
  if (!PyObject_TypeCheck(arg, &DiskType)) {
    PyErr_SetString(PyExc_TypeError, "add() takes a Disk");
    return NULL;
  }
  Disk *d = (Disk *)arg;
  if (self->fuse < 0 || self->ndisks == MAX_DISKS || find_disk(self, d->ino))
    Py_RETURN_FALSE;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = d};
  if (epoll_ctl(self->ep, EPOLL_CTL_ADD, d->sock, &ev) < 0)
    Py_RETURN_FALSE;
  Py_INCREF(arg);
  self->disks[self->ndisks] = (Disk *)arg;
  __atomic_store_n(&self->ndisks, self->ndisks + 1, __ATOMIC_RELEASE);
  Py_RETURN_TRUE;
}

/* take(limit, wake) -> (answered, [request bytes handed back], ended): see the module. */
static PyObject *Intake_take(Intake *self, PyObject *args) {
  unsigned long long limit;
  PyObject *wake;
  int idle = 0;
  if (!PyArg_ParseTuple(args, "KO!|p", &limit, &PyTuple_Type, &wake, &idle))
    return NULL;
  Py_ssize_t nwake = PyTuple_GET_SIZE(wake);
  if (nwake > 4) {
    PyErr_SetString(PyExc_ValueError, "at most 4 descriptors to wake on");
    return NULL;
  }
  int fds[4];
  int same = nwake == self->nwake;
  for (Py_ssize_t k = 0; k < nwake; k++) {
    long fd = PyLong_AsLong(PyTuple_GET_ITEM(wake, k));
    if (fd == -1 && PyErr_Occurred())
      return NULL;
    if (fd < 0 || fd > INT_MAX) {
      PyErr_SetString(PyExc_ValueError, "not a descriptor");
      return NULL;
    }
    fds[k] = (int)fd;
    same = same && fds[k] == self->wake[k];
  }
  if (!same) { /* registered once: they stay the same for the life of the reader */
    for (int k = 0; k < self->nwake; k++)
      epoll_ctl(self->ep, EPOLL_CTL_DEL, self->wake[k], NULL);
    self->nwake = 0;
    for (Py_ssize_t k = 0; k < nwake; k++) {
      struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &TAG_WAKE};
      if (epoll_ctl(self->ep, EPOLL_CTL_ADD, fds[k], &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
      self->wake[self->nwake++] = fds[k];
    }
    self->wake_on = 1;
  }
  if (self->fuse < 0) {
    PyErr_SetString(PyExc_ValueError, "the intake is closed");
    return NULL;
  }
  unsigned long long before = self->reads;
  self->idle = idle;
  Py_BEGIN_ALLOW_THREADS serve(self, limit ? limit : 1);
  Py_END_ALLOW_THREADS PyObject *back = PyList_New((Py_ssize_t)self->nback);
  if (!back)
    return NULL;
  for (size_t k = 0; k < self->nback; k++) {
    PyObject *b = PyBytes_FromStringAndSize((char *)self->back[k].buf, (Py_ssize_t)self->back[k].len);
    PyMem_RawFree(self->back[k].buf);
    self->back[k].buf = NULL;
    if (!b) {
      for (size_t j = k + 1; j < self->nback; j++)
        PyMem_RawFree(self->back[j].buf);
      self->nback = 0;
      Py_DECREF(back);
      return NULL;
    }
    PyList_SET_ITEM(back, (Py_ssize_t)k, b);
  }
  self->nback = 0;
  if (self->oom) {
    self->oom = 0;
    Py_DECREF(back);
    return PyErr_NoMemory();
  }
  return Py_BuildValue("KNi", self->reads - before, back, self->end_errno);
}

static PyObject *Intake_close(Intake *self, PyObject *unused) {
  intake_release(self);
  Py_RETURN_NONE;
}

static PyObject *Intake_get_requests(Intake *self, void *c) {
  return PyLong_FromUnsignedLongLong(self->requests);
}

static PyMethodDef Intake_methods[] = {
    {"add", (PyCFunction)Intake_add, METH_O,
     "add(disk): answer that disk's READs here too (any thread); False if it cannot."},
    {"take", (PyCFunction)Intake_take, METH_VARARGS,
     "take(limit, wake) -> (answered, handed_back, ended_errno): read up to limit requests,\n"
     "fewer once a descriptor in the tuple wake is readable."},
    {"close", (PyCFunction)Intake_close, METH_NOARGS,
     "Close the descriptors and let the disks go (the thread that takes)."},
    {NULL}};

static PyGetSetDef Intake_getset[] = {
    {"requests", (getter)Intake_get_requests, NULL, "Requests read here.", NULL}, {NULL}};

static PyTypeObject IntakeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "snapfs._fastpath.Intake",
    .tp_doc = "Intake(fuse): reads FUSE requests and answers the READs of its disks.",
    .tp_basicsize = sizeof(Intake),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Intake_new,
    .tp_init = (initproc)Intake_init,
    .tp_dealloc = (destructor)Intake_dealloc,
    .tp_methods = Intake_methods,
    .tp_getset = Intake_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "snapfs._fastpath",
    "The compiled part of the splice data path (see snapfs.fastpath).", -1, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
  if (PyType_Ready(&DiskType) < 0 || PyType_Ready(&IntakeType) < 0)
    return NULL;
  PyObject *m = PyModule_Create(&module);
  if (!m)
    return NULL;
  Py_INCREF(&DiskType);
  Py_INCREF(&IntakeType);
  if (PyModule_AddObject(m, "Disk", (PyObject *)&DiskType) < 0 ||
      PyModule_AddObject(m, "Intake", (PyObject *)&IntakeType) < 0 ||
      PyModule_AddIntConstant(m, "MAX_READ", MAX_READ) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
