/*
 * _vring: the split virtqueue's ring mechanics, compiled.
 *
 * Theory of operation
 * -------------------
 * shardswitch/virtio/virtqueue.py is the reference: this file does what its
 * Virtqueue does, call for call, for the hot calls of the packet path (pop,
 * pop_writable, unpop, push, push_run, flush, enable_kicks, disable_kicks,
 * avail_pending), with the same checks, in the same order, raising the same
 * errors with the same messages.  The tests hold it to that: a differential
 * fuzz test feeds both the same rings, valid and hostile, and compares every
 * result (tests/virtio/test_virtio_fastring.py).  It holds no protocol logic
 * and no dirty logging (a queue that logs runs on the reference; see
 * fastring.py).
 *
 * Two types:
 *
 * Regions - the guest-physical translation table of one GuestMemory.  Each
 *   entry keeps a buffer export of the region's memoryview while it is in
 *   the table, so the mapping cannot go away under a raw pointer; GuestMemory
 *   removes an entry (dropping the export) before it unmaps the region.
 *   translate() is GuestMemory.gpa: the whole range inside ONE region, the
 *   region that answered last tried first.
 *
 * Ring - one queue over three ring areas (memoryviews of guest memory, held
 *   exported until release()) and a Regions.  Buffers handed to Python are
 *   slices of the region's memoryview, exactly what GuestMemory.gpa returns,
 *   so they pin the mapping as the reference's do.
 *
 * Guest memory can change under us at any time: every field the guest
 * writes is loaded once (volatile) into a local, checked, then used.  Stores
 * of used elements precede the store of used.idx (x86-64 keeps stores in
 * order; the compiler is kept from reordering by the release store), and a
 * full fence separates "publish used.idx" / "ask for kicks" from the loads
 * that decide about notifications, as barrier.py explains.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#define MAX_REGIONS 32          /* vhost/wire.py MAX_MEM_SLOTS */
#define MAX_QUEUE_SIZE 32768
#define DESC_SIZE 16
#define MAX_INDIRECT MAX_QUEUE_SIZE
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define AVAIL_NO_INTERRUPT 1
#define USED_NO_NOTIFY 1

#define LOAD16(p) (*(volatile const uint16_t *)(p))
#define LOAD32(p) (*(volatile const uint32_t *)(p))
#define LOAD64(p) (*(volatile const uint64_t *)(p))

/* A method table entry; the docstrings name the reference's method, whose docstring says it all. */
#define METHOD(name, fn, kind, doc) {name, (PyCFunction)(void (*)(void))fn, kind, PyDoc_STR(doc)}

/* ------------------------------------------------------------------ Regions */

typedef struct {
    uint64_t start;             /* guest-physical address of the first byte */
    uint64_t size;
    char *host;                 /* where that byte is mapped here */
    PyObject *view;             /* the region's memoryview: buffers are slices of it */
    Py_buffer buf;              /* export of view, held while the entry exists */
} Region;

typedef struct {
    PyObject_HEAD
    Region r[MAX_REGIONS];
    int count;
    int last;                   /* the entry that answered last */
} RegionsObject;

static void regions_drop(Region *e)
{
    PyBuffer_Release(&e->buf);
    Py_CLEAR(e->view);
}

