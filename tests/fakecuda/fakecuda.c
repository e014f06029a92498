/*
 * fakecuda.c: a strict fake of the CUDA driver (libcuda.so.1) for machines without a GPU.
 *
 * It implements the 30 driver calls wand uses, with the prototypes of NVIDIA's own cuda.h,
 * on host memory: an allocation is a memfd, an address reservation is a PROT_NONE mmap, a
 * mapping is the memfd mmapped MAP_SHARED|MAP_FIXED into the reservation, and access rights
 * are mprotect. Exporting an allocation hands out a dup of the memfd, so another process can
 * import and map the same memory, and a write through a read-only mapping really faults.
 *
 * "Strict" means it refuses, with a real CUresult, everything the real driver forbids and a
 * few things our team forbids on top (see README.md for the list and the codes). Each refusal
 * leaves a sentence naming the rule in fakecuda_last_error(); FAKECUDA_TRACE=1 also prints it
 * to stderr. fakecuda_counts() tells the tests what is still alive.
 *
 * All state is in process memory behind one mutex; only the context stack is per thread.
 */
#define _GNU_SOURCE
#include <cuda.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The fake's own exports, beyond the driver API (not in cuda.h). */
int fakecuda_counts(long long out[6]);
const char *fakecuda_last_error(void);
int fakecuda_thread_ctx_depth(void);

#define GRANULARITY ((size_t)2 << 20) /* 2 MiB, minimum and recommended, like real GPUs */
#define MAX_DEVICES 64
#define DEFAULT_TOTAL_MEM ((size_t)16 << 30)
#define CTX_STACK_MAX 64
#define CTX_MAGIC 0xfac0c7u
/* Every memfd the fake makes carries these seals and this name; import checks both, so a
 * random fd (a pipe, a plain file) is refused instead of being mapped as "GPU memory". */
#define MEMFD_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
#define MEMFD_PREFIX "fakecuda-dev"
/* Allocation handles are ids counted from here: never small integers, so a handle confused
 * with a file descriptor (or the other way round) is refused, and never reused, so a double
 * release is always seen. */
#define FIRST_HANDLE 0x1000001ull

#define TRY(expr)                                                                             \
    do {                                                                                      \
        CUresult try_r_ = (expr);                                                             \
        if (try_r_ != CUDA_SUCCESS)                                                           \
            return try_r_;                                                                    \
    } while (0)

/* Public entry points take the lock and call the static do_* function that does the work. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
#define LOCKED(call)                                                                          \
    do {                                                                                      \
        pthread_mutex_lock(&lock);                                                            \
        CUresult locked_r_ = (call);                                                          \
        pthread_mutex_unlock(&lock);                                                          \
        return locked_r_;                                                                     \
    } while (0)

/* ---------------------------------------------------------------------------------------- */
/* Error codes and the last refusal                                                          */

static const struct {
    CUresult code;
    const char *name;
    const char *text; /* what the real cuGetErrorString says */
} errors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM",
     "OS call failed or operation not supported on this OS"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS",
     "an illegal memory access was encountered"},
    {CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static int error_index(CUresult code)
{
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == code)
            return (int)i;
    return -1;
}

/* The last refusal is process-wide (so a test can read what a call on another thread was
 * refused for); it has its own lock because refuse() runs with or without the main one. */
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_error[512] = "no call has been refused yet";
static __thread char last_error_copy[512];

static int env_flag(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

__attribute__((format(printf, 2, 3))) static CUresult refuse(CUresult code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&err_lock);
    memcpy(last_error, msg, sizeof msg);
    pthread_mutex_unlock(&err_lock);
    if (env_flag("FAKECUDA_TRACE")) {
        int i = error_index(code);
        fprintf(stderr, "fakecuda: %s -> %s\n", msg, i >= 0 ? errors[i].name : "?");
    }
    return code;
}

/* A system call the fake depends on failed: out of memory if the kernel says so. */
static CUresult os_failure(const char *fn, const char *what)
{
    int e = errno;
    CUresult code = (e == ENOMEM || e == ENOSPC || e == EMFILE || e == ENFILE)
                        ? CUDA_ERROR_OUT_OF_MEMORY
                        : CUDA_ERROR_OPERATING_SYSTEM;
    return refuse(code, "%s: %s failed: %s", fn, what, strerror(e));
}

/* ---------------------------------------------------------------------------------------- */
/* Process state (all guarded by `lock`)                                                     */

static int initialized;
static int n_devices;
static size_t total_mem;

struct CUctx_st { /* cuda.h leaves it incomplete: CUcontext points at one of these */
    unsigned magic;
    int device;
};
static struct CUctx_st primary[MAX_DEVICES];
static long long primary_retains[MAX_DEVICES];
static size_t used_mem[MAX_DEVICES]; /* bytes of this process's live cuMemCreate allocations */

struct alloc {
    struct alloc *next;
    CUmemGenericAllocationHandle handle;
    int fd; /* the fake's own fd of the memfd, closed on release */
    size_t size;
    int device;
    int imported;
    unsigned handle_types; /* prop.requestedHandleTypes at creation */
    long long live_mappings;
};

struct reservation {
    struct reservation *next;
    uintptr_t base;
    size_t size;
};

struct mapping {
    struct mapping *next;
    uintptr_t base;
    size_t size;
    struct alloc *alloc;
    struct reservation *res;
    unsigned char access[MAX_DEVICES]; /* CUmemAccess_flags per device */
};

/* An fd handed out by cuMemExportToShareableHandle. The caller owns it; it counts as live
 * until that fd number no longer refers to the same memfd (closed, or reused for something
 * else). The inode is how we tell. */
struct export {
    struct export *next;
    int fd;
    dev_t st_dev;
    ino_t st_ino;
};

static struct alloc *allocs;
static struct reservation *reservations;
static struct mapping *mappings;
static struct export *exports;
static unsigned long long next_handle = FIRST_HANDLE;

/* The context stack is per thread, as in the real driver. `ctx_depth_all` is the sum of the
 * depths over live threads: a thread's share is dropped by the key destructor when it ends
 * (the real driver forgets an ended thread's stack too). */
struct ctx_stack {
    int depth;
    CUcontext ctx[CTX_STACK_MAX];
};
static __thread struct ctx_stack *my_stack;
static pthread_key_t stack_key;
static pthread_once_t stack_key_once = PTHREAD_ONCE_INIT;
static long long ctx_depth_all;

static void stack_gone(void *p)
{
    struct ctx_stack *s = p;
    pthread_mutex_lock(&lock);
    ctx_depth_all -= s->depth;
    pthread_mutex_unlock(&lock);
    my_stack = NULL;
    free(s);
}

static void make_stack_key(void)
{
    pthread_key_create(&stack_key, stack_gone);
}

static struct ctx_stack *this_stack(int create)
{
    if (!my_stack && create) {
        pthread_once(&stack_key_once, make_stack_key);
        my_stack = calloc(1, sizeof *my_stack);
        if (my_stack)
            pthread_setspecific(stack_key, my_stack);
    }
    return my_stack;
}

/* ---------------------------------------------------------------------------------------- */
/* Small helpers (called with `lock` held)                                                   */

static int is_aligned(unsigned long long v)
{
    return v % GRANULARITY == 0;
}

static CUresult need_init(const char *fn)
{
    if (!initialized)
        return refuse(CUDA_ERROR_NOT_INITIALIZED, "%s called before cuInit(0)", fn);
    return CUDA_SUCCESS;
}

static CUresult check_device(const char *fn, CUdevice dev)
{
    if (dev < 0 || dev >= n_devices)
        return refuse(CUDA_ERROR_INVALID_DEVICE, "%s: device %d does not exist (the fake has %d)",
                      fn, dev, n_devices);
    return CUDA_SUCCESS;
}

/* Every memory call needs a current context whose primary context is still retained. */
static CUresult need_ctx(const char *fn, int *device)
{
    TRY(need_init(fn));
    struct ctx_stack *s = this_stack(0);
    if (!s || s->depth == 0)
        return refuse(CUDA_ERROR_INVALID_CONTEXT,
                      "%s: no current context on this thread (push one with cuCtxPushCurrent)",
                      fn);
    CUcontext c = s->ctx[s->depth - 1];
    if (primary_retains[c->device] == 0)
        return refuse(CUDA_ERROR_INVALID_CONTEXT,
                      "%s: the current context is device %d's primary context, which is no "
                      "longer retained",
                      fn, c->device);
    if (device)
        *device = c->device;
    return CUDA_SUCCESS;
}

static int is_our_ctx(CUcontext c)
{
    uintptr_t p = (uintptr_t)c, lo = (uintptr_t)&primary[0], hi = (uintptr_t)&primary[n_devices];
    return p >= lo && p < hi && (p - lo) % sizeof primary[0] == 0 && c->magic == CTX_MAGIC;
}

/* Validation shared by cuMemGetAllocationGranularity and cuMemCreate. */
static CUresult check_prop(const char *fn, const CUmemAllocationProp *prop)
{
    if (!prop)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: prop is NULL", fn);
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: prop.type is %d; only CU_MEM_ALLOCATION_TYPE_PINNED (1) is valid", fn,
                      (int)prop->type);
    if (prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: prop.location.type is %d; the fake supports only "
                      "CU_MEM_LOCATION_TYPE_DEVICE (1)",
                      fn, (int)prop->location.type);
    if (prop->location.id < 0 || prop->location.id >= n_devices)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: prop.location.id %d is not a device (the fake has %d)", fn,
                      prop->location.id, n_devices);
    return CUDA_SUCCESS;
}

static CUresult check_location(const char *fn, const CUmemLocation *loc)
{
    if (loc->type != CU_MEM_LOCATION_TYPE_DEVICE)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: location.type is %d; only CU_MEM_LOCATION_TYPE_DEVICE (1) is valid",
                      fn, (int)loc->type);
    return check_device(fn, loc->id);
}

static struct alloc *find_alloc(CUmemGenericAllocationHandle h)
{
    for (struct alloc *a = allocs; a; a = a->next)
        if (a->handle == h)
            return a;
    return NULL;
}

static struct mapping *mapping_containing(uintptr_t p)
{
    for (struct mapping *m = mappings; m; m = m->next)
        if (p >= m->base && p - m->base < m->size)
            return m;
    return NULL;
}

static struct mapping *mapping_starting(uintptr_t p)
{
    for (struct mapping *m = mappings; m; m = m->next)
        if (m->base == p)
            return m;
    return NULL;
}

static int is_internal_fd(int fd)
{
    for (struct alloc *a = allocs; a; a = a->next)
        if (a->fd == fd)
            return 1;
    return 0;
}

/* Forget exported fds whose owner has closed them. Run before the fake opens an fd of its
 * own (which could get a closed export's number) and when counting. */
static void sweep_exports(void)
{
    for (struct export **pe = &exports; *pe;) {
        struct export *e = *pe;
        struct stat st;
        int live = fstat(e->fd, &st) == 0 && st.st_dev == e->st_dev && st.st_ino == e->st_ino &&
                   !is_internal_fd(e->fd);
        if (live) {
            pe = &e->next;
        } else {
            *pe = e->next;
            free(e);
        }
    }
}