static void Regions_dealloc(RegionsObject *self)
{
    for (int i = 0; i < self->count; i++)
        regions_drop(&self->r[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Regions_add(RegionsObject *self, PyObject *args)
{
    unsigned long long start;
    PyObject *view;
    if (!PyArg_ParseTuple(args, "KO", &start, &view))
        return NULL;
    if (self->count >= MAX_REGIONS) {
        PyErr_SetString(PyExc_ValueError, "too many regions");
        return NULL;
    }
    Region *e = &self->r[self->count];
    if (PyObject_GetBuffer(view, &e->buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_INCREF(view);
    e->view = view;
    e->start = start;
    e->size = (uint64_t)e->buf.len;
    e->host = e->buf.buf;
    self->count++;
    Py_RETURN_NONE;
}

static PyObject *Regions_remove(RegionsObject *self, PyObject *view)
{
    for (int i = 0; i < self->count; i++) {
        if (self->r[i].view == view) {
            regions_drop(&self->r[i]);
            memmove(&self->r[i], &self->r[i + 1], (size_t)(self->count - i - 1) * sizeof(Region));
            self->count--;
            self->last = 0;
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static PyObject *Regions_clear(RegionsObject *self, PyObject *Py_UNUSED(unused))
{
    for (int i = 0; i < self->count; i++)
        regions_drop(&self->r[i]);
    self->count = 0;
    self->last = 0;
    Py_RETURN_NONE;
}

/* The entry holding [addr, addr + len) whole, or -1.  *off: the offset of addr in it. */
static inline int translate(RegionsObject *m, uint64_t addr, uint64_t len, uint64_t *off)
{
    int n = m->count;
    if (n == 0)
        return -1;
    Region *e = &m->r[m->last];
    if (m->last < n && addr >= e->start && addr - e->start <= e->size && len <= e->size - (addr - e->start)) {
        *off = addr - e->start;
        return m->last;
    }
    for (int i = 0; i < n; i++) {
        e = &m->r[i];
        if (addr >= e->start && addr - e->start <= e->size && len <= e->size - (addr - e->start)) {
            m->last = i;
            *off = addr - e->start;
            return i;
        }
    }
    return -1;
}

static PyMethodDef Regions_methods[] = {
    METHOD("add", Regions_add, METH_VARARGS, "add(start, view): guest-physical start is at view."),
    METHOD("remove", Regions_remove, METH_O, "remove(view): drop view's entry; False if absent."),
    METHOD("clear", Regions_clear, METH_NOARGS, "clear(): drop every entry."),
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RegionsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardswitch.virtio._vring.Regions",
    .tp_doc = PyDoc_STR("Guest-physical translation table of one GuestMemory."),
    .tp_basicsize = sizeof(RegionsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Regions_dealloc,
    .tp_methods = Regions_methods,
};

/* --------------------------------------------------------------------- Ring */

typedef struct {
    PyObject_HEAD
    RegionsObject *mem;
    PyObject *error;            /* VirtqueueError */
    Py_buffer desc_buf, avail_buf, used_buf;
    int held;                   /* the three buffers are held */
    const char *desc;           /* num x {u64 addr, u32 len, u16 flags, u16 next} */
    char *avail;                /* u16 flags, idx, ring[num], used_event */
    char *used;                 /* u16 flags, idx, {u32 id, u32 len}[num], u16 avail_event */
    uint32_t num, mask;
    int event_idx, indirect;
    uint16_t last;              /* next avail index to read */
    uint16_t shadow;            /* last avail.idx read from the guest */
    uint16_t used_idx;          /* used.idx as last published */
    uint32_t pending;           /* pushed, not yet published */
    uint32_t inflight;          /* popped, neither pushed nor given back */
    int signalled_valid;
} RingObject;

#define AVAIL_IDX(q) LOAD16((q)->avail + 2)
#define AVAIL_RING(q, slot) LOAD16((q)->avail + 4 + 2 * (size_t)(slot))
#define USED_EVENT(q) LOAD16((q)->avail + 4 + 2 * (size_t)(q)->num)
#define AVAIL_FLAGS(q) LOAD16((q)->avail)
#define AVAIL_EVENT_PTR(q) ((volatile uint16_t *)((q)->used + 4 + 8 * (size_t)(q)->num))

static PyObject *ring_error(RingObject *q, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    PyErr_SetString(q->error, msg);
    return NULL;
}

#define RANGE_FMT "guest range 0x%llx+0x%llx is not inside one memory region"

static void ring_release_buffers(RingObject *q)
{
    if (q->held) {
        PyBuffer_Release(&q->desc_buf);
        PyBuffer_Release(&q->avail_buf);
        PyBuffer_Release(&q->used_buf);
        q->held = 0;
    }
}

static void Ring_dealloc(RingObject *q)
{
    ring_release_buffers(q);
    Py_CLEAR(q->mem);
    Py_CLEAR(q->error);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static int Ring_init(RingObject *q, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"regions", "desc", "avail", "used", "num", "last_avail", "used_idx", "event_idx",
                         "indirect", "error", NULL};
    PyObject *regions, *desc, *avail, *used, *error;
    unsigned int num, last, used_idx;
    int event_idx, indirect;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOIIIppO", kw, &RegionsType, &regions, &desc, &avail,
                                     &used, &num, &last, &used_idx, &event_idx, &indirect, &error))
        return -1;
    if (num < 1 || num > MAX_QUEUE_SIZE || (num & (num - 1)) || last > 0xFFFF || used_idx > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "bad ring geometry");
        return -1;
    }
    ring_release_buffers(q);
    if (PyObject_GetBuffer(desc, &q->desc_buf, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (PyObject_GetBuffer(avail, &q->avail_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&q->desc_buf);
        return -1;
    }
    if (PyObject_GetBuffer(used, &q->used_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&q->desc_buf);
        PyBuffer_Release(&q->avail_buf);
        return -1;
    }
    q->held = 1;
    if (q->desc_buf.len < (Py_ssize_t)(DESC_SIZE * num) || q->avail_buf.len < (Py_ssize_t)(6 + 2 * num)
        || q->used_buf.len < (Py_ssize_t)(6 + 8 * num)) {
        ring_release_buffers(q);
        PyErr_SetString(PyExc_ValueError, "ring area too small");
        return -1;
    }
    Py_INCREF(regions);
    Py_XSETREF(q->mem, (RegionsObject *)regions);
    Py_INCREF(error);
    Py_XSETREF(q->error, error);
    q->desc = q->desc_buf.buf;
    q->avail = q->avail_buf.buf;
    q->used = q->used_buf.buf;
    q->num = num;
    q->mask = num - 1;
    q->event_idx = event_idx;
    q->indirect = indirect;
    q->last = q->shadow = (uint16_t)last;
    q->used_idx = (uint16_t)used_idx;
    q->pending = q->inflight = 0;
    q->signalled_valid = 0;
    return 0;
}

static int ring_alive(RingObject *q)
{
    if (!q->held) {
        PyErr_SetString(PyExc_ValueError, "ring released");
        return 0;
    }
    return 1;
}

/* Virtqueue.avail_pending: chains available and not popped (-1 with an error set). */
static long avail_pending(RingObject *q)
{
    uint16_t idx = AVAIL_IDX(q);
    uint16_t pending = (uint16_t)(idx - q->last);
    if (pending > q->num) {
        ring_error(q, "avail idx %u is more than %u ahead of %u", idx, q->num, q->last);
        return -1;
    }
    q->shadow = idx;
    return pending;
}

/* A new slice of guest memory: what GuestMemory.gpa returns. */
static inline PyObject *slice(RingObject *q, int region, uint64_t off, uint64_t len)
{
    return PySequence_GetSlice(q->mem->r[region].view, (Py_ssize_t)off, (Py_ssize_t)(off + len));
}

static int append_new(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/*
 * What a walk does with each buffer it validated: append views to lists (pop, pop_writable) or
 * gather a TX frame (pop_frame).  fn returns 0, or -1 with an error set.
 */
typedef struct Visitor {
    int (*fn)(RingObject *q, struct Visitor *v, int writable, int region, uint64_t off, uint32_t len);
    PyObject *readable;         /* lists: may be NULL (readable buffers checked, no views made) */
    PyObject *writable;
    /* gather: netdev.tx_frame's rules (see gather_visit) */
    uint64_t skip;              /* header bytes still to skip */
    char *out;                  /* the scratch buffer */
    Py_ssize_t cap, used;       /* its size, bytes gathered */
    Py_ssize_t pieces;          /* non-empty pieces of frame so far */
    int first_region;           /* the first piece, kept in place while it is the only one */
    uint64_t first_off, first_len;
    int flags;                  /* first byte of the first non-empty readable buffer, -1: none yet */
} Visitor;

static int list_visit(RingObject *q, Visitor *v, int writable, int region, uint64_t off, uint32_t len)
{
    if (writable)
        return append_new(v->writable, slice(q, region, off, len));
    if (v->readable != NULL)
        return append_new(v->readable, slice(q, region, off, len));
    return 0;
}

static void gather_copy(RingObject *q, Visitor *v, int region, uint64_t off, uint64_t len)
{
    Py_ssize_t room = v->cap - v->used;
    Py_ssize_t n = (Py_ssize_t)len < room ? (Py_ssize_t)len : room;
    if (n > 0)
        memcpy(v->out + v->used, q->mem->r[region].host + off, (size_t)n);
    v->used += n;
}

/* netdev.tx_frame: skip the header, keep a lone piece in place, gather two or more into the scratch. */
static int gather_visit(RingObject *q, Visitor *v, int writable, int region, uint64_t off, uint32_t len)
{
    if (writable)
        return 0;
    if (v->flags < 0 && len > 0)
        v->flags = (unsigned char)q->mem->r[region].host[off];
    if (v->skip >= len) {
        v->skip -= len;
        return 0;
    }
    off += v->skip;
    uint64_t size = len - v->skip;
    v->skip = 0;
    v->pieces++;
    if (v->pieces == 1) {
        v->first_region = region;
        v->first_off = off;
        v->first_len = size;
        return 0;
    }
    if (v->pieces == 2)
        gather_copy(q, v, v->first_region, v->first_off, v->first_len);
    gather_copy(q, v, region, off, size);
    return 0;
}

/*
 * Virtqueue._walk: follow the chain at head through NEXT and INDIRECT descriptors, giving each
 * buffer to the visitor.  0, or -1 with an error.
 */
static int walk(RingObject *q, uint16_t head, Visitor *v)
{
    const char *table = q->desc;
    uint32_t size = q->num;
    int in_indirect = 0;
    uint32_t i = head, visited = 0;
    Py_ssize_t nwritable = 0;
    for (;;) {
        const char *d = table + (size_t)DESC_SIZE * i;
        uint16_t flags = LOAD16(d + 12);
        if (flags & F_INDIRECT) {
            if (in_indirect) {
                ring_error(q, "chain %u: indirect descriptor inside an indirect table", head);
                return -1;
            }
            if (!q->indirect) {
                ring_error(q, "chain %u: indirect descriptor without INDIRECT_DESC", head);
                return -1;
            }
            if (flags & F_NEXT) {
                ring_error(q, "chain %u: indirect descriptor %u also has NEXT", head, i);
                return -1;
            }
            uint64_t addr = LOAD64(d);
            uint32_t length = LOAD32(d + 8);
            if (length == 0 || length % DESC_SIZE || length > (uint64_t)MAX_INDIRECT * DESC_SIZE) {
                ring_error(q, "chain %u: indirect table length %u is invalid", head, length);
                return -1;
            }
            uint64_t off;
            int r = translate(q->mem, addr, length, &off);
            if (r < 0) {
                ring_error(q, "chain %u: indirect table: " RANGE_FMT, head, (unsigned long long)addr,
                           (unsigned long long)length);
                return -1;
            }
            table = q->mem->r[r].host + off;
            size = length / DESC_SIZE;
            in_indirect = 1;
            i = 0;
            visited = 0;
            continue;
        }
        uint64_t addr = LOAD64(d);
        uint32_t length = LOAD32(d + 8);
        uint64_t off;
        int r = translate(q->mem, addr, length, &off);
        if (r < 0) {
            ring_error(q, "chain %u, descriptor %u: " RANGE_FMT, head, i, (unsigned long long)addr,
                       (unsigned long long)length);
            return -1;
        }
        if (flags & F_WRITE) {
            if (v->fn(q, v, 1, r, off, length) < 0)
                return -1;
            nwritable++;
        } else if (nwritable) {
            ring_error(q, "chain %u: readable descriptor %u after a writable one", head, i);
            return -1;
        } else if (v->fn(q, v, 0, r, off, length) < 0) {
            return -1;
        }
        if (!(flags & F_NEXT))
            return 0;
        i = LOAD16(d + 14);
        visited++;
        if (i >= size) {
            ring_error(q, "chain %u: next index %u >= table size %u", head, i, size);
            return -1;
        }
        if (visited >= size) {
            ring_error(q, "chain %u: more than %u descriptors (loop?)", head, size);
            return -1;
        }
    }
}

/* The chain at the next avail slot, checked as pop does: its head, or -1 (none: 0 returned in *none). */
static int next_head(RingObject *q, int *none)
{
    *none = 0;
    uint16_t last = q->last;
    if (last == q->shadow) {
        long pending = avail_pending(q);
        if (pending < 0)
            return -1;
        if (pending == 0) {
            *none = 1;
            return -1;
        }
    }
    uint16_t head = AVAIL_RING(q, last & q->mask);
    if (head >= q->num) {
        ring_error(q, "avail ring slot %u holds head %u >= %u", last & q->mask, head, q->num);
        return -1;
    }
    return head;
}

/* The chain at head to the visitor: walked when it has NEXT or INDIRECT, else its one descriptor. */
static int visit_head(RingObject *q, uint16_t head, Visitor *v)
{
    const char *d = q->desc + (size_t)DESC_SIZE * head;
    uint16_t flags = LOAD16(d + 12);
    if (flags & (F_NEXT | F_INDIRECT))
        return walk(q, head, v);
    uint64_t addr = LOAD64(d);
    uint32_t length = LOAD32(d + 8);
    uint64_t off;
    int r = translate(q->mem, addr, length, &off);
    if (r < 0) {
        ring_error(q, "descriptor %u: " RANGE_FMT, head, (unsigned long long)addr, (unsigned long long)length);
        return -1;
    }
    return v->fn(q, v, flags & F_WRITE, r, off, length);
}

static PyObject *Ring_pop(RingObject *q, PyObject *Py_UNUSED(unused))
{
    if (!ring_alive(q))
        return NULL;
    int none;
    int head = next_head(q, &none);
    if (head < 0) {
        if (none)
            Py_RETURN_NONE;
        return NULL;
    }
    PyObject *readable = PyList_New(0), *writable = PyList_New(0);
    Visitor v = {.fn = list_visit, .readable = readable, .writable = writable};
    if (readable == NULL || writable == NULL || visit_head(q, (uint16_t)head, &v) < 0) {
        Py_XDECREF(readable);
        Py_XDECREF(writable);
        return NULL;
    }
    q->last = (uint16_t)(q->last + 1);
    q->inflight++;
    return Py_BuildValue("(iNN)", head, readable, writable);
}

static PyObject *Ring_pop_frame(RingObject *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pop_frame(hdr_len, scratch)");
        return NULL;
    }
    long long hdr_len = PyLong_AsLongLong(args[0]);
    if (hdr_len == -1 && PyErr_Occurred())
        return NULL;
    if (hdr_len < 0) {
        PyErr_SetString(PyExc_ValueError, "negative header length");
        return NULL;
    }
    if (!ring_alive(q))
        return NULL;
    int none;
    int head = next_head(q, &none);
    if (head < 0) {
        if (none)
            Py_RETURN_NONE;
        return NULL;
    }
    Py_buffer scratch;
    if (PyObject_GetBuffer(args[1], &scratch, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Visitor v = {.fn = gather_visit, .skip = (uint64_t)hdr_len, .out = scratch.buf, .cap = scratch.len,
                 .flags = -1};
    if (visit_head(q, (uint16_t)head, &v) < 0) {
        PyBuffer_Release(&scratch);
        return NULL;
    }
    PyObject *frame;
    if (v.skip || v.pieces == 0)
        frame = PySequence_GetSlice(args[1], 0, 0);
    else if (v.pieces == 1)
        frame = slice(q, v.first_region, v.first_off, v.first_len);
    else
        frame = PySequence_GetSlice(args[1], 0, v.used);
    PyBuffer_Release(&scratch);
    if (frame == NULL)
        return NULL;
    q->last = (uint16_t)(q->last + 1);
    q->inflight++;
    return Py_BuildValue("(iNi)", head, frame, v.flags < 0 ? 0 : v.flags);
}

static PyObject *Ring_pop_writable(RingObject *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyList_Check(args[2]) || !PyList_Check(args[3]) || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "pop_writable(need, limit, heads, bufs, sizes)");
        return NULL;
    }
    long long need = PyLong_AsLongLong(args[0]);
    long long limit = PyLong_AsLongLong(args[1]);
    if ((need == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    if (!ring_alive(q))
        return NULL;
    PyObject *heads = args[2], *bufs = args[3], *sizes = args[4];
    Py_ssize_t start = PyList_GET_SIZE(heads);
    uint16_t last = q->last;
    uint32_t pending = (uint16_t)(q->shadow - last);
    long long got = 0, taken = 0;
    while (got < need && taken < limit) {
        if (!pending) {
            uint16_t idx = AVAIL_IDX(q);
            pending = (uint16_t)(idx - last);
            if (pending > q->num) {
                ring_error(q, "avail idx %u is more than %u ahead of %u", idx, q->num, last);
                goto fail;
            }
            q->shadow = idx;
            if (!pending)
                break;
        }
        uint16_t head = AVAIL_RING(q, last & q->mask);
        if (head >= q->num) {
            ring_error(q, "avail ring slot %u holds head %u >= %u", last & q->mask, head, q->num);
            goto fail;
        }
        /* The reference refuses a lone readable descriptor before translating it. */
        uint16_t flags = LOAD16(q->desc + (size_t)DESC_SIZE * head + 12);
        if (!(flags & (F_NEXT | F_INDIRECT | F_WRITE))) {
            ring_error(q, "RX chain %u has no device-writable buffer", head);
            goto fail;
        }
        PyObject *writable = PyList_New(0);
        Visitor v = {.fn = list_visit, .readable = NULL, .writable = writable};
        if (writable == NULL || visit_head(q, head, &v) < 0) {
            Py_XDECREF(writable);
            goto fail;
        }
        if (PyList_GET_SIZE(writable) == 0) {
            Py_DECREF(writable);
            ring_error(q, "RX chain %u has no device-writable buffer", head);
            goto fail;
        }
        long long size = 0;
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(writable); k++)
            size += PyObject_Length(PyList_GET_ITEM(writable, k));
        if (append_new(heads, PyLong_FromLong(head)) < 0 || PyList_Append(bufs, writable) < 0
            || append_new(sizes, PyLong_FromLongLong(size)) < 0) {
            Py_DECREF(writable);
            goto fail;
        }
        Py_DECREF(writable);
        got += size;
        taken++;
        pending--;
        last++;
    }
    q->last = last;
    q->inflight += (uint32_t)taken;
    return PyLong_FromLongLong(got);
fail:
    {
        /* Take nothing: the lists as they were (keeping the error raised). */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyList_SetSlice(heads, start, PY_SSIZE_T_MAX, NULL);
        PyList_SetSlice(bufs, start, PY_SSIZE_T_MAX, NULL);
        PyList_SetSlice(sizes, start, PY_SSIZE_T_MAX, NULL);
        PyErr_Restore(type, value, tb);
    }
    return NULL;
}

static PyObject *Ring_unpop(RingObject *q, PyObject *arg)
{
    long long count = PyLong_AsLongLong(arg);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    if (count < 0 || count > q->inflight)
        return PyErr_Format(PyExc_ValueError, "cannot unpop %lld chains, %u in flight", count, q->inflight);
    q->last = (uint16_t)(q->last - count);
    q->inflight -= (uint32_t)count;
    Py_RETURN_NONE;
}

/* Stage one used element (checks of Virtqueue.push); 0, or -1 with an error. */
static inline int stage(RingObject *q, long long head, long long written)
{
    if (q->pending >= q->num || head < 0 || head >= q->num) {
        PyErr_Format(PyExc_ValueError, "push of head %lld with %u pending on a queue of %u", head, q->pending,
                     q->num);
        return -1;
    }
    if (written < 0 || written > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "memoryview: invalid value for format 'I'");
        return -1;
    }
    volatile uint32_t *elem = (volatile uint32_t *)(q->used + 4 + 8 * (size_t)((q->used_idx + q->pending) & q->mask));
    elem[0] = (uint32_t)head;
    elem[1] = (uint32_t)written;
    q->pending++;
    return 0;
}

static PyObject *Ring_push(RingObject *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "push(head, written)");
        return NULL;
    }
    long long head = PyLong_AsLongLong(args[0]);
    long long written = PyLong_AsLongLong(args[1]);
    if ((head == -1 || written == -1) && PyErr_Occurred())
        return NULL;
    if (!ring_alive(q) || stage(q, head, written) < 0)
        return NULL;
    if (q->inflight)
        q->inflight--;
    Py_RETURN_NONE;
}

static PyObject *Ring_push_run(RingObject *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "push_run(heads, sizes, total)");
        return NULL;
    }
    long long total = PyLong_AsLongLong(args[2]);
    if (total == -1 && PyErr_Occurred())
        return NULL;
    if (!ring_alive(q))
        return NULL;
    PyObject *heads = args[0], *sizes = args[1];
    Py_ssize_t n = PyList_GET_SIZE(heads) < PyList_GET_SIZE(sizes) ? PyList_GET_SIZE(heads) : PyList_GET_SIZE(sizes);
    uint32_t used = 0;
    int failed = 0;
    for (Py_ssize_t k = 0; k < n && total > 0; k++) {
        long long head = PyLong_AsLongLong(PyList_GET_ITEM(heads, k));
        long long size = PyLong_AsLongLong(PyList_GET_ITEM(sizes, k));
        if ((head == -1 || size == -1) && PyErr_Occurred()) {
            failed = 1;
            break;
        }
        long long count = size < total ? size : total;
        if (stage(q, head, count) < 0) {
            failed = 1;
            break;
        }
        total -= count;
        used++;
    }
    q->inflight = q->inflight > used ? q->inflight - used : 0;
    if (failed)
        return NULL;
    return PyLong_FromUnsignedLong(used);
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static PyObject *Ring_flush(RingObject *q, PyObject *Py_UNUSED(unused))
{
    if (!ring_alive(q))
        return NULL;
    if (!q->pending)
        Py_RETURN_FALSE;
    uint16_t old = q->used_idx;
    uint16_t new_idx = (uint16_t)(old + q->pending);
    __atomic_store_n((uint16_t *)(q->used + 2), new_idx, __ATOMIC_RELEASE);
    q->used_idx = new_idx;
    q->pending = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!q->signalled_valid) {
        q->signalled_valid = 1;
        Py_RETURN_TRUE;
    }
    if (q->event_idx)
        return PyBool_FromLong(need_event(USED_EVENT(q), new_idx, old));
    return PyBool_FromLong(!(AVAIL_FLAGS(q) & AVAIL_NO_INTERRUPT));
}

static PyObject *Ring_enable_kicks(RingObject *q, PyObject *Py_UNUSED(unused))
{
    if (!ring_alive(q))
        return NULL;
    if (q->event_idx)
        __atomic_store_n((uint16_t *)AVAIL_EVENT_PTR(q), q->shadow, __ATOMIC_RELEASE);
    else
        __atomic_store_n((uint16_t *)q->used, 0, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    long pending = avail_pending(q);
    if (pending < 0)
        return NULL;
    return PyBool_FromLong(pending != 0);
}

static PyObject *Ring_disable_kicks(RingObject *q, PyObject *Py_UNUSED(unused))
{
    if (!ring_alive(q))
        return NULL;
    if (!q->event_idx)
        __atomic_store_n((uint16_t *)q->used, USED_NO_NOTIFY, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *Ring_avail_pending(RingObject *q, PyObject *Py_UNUSED(unused))
{
    if (!ring_alive(q))
        return NULL;
    long pending = avail_pending(q);
    return pending < 0 ? NULL : PyLong_FromLong(pending);
}

static PyObject *Ring_position(RingObject *q, PyObject *Py_UNUSED(unused))
{
    return Py_BuildValue("(HHHIIN)", q->last, q->shadow, q->used_idx, q->pending, q->inflight,
                         PyBool_FromLong(q->signalled_valid));
}

static PyObject *Ring_set_position(RingObject *q, PyObject *args)
{
    unsigned int last, shadow, used_idx, pending, inflight;
    int signalled;
    if (!PyArg_ParseTuple(args, "IIIIIp", &last, &shadow, &used_idx, &pending, &inflight, &signalled))
        return NULL;
    if (last > 0xFFFF || shadow > 0xFFFF || used_idx > 0xFFFF || pending > q->num || inflight > q->num) {
        PyErr_SetString(PyExc_ValueError, "bad ring position");
        return NULL;
    }
    q->last = (uint16_t)last;
    q->shadow = (uint16_t)shadow;
    q->used_idx = (uint16_t)used_idx;
    q->pending = pending;
    q->inflight = inflight;
    q->signalled_valid = signalled;
    Py_RETURN_NONE;
}

static PyObject *Ring_release(RingObject *q, PyObject *Py_UNUSED(unused))
{
    ring_release_buffers(q);
    Py_RETURN_NONE;
}

static PyMethodDef Ring_methods[] = {
    METHOD("pop", Ring_pop, METH_NOARGS, "Virtqueue.pop"),
    METHOD("pop_frame", Ring_pop_frame, METH_FASTCALL, "Virtqueue.pop_frame"),
    METHOD("pop_writable", Ring_pop_writable, METH_FASTCALL, "Virtqueue.pop_writable"),
    METHOD("unpop", Ring_unpop, METH_O, "Virtqueue.unpop"),
    METHOD("push", Ring_push, METH_FASTCALL, "Virtqueue.push"),
    METHOD("push_run", Ring_push_run, METH_FASTCALL, "Virtqueue.push_run"),
    METHOD("flush", Ring_flush, METH_NOARGS, "Virtqueue.flush"),
    METHOD("enable_kicks", Ring_enable_kicks, METH_NOARGS, "Virtqueue.enable_kicks"),
    METHOD("disable_kicks", Ring_disable_kicks, METH_NOARGS, "Virtqueue.disable_kicks"),
    METHOD("avail_pending", Ring_avail_pending, METH_NOARGS, "Virtqueue.avail_pending"),
    METHOD("position", Ring_position, METH_NOARGS, "(last, shadow, used, pending, inflight, signalled)"),
    METHOD("set_position", Ring_set_position, METH_VARARGS, "set_position(*position())"),
    METHOD("release", Ring_release, METH_NOARGS, "Drop the ring areas' exports."),
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardswitch.virtio._vring.Ring",
    .tp_doc = PyDoc_STR("One split virtqueue's ring mechanics (see virtqueue.Virtqueue, the reference)."),
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

static struct PyModuleDef vring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shardswitch.virtio._vring",
    .m_doc = PyDoc_STR("Compiled ring mechanics of the split virtqueue; virtqueue.py is the reference."),
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__vring(void)
{
    if (PyType_Ready(&RegionsType) < 0 || PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&vring_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RegionsType);
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Regions", (PyObject *)&RegionsType) < 0
        || PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