/* Host protection of a mapping: the widest access any device has (the host is one "viewer"
 * for all fake devices). Per-device rights are still checked by the copies. */
static int host_prot(const struct mapping *m)
{
    unsigned widest = 0;
    for (int d = 0; d < n_devices; d++)
        widest |= m->access[d];
    if (widest == CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        return PROT_READ | PROT_WRITE;
    return widest ? PROT_READ : PROT_NONE;
}

static const char *access_name(unsigned flags)
{
    switch (flags) {
    case CU_MEM_ACCESS_FLAGS_PROT_NONE:
        return "no access";
    case CU_MEM_ACCESS_FLAGS_PROT_READ:
        return "read-only access";
    case CU_MEM_ACCESS_FLAGS_PROT_READWRITE:
        return "read-write access";
    default:
        return "unknown access";
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Initialization, version, errors                                                            */

static CUresult do_init(unsigned int flags)
{
    if (flags != 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0, not %u", flags);
    if (initialized)
        return CUDA_SUCCESS;
    long devices = 1;
    const char *env = getenv("FAKECUDA_DEVICES");
    if (env && *env) {
        char *end;
        devices = strtol(env, &end, 10);
        if (*end || devices < 0 || devices > MAX_DEVICES)
            return refuse(CUDA_ERROR_INVALID_VALUE,
                          "cuInit: FAKECUDA_DEVICES=%s is not a number from 0 to %d", env,
                          MAX_DEVICES);
    }
    if (devices == 0)
        return refuse(CUDA_ERROR_NO_DEVICE, "cuInit: FAKECUDA_DEVICES=0, so there is no device");
    size_t total = DEFAULT_TOTAL_MEM;
    env = getenv("FAKECUDA_TOTAL_MEM");
    if (env && *env) {
        char *end;
        unsigned long long v = strtoull(env, &end, 10);
        if (*end || v == 0 || !is_aligned(v))
            return refuse(CUDA_ERROR_INVALID_VALUE,
                          "cuInit: FAKECUDA_TOTAL_MEM=%s is not a positive multiple of 2 MiB "
                          "(in bytes)",
                          env);
        total = (size_t)v;
    }
    n_devices = (int)devices;
    total_mem = total;
    for (int d = 0; d < n_devices; d++) {
        primary[d].magic = CTX_MAGIC;
        primary[d].device = d;
    }
    initialized = 1;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuInit(unsigned int Flags)
{
    LOCKED(do_init(Flags));
}

CUresult CUDAAPI cuDriverGetVersion(int *driverVersion)
{
    if (!driverVersion)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDriverGetVersion: driverVersion is NULL");
    *driverVersion = CUDA_VERSION; /* the header's: 12090 for 12.9 */
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorString(CUresult error, const char **pStr)
{
    if (!pStr)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuGetErrorString: pStr is NULL");
    int i = error_index(error);
    *pStr = i >= 0 ? errors[i].text : NULL;
    return i >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult CUDAAPI cuGetErrorName(CUresult error, const char **pStr)
{
    if (!pStr)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuGetErrorName: pStr is NULL");
    int i = error_index(error);
    *pStr = i >= 0 ? errors[i].name : NULL;
    return i >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ---------------------------------------------------------------------------------------- */
/* Devices                                                                                    */

static CUresult do_device_get_count(int *count)
{
    TRY(need_init("cuDeviceGetCount"));
    if (!count)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetCount: count is NULL");
    *count = n_devices;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetCount(int *count)
{
    LOCKED(do_device_get_count(count));
}

static CUresult do_device_get(CUdevice *device, int ordinal)
{
    TRY(need_init("cuDeviceGet"));
    if (!device)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceGet: device is NULL");
    TRY(check_device("cuDeviceGet", ordinal));
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal)
{
    LOCKED(do_device_get(device, ordinal));
}

static CUresult do_device_get_attribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    TRY(need_init("cuDeviceGetAttribute"));
    if (!pi)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetAttribute: pi is NULL");
    TRY(check_device("cuDeviceGetAttribute", dev));
    switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
        *pi = !env_flag("FAKECUDA_NO_VMM");
        break;
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED:
        *pi = !env_flag("FAKECUDA_NO_POSIX_FD");
        break;
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID:
        *pi = dev + 1;
        break;
    case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID:
    case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID:
        *pi = 0;
        break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING:
        *pi = 1;
        break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR:
        *pi = 9;
        break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR:
        *pi = 0;
        break;
    default:
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "cuDeviceGetAttribute: attribute %d is not one the fake knows", (int)attrib);
    }
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    LOCKED(do_device_get_attribute(pi, attrib, dev));
}

static CUresult do_device_get_uuid(CUuuid *uuid, CUdevice dev)
{
    TRY(need_init("cuDeviceGetUuid_v2"));
    if (!uuid)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetUuid_v2: uuid is NULL");
    TRY(check_device("cuDeviceGetUuid_v2", dev));
    memcpy(uuid->bytes, "fakecuda-gpu-00", 15); /* 15 bytes, then the index: stable per device */
    uuid->bytes[15] = (char)dev;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    LOCKED(do_device_get_uuid(uuid, dev));
}

static CUresult do_device_get_name(char *name, int len, CUdevice dev)
{
    TRY(need_init("cuDeviceGetName"));
    if (!name || len <= 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetName: name is NULL or len %d <= 0",
                      len);
    TRY(check_device("cuDeviceGetName", dev));
    snprintf(name, (size_t)len, "Fake CUDA GPU %d", dev); /* truncated to len, like the driver */
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetName(char *name, int len, CUdevice dev)
{
    LOCKED(do_device_get_name(name, len, dev));
}

static CUresult do_device_total_mem(size_t *bytes, CUdevice dev)
{
    TRY(need_init("cuDeviceTotalMem_v2"));
    if (!bytes)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDeviceTotalMem_v2: bytes is NULL");
    TRY(check_device("cuDeviceTotalMem_v2", dev));
    *bytes = total_mem;
    return CUDA_SUCCESS;
}

/* cuda.h #defines cuDeviceTotalMem to cuDeviceTotalMem_v2, so this definition matches its
 * prototype; the same holds for every _v2 name below. */
CUresult CUDAAPI cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    LOCKED(do_device_total_mem(bytes, dev));
}

/* ---------------------------------------------------------------------------------------- */
/* Contexts                                                                                   */

static CUresult do_primary_retain(CUcontext *pctx, CUdevice dev)
{
    TRY(need_init("cuDevicePrimaryCtxRetain"));
    if (!pctx)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuDevicePrimaryCtxRetain: pctx is NULL");
    TRY(check_device("cuDevicePrimaryCtxRetain", dev));
    primary_retains[dev]++;
    *pctx = &primary[dev];
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    LOCKED(do_primary_retain(pctx, dev));
}

static CUresult do_primary_release(CUdevice dev)
{
    TRY(need_init("cuDevicePrimaryCtxRelease_v2"));
    TRY(check_device("cuDevicePrimaryCtxRelease_v2", dev));
    if (primary_retains[dev] == 0)
        return refuse(CUDA_ERROR_INVALID_CONTEXT,
                      "cuDevicePrimaryCtxRelease_v2: device %d's primary context is not "
                      "retained (release below zero)",
                      dev);
    primary_retains[dev]--;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    LOCKED(do_primary_release(dev));
}

static CUresult do_ctx_push(CUcontext ctx)
{
    TRY(need_init("cuCtxPushCurrent_v2"));
    if (!ctx || !is_our_ctx(ctx))
        return refuse(CUDA_ERROR_INVALID_CONTEXT,
                      "cuCtxPushCurrent_v2: %p is not a context the fake handed out", (void *)ctx);
    if (primary_retains[ctx->device] == 0)
        return refuse(CUDA_ERROR_INVALID_CONTEXT,
                      "cuCtxPushCurrent_v2: device %d's primary context is not retained",
                      ctx->device);
    struct ctx_stack *s = this_stack(1);
    if (!s)
        return refuse(CUDA_ERROR_OUT_OF_MEMORY, "cuCtxPushCurrent_v2: no memory for the stack");
    if (s->depth == CTX_STACK_MAX)
        return refuse(CUDA_ERROR_OUT_OF_MEMORY,
                      "cuCtxPushCurrent_v2: this thread's context stack is %d deep already "
                      "(a push without a pop, in a loop?)",
                      CTX_STACK_MAX);
    s->ctx[s->depth++] = ctx;
    ctx_depth_all++;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxPushCurrent_v2(CUcontext ctx)
{
    LOCKED(do_ctx_push(ctx));
}

static CUresult do_ctx_pop(CUcontext *pctx)
{
    TRY(need_init("cuCtxPopCurrent_v2"));
    struct ctx_stack *s = this_stack(0);
    if (!s || s->depth == 0)
        return refuse(CUDA_ERROR_INVALID_CONTEXT,
                      "cuCtxPopCurrent_v2: this thread's context stack is empty");
    CUcontext c = s->ctx[--s->depth];
    ctx_depth_all--;
    if (pctx) /* NULL is allowed: the caller does not want the popped context */
        *pctx = c;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxPopCurrent_v2(CUcontext *pctx)
{
    LOCKED(do_ctx_pop(pctx));
}

static CUresult do_ctx_get_current(CUcontext *pctx)
{
    TRY(need_init("cuCtxGetCurrent"));
    if (!pctx)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuCtxGetCurrent: pctx is NULL");
    struct ctx_stack *s = this_stack(0);
    *pctx = s && s->depth ? s->ctx[s->depth - 1] : NULL;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx)
{
    LOCKED(do_ctx_get_current(pctx));
}

CUresult CUDAAPI cuCtxSynchronize(void)
{
    LOCKED(need_ctx("cuCtxSynchronize", NULL)); /* nothing runs asynchronously here */
}

/* ---------------------------------------------------------------------------------------- */
/* Memory info and granularity                                                                */

static CUresult do_mem_get_info(size_t *free_bytes, size_t *total_bytes)
{
    int dev;
    TRY(need_ctx("cuMemGetInfo_v2", &dev));
    if (!free_bytes || !total_bytes)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuMemGetInfo_v2: free or total is NULL");
    *free_bytes = total_mem - used_mem[dev];
    *total_bytes = total_mem;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetInfo_v2(size_t *free, size_t *total)
{
    LOCKED(do_mem_get_info(free, total));
}

static CUresult do_granularity(size_t *granularity, const CUmemAllocationProp *prop,
                               CUmemAllocationGranularity_flags option)
{
    const char *fn = "cuMemGetAllocationGranularity";
    TRY(need_ctx(fn, NULL));
    if (env_flag("FAKECUDA_NO_VMM"))
        return refuse(CUDA_ERROR_NOT_SUPPORTED, "%s: virtual memory management is switched off "
                                                "(FAKECUDA_NO_VMM)",
                      fn);
    if (!granularity)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: granularity is NULL", fn);
    TRY(check_prop(fn, prop));
    if (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: option %d is neither MINIMUM nor RECOMMENDED",
                      fn, (int)option);
    *granularity = GRANULARITY;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                               CUmemAllocationGranularity_flags option)
{
    LOCKED(do_granularity(granularity, prop, option));
}

/* ---------------------------------------------------------------------------------------- */
/* Allocations, export, import                                                                */

static struct alloc *new_alloc(int fd, size_t size, int device, int imported, unsigned types)
{
    struct alloc *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->handle = next_handle++;
    a->fd = fd;
    a->size = size;
    a->device = device;
    a->imported = imported;
    a->handle_types = types;
    a->next = allocs;
    allocs = a;
    return a;
}

static CUresult do_mem_create(CUmemGenericAllocationHandle *handle, size_t size,
                              const CUmemAllocationProp *prop, unsigned long long flags)
{
    const char *fn = "cuMemCreate";
    TRY(need_ctx(fn, NULL));
    if (env_flag("FAKECUDA_NO_VMM"))
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: virtual memory management is switched off (FAKECUDA_NO_VMM)", fn);
    if (!handle)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: handle is NULL", fn);
    if (flags != 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: flags must be 0, not %llu", fn, flags);
    TRY(check_prop(fn, prop));
    unsigned types = (unsigned)prop->requestedHandleTypes;
    if (types & ~(unsigned)CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: requestedHandleTypes 0x%x asks for a handle type other than "
                      "POSIX_FILE_DESCRIPTOR, which this (Linux) fake does not have",
                      fn, types);
    if (types && env_flag("FAKECUDA_NO_POSIX_FD"))
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: POSIX file descriptor handles are switched off (FAKECUDA_NO_POSIX_FD)",
                      fn);
    if (prop->win32HandleMetaData)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: prop.win32HandleMetaData must be NULL", fn);
    if (prop->allocFlags.compressionType || prop->allocFlags.usage)
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: compressible or special-usage allocations are not faked", fn);
    if (size == 0 || !is_aligned(size))
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: size %zu is not a non-zero multiple of the granularity (2 MiB)", fn,
                      size);
    int dev = prop->location.id;
    if (size > total_mem - used_mem[dev])
        return refuse(CUDA_ERROR_OUT_OF_MEMORY,
                      "%s: %zu bytes asked, %zu of device %d's %zu bytes are free", fn, size,
                      total_mem - used_mem[dev], dev, total_mem);

    sweep_exports();
    char name[32];
    snprintf(name, sizeof name, MEMFD_PREFIX "%d", dev);
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return os_failure(fn, "memfd_create");
    if (ftruncate(fd, (off_t)size) != 0 || fcntl(fd, F_ADD_SEALS, MEMFD_SEALS) != 0) {
        CUresult r = os_failure(fn, "sizing the memfd");
        close(fd);
        return r;
    }
    struct alloc *a = new_alloc(fd, size, dev, 0, types);
    if (!a) {
        close(fd);
        return refuse(CUDA_ERROR_OUT_OF_MEMORY, "%s: no memory for the bookkeeping", fn);
    }
    used_mem[dev] += size;
    *handle = a->handle;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                             const CUmemAllocationProp *prop, unsigned long long flags)
{
    LOCKED(do_mem_create(handle, size, prop, flags));
}

static CUresult do_mem_release(CUmemGenericAllocationHandle handle)
{
    const char *fn = "cuMemRelease";
    TRY(need_ctx(fn, NULL));
    struct alloc **pa = &allocs;
    while (*pa && (*pa)->handle != handle)
        pa = &(*pa)->next;
    struct alloc *a = *pa;
    if (!a)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: 0x%llx is an unknown allocation handle (never created, or already "
                      "released)",
                      fn, handle);
    /* Our rule, stricter than the real driver (which lets a handle go before its mappings):
     * release only after unmap. */
    if (a->live_mappings)
        return refuse(CUDA_ERROR_NOT_PERMITTED,
                      "%s: handle 0x%llx is still mapped (%lld live mapping(s)); the rule is "
                      "release only after unmap",
                      fn, handle, a->live_mappings);
    *pa = a->next;
    if (!a->imported)
        used_mem[a->device] -= a->size;
    close(a->fd);
    free(a);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemRelease(CUmemGenericAllocationHandle handle)
{
    LOCKED(do_mem_release(handle));
}

static CUresult do_mem_export(void *shareableHandle, CUmemGenericAllocationHandle handle,
                              CUmemAllocationHandleType handleType, unsigned long long flags)
{
    const char *fn = "cuMemExportToShareableHandle";
    TRY(need_ctx(fn, NULL));
    if (!shareableHandle)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: shareableHandle is NULL", fn);
    if (flags != 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: flags must be 0, not %llu", fn, flags);
    struct alloc *a = find_alloc(handle);
    if (!a)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: 0x%llx is an unknown allocation handle", fn,
                      handle);
    if (handleType != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: handle type %d is not supported (this fake exports POSIX file "
                      "descriptors only)",
                      fn, (int)handleType);
    if (env_flag("FAKECUDA_NO_POSIX_FD"))
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: POSIX file descriptor handles are switched off (FAKECUDA_NO_POSIX_FD)",
                      fn);
    if (!(a->handle_types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: handle type POSIX_FILE_DESCRIPTOR was not requested at creation "
                      "(prop.requestedHandleTypes was 0x%x)",
                      fn, a->handle_types);

    sweep_exports();
    struct export *e = calloc(1, sizeof *e);
    if (!e)
        return refuse(CUDA_ERROR_OUT_OF_MEMORY, "%s: no memory for the bookkeeping", fn);
    /* A fresh fd every call, which the caller owns and must close. Close-on-exec like every
     * fd the fake opens; a caller passing it on (SCM_RIGHTS, pass_fds) is not affected. */
    int fd = fcntl(a->fd, F_DUPFD_CLOEXEC, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        CUresult r = os_failure(fn, "dup of the memfd");
        if (fd >= 0)
            close(fd);
        free(e);
        return r;
    }
    e->fd = fd;
    e->st_dev = st.st_dev;
    e->st_ino = st.st_ino;
    e->next = exports;
    exports = e;
    *(int *)shareableHandle = fd;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemExportToShareableHandle(void *shareableHandle,
                                              CUmemGenericAllocationHandle handle,
                                              CUmemAllocationHandleType handleType,
                                              unsigned long long flags)
{
    LOCKED(do_mem_export(shareableHandle, handle, handleType, flags));
}

static CUresult do_mem_import(CUmemGenericAllocationHandle *handle, void *osHandle,
                              CUmemAllocationHandleType shHandleType)
{
    const char *fn = "cuMemImportFromShareableHandle";
    TRY(need_ctx(fn, NULL));
    if (!handle)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: handle is NULL", fn);
    if (shHandleType != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: handle type %d is not supported (POSIX file descriptors only)", fn,
                      (int)shHandleType);
    if (env_flag("FAKECUDA_NO_VMM") || env_flag("FAKECUDA_NO_POSIX_FD"))
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: switched off (FAKECUDA_NO_VMM or FAKECUDA_NO_POSIX_FD)", fn);
    /* For POSIX_FILE_DESCRIPTOR the real API takes the fd itself cast to void *, not a
     * pointer to it. */
    intptr_t v = (intptr_t)osHandle;
    if (v < 0 || v > INT_MAX)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: %p is not a file descriptor", fn, osHandle);
    int fd = (int)v;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: fd %d is not an open memfd (%s); pass the fd itself cast to void *, "
                      "not a pointer to it",
                      fn, fd, strerror(errno));
    char path[64], link[256];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    int dev = -1;
    if (n > 0) {
        link[n] = 0;
        if (sscanf(link, "/memfd:" MEMFD_PREFIX "%d", &dev) != 1)
            dev = -1;
    }
    if ((seals & MEMFD_SEALS) != MEMFD_SEALS || dev < 0)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: fd %d is not an allocation exported by fakecuda", fn, fd);
    TRY(check_device(fn, dev));
    struct stat st;
    if (fstat(fd, &st) != 0)
        return os_failure(fn, "fstat of the fd");
    size_t size = (size_t)st.st_size;
    if (size == 0 || !is_aligned(size))
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: fd %d has size %zu, not an allocation's", fn,
                      fd, size);

    sweep_exports();
    /* Our own reference: the caller may close its fd right after the import. */
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
        return os_failure(fn, "dup of the fd");
    struct alloc *a = new_alloc(own, size, dev, 1, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (!a) {
        close(own);
        return refuse(CUDA_ERROR_OUT_OF_MEMORY, "%s: no memory for the bookkeeping", fn);
    }
    *handle = a->handle;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle,
                                                void *osHandle,
                                                CUmemAllocationHandleType shHandleType)
{
    LOCKED(do_mem_import(handle, osHandle, shHandleType));
}

/* ---------------------------------------------------------------------------------------- */
/* Address space                                                                              */

static CUresult do_address_reserve(CUdeviceptr *ptr, size_t size, size_t alignment,
                                   CUdeviceptr addr, unsigned long long flags)
{
    const char *fn = "cuMemAddressReserve";
    TRY(need_ctx(fn, NULL));
    if (env_flag("FAKECUDA_NO_VMM"))
        return refuse(CUDA_ERROR_NOT_SUPPORTED,
                      "%s: virtual memory management is switched off (FAKECUDA_NO_VMM)", fn);
    if (!ptr)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: ptr is NULL", fn);
    if (flags != 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: flags must be 0, not %llu", fn, flags);
    if (size == 0 || !is_aligned(size))
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: size %zu is not a non-zero multiple of the granularity (2 MiB)", fn,
                      size);
    if (alignment & (alignment - 1))
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: alignment %zu is not 0 or a power of two",
                      fn, alignment);
    if (!is_aligned(addr))
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: address hint 0x%llx is not a multiple of the granularity (2 MiB)", fn,
                      addr);
    size_t align = alignment > GRANULARITY ? alignment : GRANULARITY;
    if (size + align < size)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: size %zu is too large", fn, size);

    /* Over-reserve by one alignment, then trim both ends so the range starts aligned. */
    size_t span = size + align;
    char *p = mmap((void *)(uintptr_t)addr, span, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return os_failure(fn, "mmap of the reservation");
    uintptr_t start = (uintptr_t)p, base = (start + align - 1) & ~(uintptr_t)(align - 1);
    if (base > start)
        munmap(p, base - start);
    if (start + span > base + size)
        munmap((void *)(base + size), start + span - (base + size));
    struct reservation *r = calloc(1, sizeof *r);
    if (!r) {
        munmap((void *)base, size);
        return refuse(CUDA_ERROR_OUT_OF_MEMORY, "%s: no memory for the bookkeeping", fn);
    }
    r->base = base;
    r->size = size;
    r->next = reservations;
    reservations = r;
    *ptr = (CUdeviceptr)base;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment,
                                     CUdeviceptr addr, unsigned long long flags)
{
    LOCKED(do_address_reserve(ptr, size, alignment, addr, flags));
}

static CUresult do_address_free(CUdeviceptr ptr, size_t size)
{
    const char *fn = "cuMemAddressFree";
    TRY(need_ctx(fn, NULL));
    struct reservation **pr = &reservations;
    while (*pr && !((*pr)->base == ptr && (*pr)->size == size))
        pr = &(*pr)->next;
    struct reservation *r = *pr;
    if (!r)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: (0x%llx, %zu) does not match a reservation exactly", fn, ptr, size);
    long long live = 0;
    for (struct mapping *m = mappings; m; m = m->next)
        live += m->res == r;
    if (live)
        return refuse(CUDA_ERROR_NOT_PERMITTED,
                      "%s: the reservation at 0x%llx still has %lld live mapping(s); unmap them "
                      "first",
                      fn, ptr, live);
    munmap((void *)r->base, r->size);
    *pr = r->next;
    free(r);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    LOCKED(do_address_free(ptr, size));
}

static CUresult do_mem_map(CUdeviceptr ptr, size_t size, size_t offset,
                           CUmemGenericAllocationHandle handle, unsigned long long flags)
{
    const char *fn = "cuMemMap";
    TRY(need_ctx(fn, NULL));
    if (flags != 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: flags must be 0, not %llu", fn, flags);
    if (offset != 0)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: offset is %zu; the driver requires 0 (the whole allocation from its "
                      "start)",
                      fn, offset);
    if (size == 0 || !is_aligned(size) || !is_aligned(ptr))
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: ptr 0x%llx or size %zu is not a (non-zero) multiple of the "
                      "granularity (2 MiB)",
                      fn, ptr, size);
    struct alloc *a = find_alloc(handle);
    if (!a)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: 0x%llx is an unknown allocation handle", fn,
                      handle);
    if (size > a->size)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: size %zu is larger than the allocation (%zu bytes)", fn, size, a->size);
    struct reservation *r = reservations;
    while (r && !(ptr >= r->base && ptr - r->base <= r->size && size <= r->size - (ptr - r->base)))
        r = r->next;
    if (!r)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: [0x%llx, +%zu) is not inside a reservation from cuMemAddressReserve",
                      fn, ptr, size);
    for (struct mapping *m = mappings; m; m = m->next)
        if (ptr < m->base + m->size && m->base < ptr + size)
            return refuse(CUDA_ERROR_INVALID_VALUE,
                          "%s: [0x%llx, +%zu) overlaps the existing mapping at 0x%llx (+%zu)", fn,
                          ptr, size, (unsigned long long)m->base, m->size);
    struct mapping *m = calloc(1, sizeof *m);
    if (!m)
        return refuse(CUDA_ERROR_OUT_OF_MEMORY, "%s: no memory for the bookkeeping", fn);
    /* PROT_NONE: a new mapping has no access until cuMemSetAccess, as on a GPU. */
    if (mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, a->fd, 0) ==
        MAP_FAILED) {
        free(m);
        return os_failure(fn, "mmap of the memfd");
    }
    m->base = ptr;
    m->size = size;
    m->alloc = a;
    m->res = r;
    m->next = mappings;
    mappings = m;
    a->live_mappings++;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                          CUmemGenericAllocationHandle handle, unsigned long long flags)
{
    LOCKED(do_mem_map(ptr, size, offset, handle, flags));
}

static CUresult do_mem_unmap(CUdeviceptr ptr, size_t size)
{
    const char *fn = "cuMemUnmap";
    TRY(need_ctx(fn, NULL));
    struct mapping **pm = &mappings;
    while (*pm && !((*pm)->base == ptr && (*pm)->size == size))
        pm = &(*pm)->next;
    struct mapping *m = *pm;
    if (!m)
        return refuse(CUDA_ERROR_INVALID_VALUE,
                      "%s: (0x%llx, %zu) does not match a mapping exactly", fn, ptr, size);
    /* Put the PROT_NONE reservation back over the range. */
    if (mmap((void *)m->base, m->size, PROT_NONE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED)
        return os_failure(fn, "mmap restoring the reservation");
    m->alloc->live_mappings--;
    *pm = m->next;
    free(m);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    LOCKED(do_mem_unmap(ptr, size));
}

/* ---------------------------------------------------------------------------------------- */
/* Access rights and copies                                                                   */

static CUresult do_set_access(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc,
                              size_t count)
{
    const char *fn = "cuMemSetAccess";
    TRY(need_ctx(fn, NULL));
    if (!desc || count == 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: desc is NULL or count is 0", fn);
    for (size_t i = 0; i < count; i++) {
        TRY(check_location(fn, &desc[i].location));
        unsigned f = (unsigned)desc[i].flags;
        if (f != CU_MEM_ACCESS_FLAGS_PROT_NONE && f != CU_MEM_ACCESS_FLAGS_PROT_READ &&
            f != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            return refuse(CUDA_ERROR_INVALID_VALUE, "%s: desc[%zu].flags 0x%x is not NONE, READ "
                                                    "or READWRITE",
                          fn, i, f);
        if (f == CU_MEM_ACCESS_FLAGS_PROT_READ && env_flag("FAKECUDA_NO_READONLY"))
            return refuse(CUDA_ERROR_INVALID_VALUE,
                          "%s: read-only access is not supported (FAKECUDA_NO_READONLY); use "
                          "READWRITE",
                          fn);
    }
    /* The range must be exactly a run of whole, back-to-back mappings. Check all before
     * changing any. */
    uintptr_t end = ptr + size;
    if (size == 0 || end < ptr)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: size %zu is 0 or wraps around", fn, size);
    for (uintptr_t p = ptr; p < end;) {
        struct mapping *m = mapping_starting(p);
        if (!m || m->size > end - p)
            return refuse(CUDA_ERROR_INVALID_VALUE,
                          "%s: [0x%llx, +%zu) is not exactly covered by whole mappings (nothing "
                          "fits at 0x%llx)",
                          fn, ptr, size, (unsigned long long)p);
        p += m->size;
    }
    for (uintptr_t p = ptr; p < end;) {
        struct mapping *m = mapping_starting(p);
        for (size_t i = 0; i < count; i++)
            m->access[desc[i].location.id] = (unsigned char)desc[i].flags;
        if (mprotect((void *)m->base, m->size, host_prot(m)) != 0)
            return os_failure(fn, "mprotect");
        p += m->size;
    }
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc,
                                size_t count)
{
    LOCKED(do_set_access(ptr, size, desc, count));
}

static CUresult do_get_access(unsigned long long *flags, const CUmemLocation *location,
                              CUdeviceptr ptr)
{
    const char *fn = "cuMemGetAccess";
    TRY(need_ctx(fn, NULL));
    if (!flags || !location)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: flags or location is NULL", fn);
    TRY(check_location(fn, location));
    struct mapping *m = mapping_containing(ptr);
    if (!m)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: 0x%llx is not mapped", fn, ptr);
    *flags = m->access[location->id];
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetAccess(unsigned long long *flags, const CUmemLocation *location,
                                CUdeviceptr ptr)
{
    LOCKED(do_get_access(flags, location, ptr));
}

/* The device range of a copy must be mapped all along (across several back-to-back mappings
 * is fine: the addresses are contiguous) with `need` access for the current device. */
static CUresult check_copy_range(const char *fn, CUdeviceptr ptr, size_t n, unsigned need,
                                 int dev)
{
    uintptr_t end = ptr + n;
    if (end < ptr)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: %zu bytes from 0x%llx wrap around", fn, n,
                      ptr);
    for (uintptr_t p = ptr; p < end;) {
        struct mapping *m = mapping_containing(p);
        if (!m)
            return refuse(CUDA_ERROR_INVALID_VALUE,
                          "%s: device address 0x%llx is not mapped (copy of %zu bytes from "
                          "0x%llx)",
                          fn, (unsigned long long)p, n, ptr);
        if ((m->access[dev] & need) != need)
            return refuse(CUDA_ERROR_INVALID_VALUE,
                          "%s: the mapping at 0x%llx gives device %d %s; the copy needs %s", fn,
                          (unsigned long long)m->base, dev, access_name(m->access[dev]),
                          need == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? "write access"
                                                                     : "read access");
        p = m->base + m->size;
    }
    return CUDA_SUCCESS;
}

static CUresult do_htod(CUdeviceptr dst, const void *src, size_t n)
{
    const char *fn = "cuMemcpyHtoD_v2";
    int dev;
    TRY(need_ctx(fn, &dev));
    if (n == 0)
        return CUDA_SUCCESS;
    if (!src)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: srcHost is NULL", fn);
    TRY(check_copy_range(fn, dst, n, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, dev));
    memcpy((void *)(uintptr_t)dst, src, n);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount)
{
    LOCKED(do_htod(dstDevice, srcHost, ByteCount));
}

static CUresult do_dtoh(void *dst, CUdeviceptr src, size_t n)
{
    const char *fn = "cuMemcpyDtoH_v2";
    int dev;
    TRY(need_ctx(fn, &dev));
    if (n == 0)
        return CUDA_SUCCESS;
    if (!dst)
        return refuse(CUDA_ERROR_INVALID_VALUE, "%s: dstHost is NULL", fn);
    TRY(check_copy_range(fn, src, n, CU_MEM_ACCESS_FLAGS_PROT_READ, dev));
    memcpy(dst, (const void *)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)
{
    LOCKED(do_dtoh(dstHost, srcDevice, ByteCount));
}

/* ---------------------------------------------------------------------------------------- */
/* For tests                                                                                  */

/* out: live allocation handles (created or imported, not yet released), live mappings, live
 * reservations, exported fds their owner has not closed yet, primary-context retains (all
 * devices), and context-stack depth summed over live threads. Returns 0, or -1 for NULL. */
int fakecuda_counts(long long out[6])
{
    if (!out)
        return -1;
    pthread_mutex_lock(&lock);
    sweep_exports();
    memset(out, 0, 6 * sizeof out[0]);
    for (struct alloc *a = allocs; a; a = a->next)
        out[0]++;
    for (struct mapping *m = mappings; m; m = m->next)
        out[1]++;
    for (struct reservation *r = reservations; r; r = r->next)
        out[2]++;
    for (struct export *e = exports; e; e = e->next)
        out[3]++;
    for (int d = 0; d < n_devices; d++)
        out[4] += primary_retains[d];
    out[5] = ctx_depth_all;
    pthread_mutex_unlock(&lock);
    return 0;
}

/* The sentence for the last refused call, in any thread of this process. The pointer is the
 * calling thread's own copy: valid until this thread calls fakecuda_last_error again. */
const char *fakecuda_last_error(void)
{
    pthread_mutex_lock(&err_lock);
    memcpy(last_error_copy, last_error, sizeof last_error_copy);
    pthread_mutex_unlock(&err_lock);
    return last_error_copy;
}

/* The calling thread's context stack depth. */
int fakecuda_thread_ctx_depth(void)
{
    struct ctx_stack *s = this_stack(0);
    return s ? s->depth : 0;
}
