/*
 * C API test of the copy engine: cowdisk_convert (qcow2 with create options,
 * compressed, raw, existing targets, internal snapshots, -B, chains flattened,
 * zero detection and min_sparse, progress and cancel, bad arguments),
 * cowdisk_compare (identical, one flipped byte, sizes, strict mode), cowdisk_commit
 * and cowdisk_rebase (safe, onto nothing, unsafe). Every result is read back with
 * cowdisk_pread (or from the raw file) and compared byte for byte with what was
 * written; qcow2 targets also pass `qemu-img check`.
 */
#include <pthread.h>

#include "testutil.h"

#define KIB 1024ull
#define MIB (1ull << 20)
#define DISK_SIZE (4 * MIB)
#define BIG_SIZE (8 * MIB)
#define CLUSTER 65536ull

/* The zero run the source stores as data (written with pwrite). */
#define ZRUN_START (256 * KIB)
#define ZRUN_LEN (128 * KIB)

static void fill_pattern(unsigned char *buf, size_t len, uint64_t offset, unsigned seed) {
    for (size_t i = 0; i < len; i++) {
        uint64_t x = offset + i;
        buf[i] = (unsigned char)(x * 29u + (x >> 9) * 3u + seed * 101u + 7u);
        if (buf[i] == 0)
            buf[i] = (unsigned char)(seed | 1u); /* data never looks like zeros */
    }
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        FAIL("out of memory");
    return p;
}

static cowdisk *open_image(const char *path, uint32_t flags) {
    cowdisk_open_opts o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.flags = flags;
    cowdisk *img = NULL;
    int rc = cowdisk_open(path, &o, &img);
    if (rc != 0)
        FAIL("cowdisk_open(%s, flags %#x) returned %d (%s): %s", path, flags, rc,
             cowdisk_strerror(rc), cowdisk_last_error());
    return img;
}

static void close_image(cowdisk *img) {
    int rc = cowdisk_close(img);
    if (rc != 0)
        FAIL("cowdisk_close returned %d: %s", rc, cowdisk_last_error());
}

/* Writes a pattern at [offset, offset+len) and records it in `model` (if any). */
static void write_pattern(cowdisk *img, unsigned char *model, uint64_t offset, size_t len,
                          unsigned seed) {
    unsigned char *buf = xmalloc(len);
    fill_pattern(buf, len, offset, seed);
    int rc = cowdisk_pwrite(img, buf, len, offset);
    if (rc != 0)
        FAIL("cowdisk_pwrite(%zu bytes at %llu) returned %d: %s", len,
             (unsigned long long)offset, rc, cowdisk_last_error());
    if (model)
        memcpy(model + offset, buf, len);
    free(buf);
}

/* Writes zero bytes as data (pwrite of a zeroed buffer). */
static void write_zero_bytes(cowdisk *img, unsigned char *model, uint64_t offset, size_t len) {
    unsigned char *buf = calloc(1, len);
    if (buf == NULL)
        FAIL("out of memory");
    int rc = cowdisk_pwrite(img, buf, len, offset);
    if (rc != 0)
        FAIL("cowdisk_pwrite(zeros) returned %d: %s", rc, cowdisk_last_error());
    if (model)
        memset(model + offset, 0, len);
    free(buf);
}

static void get_info(cowdisk *img, cowdisk_info *info) {
    memset(info, 0x5A, sizeof *info);
    info->struct_size = sizeof *info;
    int rc = cowdisk_get_info(img, info);
    if (rc != 0)
        FAIL("cowdisk_get_info returned %d: %s", rc, cowdisk_last_error());
}

/* Reads the whole disk of an open handle in unaligned chunks and compares it. */
static void verify_handle(cowdisk *img, const unsigned char *model, uint64_t size,
                          const char *what) {
    cowdisk_info info;
    get_info(img, &info);
    if (info.virtual_size != size)
        FAIL("%s: virtual size is %llu, expected %llu", what,
             (unsigned long long)info.virtual_size, (unsigned long long)size);
    const size_t chunk = 777 * 1024 + 13;
    unsigned char *buf = xmalloc(chunk);
    for (uint64_t off = 0; off < size; off += chunk) {
        size_t n = size - off < chunk ? (size_t)(size - off) : chunk;
        memset(buf, 0xA5, n);
        int rc = cowdisk_pread(img, buf, n, off);
        if (rc != 0)
            FAIL("%s: cowdisk_pread(%zu bytes at %llu) returned %d (%s): %s", what, n,
                 (unsigned long long)off, rc, cowdisk_strerror(rc), cowdisk_last_error());
        long long d = tu_first_diff(buf, model + off, n);
        if (d >= 0)
            FAIL("%s: byte at guest offset %llu is 0x%02x, expected 0x%02x", what,
                 (unsigned long long)(off + (uint64_t)d), buf[d], model[off + (uint64_t)d]);
    }
    free(buf);
    tu_checks++;
    printf("ok   %s\n", what);
}

/* Opens a qcow2 image read-only and compares every byte with `model`. */
static void verify_qcow2(const char *path, const unsigned char *model, uint64_t size,
                         const char *what) {
    cowdisk *img = open_image(path, COWDISK_OPEN_READONLY);
    verify_handle(img, model, size, what);
    close_image(img);
}

/* Reads a raw file and compares it with `model`. */
static void verify_raw(const char *path, const unsigned char *model, uint64_t size,
                       const char *what) {
    size_t len;
    unsigned char *got = tu_read_file(path, &len);
    if (len != size)
        FAIL("%s: %s is %zu bytes, expected %llu", what, path, len, (unsigned long long)size);
    long long d = tu_first_diff(got, model, len);
    if (d >= 0)
        FAIL("%s: byte at offset %lld is 0x%02x, expected 0x%02x", what, d, got[d], model[d]);
    free(got);
    tu_checks++;
    printf("ok   %s\n", what);
}

/* The first extent block_status reports at `offset`. */
static cowdisk_extent extent_at(cowdisk *img, uint64_t offset) {
    cowdisk_extent e[1];
    size_t count = 0;
    memset(e, 0, sizeof e);
    int rc = cowdisk_block_status(img, offset, 1, e, 1, &count);
    if (rc != 0 || count != 1)
        FAIL("cowdisk_block_status at %llu returned %d, %zu extents: %s",
             (unsigned long long)offset, rc, count, cowdisk_last_error());
    if (e[0].start != offset)
        FAIL("cowdisk_block_status at %llu gave an extent starting at %llu",
             (unsigned long long)offset, (unsigned long long)e[0].start);
    return e[0];
}

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static void init_convert_opts(cowdisk_convert_opts *o) {
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
}

static void init_create_opts(cowdisk_create_opts *o) {
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
}

/* ---- progress ------------------------------------------------------------------- */

struct progress_log {
    size_t calls;
    uint64_t first_done;
    uint64_t first_total, last_done, last_total;
    int backwards;     /* done went down */
    int total_changed; /* total differed between calls */
    int overshoot;     /* done > total */
    int other_thread;  /* called on a thread other than the caller's */
    long cancel_at;    /* return 1 from this call index on (-1: never) */
    pthread_t caller;
};

static void progress_init(struct progress_log *p, long cancel_at) {
    memset(p, 0, sizeof *p);
    p->cancel_at = cancel_at;
    p->caller = pthread_self();
}

static int on_progress(void *opaque, uint64_t done, uint64_t total) {
    struct progress_log *p = opaque;
    if (p->calls == 0) {
        p->first_total = total;
        p->first_done = done;
    } else {
        if (done < p->last_done)
            p->backwards = 1;
        if (total != p->first_total)
            p->total_changed = 1;
    }
    if (done > total)
        p->overshoot = 1;
    if (!pthread_equal(pthread_self(), p->caller))
        p->other_thread = 1;
    p->last_done = done;
    p->last_total = total;
    p->calls++;
    return p->cancel_at >= 0 && (long)p->calls > p->cancel_at;
}

/* The checks every completed call's progress must pass: the header promises a call
 * at the start (done == 0) and one at the end (done == total), however fast the
 * workers are. */
static void check_progress(const struct progress_log *p, const char *call, size_t min_calls) {
    char what[300];
    printf("     %s: %zu progress calls, last %llu of %llu\n", call, p->calls,
           (unsigned long long)p->last_done, (unsigned long long)p->last_total);
    snprintf(what, sizeof what, "%s: progress called at least %s", call,
             min_calls >= 2 ? "twice (start and end)" : "once");
    CHECK(p->calls >= min_calls, what);
    snprintf(what, sizeof what, "%s: the first progress call has done == 0", call);
    CHECK(p->first_done == 0, what);
    snprintf(what, sizeof what, "%s: progress total is > 0", call);
    CHECK(p->last_total > 0, what);
    snprintf(what, sizeof what, "%s: progress done never goes backwards", call);
    CHECK(!p->backwards, what);
    snprintf(what, sizeof what, "%s: progress done never exceeds total", call);
    CHECK(!p->overshoot, what);
    snprintf(what, sizeof what, "%s: the last progress call has done == total", call);
    CHECK(p->last_done == p->last_total, what);
    snprintf(what, sizeof what, "%s: progress is called on the calling thread", call);
    CHECK(!p->other_thread, what);
}

/* ---- the source ----------------------------------------------------------------- */

static char src[TU_PATH];
static unsigned char *model;      /* what the source reads now */
static unsigned char *model_snap; /* what it read at snapshot "before" */

/* A qcow2 source with data at unaligned offsets, a zero run stored as data, a zero
 * cluster, data across the 2 MiB chunk boundary, holes, and an internal snapshot
 * taken before the last writes. */
static void make_source(void) {
    SECTION("source image");
    tu_path(src, sizeof src, "src.qcow2");
    CHECK_RC(cowdisk_create(src, DISK_SIZE, NULL), 0, "create a 4 MiB qcow2 source");
    cowdisk *img = open_image(src, 0);
    write_pattern(img, model, 0, 100000, 1);
    write_zero_bytes(img, model, ZRUN_START, ZRUN_LEN);
    write_pattern(img, model, 512 * KIB + 777, 3000, 2);
    write_pattern(img, model, 2 * MIB - 5000, 10000, 3);
    CHECK_RC(cowdisk_write_zeroes(img, MIB, CLUSTER, 0), 0,
             "write_zeroes one cluster at 1 MiB");
    write_pattern(img, model, DISK_SIZE - 4096, 4096, 4);
    memcpy(model_snap, model, DISK_SIZE);
    CHECK_RC(cowdisk_snapshot_create(img, "before", NULL), 0, "snapshot 'before'");
    write_pattern(img, model, 50000, 20000, 5); /* over the first write */
    write_pattern(img, model, 3 * MIB + 1, 50000, 6);
    CHECK((extent_at(img, ZRUN_START).flags & COWDISK_EXTENT_DATA) != 0,
          "the source stores the zero run as data");
    verify_handle(img, model, DISK_SIZE, "the source reads as written");
    close_image(img);
    verify_qcow2(src, model, DISK_SIZE, "the source reads as written after reopening");
}

/* ---- 1. conversions ------------------------------------------------------------- */

static void expect_same(const char *a, const char *b, uint32_t flags, const char *what) {
    uint64_t mismatch = 12345;
    CHECK_RC(cowdisk_compare(a, b, flags, &mismatch), 0, what);
    CHECK(mismatch == 12345, "compare leaves *mismatch alone when identical");
}

static void test_convert_default(void) {
    SECTION("convert to qcow2 with NULL options");
    char dst[TU_PATH];
    tu_path(dst, sizeof dst, "default.qcow2");
    CHECK_RC(cowdisk_convert(src, dst, NULL), 0, "convert src -> default.qcow2");
    verify_qcow2(dst, model, DISK_SIZE, "the qcow2 copy reads like the source");
    cowdisk *img = open_image(dst, COWDISK_OPEN_READONLY);
    cowdisk_info info;
    get_info(img, &info);
    CHECK(info.version == 3 && info.cluster_size == CLUSTER, "target has the defaults (v3, 64K)");
    CHECK(info.nb_snapshots == 0, "target has no snapshots");
    CHECK(info.backing_file[0] == '\0', "target has no backing file");
    CHECK((extent_at(img, 0).flags & COWDISK_EXTENT_DATA) != 0, "data is stored as data");
    CHECK((extent_at(img, ZRUN_START).flags & COWDISK_EXTENT_DATA) == 0,
          "the 128 KiB zero run is not written as data (min_sparse 4096)");
    CHECK((extent_at(img, 3 * MIB + 512 * KIB).flags & COWDISK_EXTENT_DATA) == 0,
          "a hole stays a hole");
    close_image(img);
    tu_qemu_img_check(dst);
    expect_same(src, dst, 0, "cowdisk_compare(src, default.qcow2) == 0");

    /* Converting again replaces the file. */
    CHECK_RC(cowdisk_convert(src, dst, NULL), 0, "convert over an existing target file");
    verify_qcow2(dst, model, DISK_SIZE, "the replaced target reads like the source");
}

static void test_convert_create_opts(void) {
    SECTION("convert to qcow2 v2 with 4 KiB clusters, out of order, 3 workers");
    char dst[TU_PATH];
    tu_path(dst, sizeof dst, "v2-4k.qcow2");
    cowdisk_create_opts c;
    init_create_opts(&c);
    c.version = 2;
    c.cluster_size = 4096;
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.create = &c;
    o.workers = 3;
    o.flags = COWDISK_CONVERT_OUT_OF_ORDER;
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "convert with create options");
    cowdisk *img = open_image(dst, COWDISK_OPEN_READONLY);
    cowdisk_info info;
    get_info(img, &info);
    CHECK(info.version == 2, "target is version 2");
    CHECK(info.cluster_size == 4096, "target has 4 KiB clusters");
    verify_handle(img, model, DISK_SIZE, "the v2 copy reads like the source");
    close_image(img);
    tu_qemu_img_check(dst);
    expect_same(src, dst, 0, "cowdisk_compare(src, v2-4k.qcow2) == 0");
}

static void test_convert_compressed(void) {
    SECTION("convert to compressed qcow2");
    char dst[TU_PATH];
    tu_path(dst, sizeof dst, "compressed.qcow2");
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.flags = COWDISK_CONVERT_COMPRESSED;
    o.workers = 4;
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "convert -c");
    cowdisk *img = open_image(dst, COWDISK_OPEN_READONLY);
    cowdisk_extent e = extent_at(img, 0);
    CHECK((e.flags & COWDISK_EXTENT_COMPRESSED) != 0, "the first cluster is stored compressed");
    CHECK((extent_at(img, 2 * MIB - CLUSTER).flags & COWDISK_EXTENT_COMPRESSED) != 0,
          "the cluster before the chunk boundary is stored compressed");
    verify_handle(img, model, DISK_SIZE, "the compressed copy reads like the source");
    close_image(img);
    tu_qemu_img_check(dst);
    expect_same(src, dst, 0, "cowdisk_compare(src, compressed.qcow2) == 0");
}

static void test_convert_raw(void) {
    SECTION("convert to raw, and raw back to qcow2");
    char dst[TU_PATH], back[TU_PATH];
    tu_path(dst, sizeof dst, "target.raw");
    tu_path(back, sizeof back, "from-raw.qcow2");
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.flags = COWDISK_CONVERT_TARGET_RAW;
    o.workers = 2;
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "convert -O raw");
    verify_raw(dst, model, DISK_SIZE, "the raw file holds exactly the source's bytes");
    expect_same(src, dst, COWDISK_COMPARE_SECOND_RAW,
                "cowdisk_compare(src, raw, SECOND_RAW) == 0");
    expect_same(dst, src, COWDISK_COMPARE_FIRST_RAW, "cowdisk_compare(raw, src, FIRST_RAW) == 0");
    tu_qemu_img_compare(src, dst);

    init_convert_opts(&o);
    o.flags = COWDISK_CONVERT_SOURCE_RAW;
    o.workers = 2;
    CHECK_RC(cowdisk_convert(dst, back, &o), 0, "convert the raw file back to qcow2");
    verify_qcow2(back, model, DISK_SIZE, "the qcow2 made from raw reads like the source");
    cowdisk *img = open_image(back, COWDISK_OPEN_READONLY);
    CHECK((extent_at(img, 3 * MIB + 512 * KIB).flags & COWDISK_EXTENT_DATA) == 0,
          "zeros of the raw file are not stored as data");
    close_image(img);
}

static void test_convert_sparse(void) {
    SECTION("zero detection: NO_SPARSE and min_sparse");
    char dst[TU_PATH];
    cowdisk_convert_opts o;
    cowdisk *img;
    struct {
        const char *name;
        uint32_t flags;
        uint64_t min_sparse;
        int zero_run_is_data;
        const char *what;
    } cases[] = {
        {"nosparse.qcow2", COWDISK_CONVERT_NO_SPARSE, 0, 1,
         "with NO_SPARSE the zero run is written as data"},
        {"sparse256k.qcow2", 0, 256 * KIB, 1,
         "with min_sparse 256 KiB the 128 KiB zero run is written as data"},
        {"sparse64k.qcow2", 0, 64 * KIB, 0,
         "with min_sparse 64 KiB the 128 KiB zero run is not written as data"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tu_path(dst, sizeof dst, cases[i].name);
        init_convert_opts(&o);
        o.flags = cases[i].flags;
        o.min_sparse = cases[i].min_sparse;
        o.workers = 2;
        CHECK_RC(cowdisk_convert(src, dst, &o), 0, cases[i].name);
        img = open_image(dst, COWDISK_OPEN_READONLY);
        int is_data = (extent_at(img, ZRUN_START).flags & COWDISK_EXTENT_DATA) != 0;
        CHECK(is_data == cases[i].zero_run_is_data, cases[i].what);
        verify_handle(img, model, DISK_SIZE, "the copy reads like the source");
        close_image(img);
    }
}

static void test_convert_snapshot(void) {
    SECTION("convert an internal snapshot");
    char dst[TU_PATH];
    tu_path(dst, sizeof dst, "snap.qcow2");
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.snapshot = "before";
    o.workers = 2;
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "convert snapshot 'before' (by name)");
    verify_qcow2(dst, model_snap, DISK_SIZE, "the copy reads as the source did at the snapshot");
    o.snapshot = "1";
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "convert snapshot '1' (by id)");
    verify_qcow2(dst, model_snap, DISK_SIZE, "the copy by id reads the same");
    CHECK(tu_first_diff(model, model_snap, DISK_SIZE) >= 0,
          "(the snapshot differs from the current state)");
    tu_path(dst, sizeof dst, "nosnap.qcow2");
    o.snapshot = "no-such-snapshot";
    CHECK_FAILS(cowdisk_convert(src, dst, &o), "convert an unknown snapshot");
    CHECK(!exists(dst), "the failed convert left no target");
}

static void test_convert_existing(void) {
    SECTION("convert into an existing target (-n)");
    char dst[TU_PATH], small[TU_PATH];
    tu_path(dst, sizeof dst, "existing.qcow2");
    CHECK_RC(cowdisk_create(dst, DISK_SIZE, NULL), 0, "create the target");
    cowdisk *img = open_image(dst, 0);
    write_pattern(img, NULL, 0, 60000, 77);              /* overwritten by data */
    write_pattern(img, NULL, 3 * MIB + 512 * KIB, 100000, 78); /* a hole in the source */
    write_pattern(img, NULL, ZRUN_START, 4096, 79);      /* the source's zero run */
    close_image(img);
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.flags = COWDISK_CONVERT_EXISTING_TARGET;
    o.workers = 2;
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "convert -n into the existing image");
    verify_qcow2(dst, model, DISK_SIZE,
                 "the old contents are gone: the target reads exactly like the source");
    tu_qemu_img_check(dst);

    tu_path(small, sizeof small, "small.qcow2");
    CHECK_RC(cowdisk_create(small, MIB, NULL), 0, "create a 1 MiB target");
    CHECK_RC(cowdisk_convert(src, small, &o), -EINVAL, "convert -n into a smaller target");
    CHECK(exists(small), "the existing target is not removed after a failure");

    tu_path(dst, sizeof dst, "zero-target.qcow2");
    CHECK_RC(cowdisk_create(dst, DISK_SIZE, NULL), 0, "create an empty target");
    o.flags = COWDISK_CONVERT_EXISTING_TARGET | COWDISK_CONVERT_TARGET_IS_ZERO;
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "convert -n --target-is-zero");
    verify_qcow2(dst, model, DISK_SIZE, "the zero target reads like the source");
}

static void test_convert_chain(void) {
    SECTION("convert a backing chain: flattened, and with -B");
    size_t n = DISK_SIZE;
    unsigned char *m = calloc(1, n);
    if (m == NULL)
        FAIL("out of memory");
    char base[TU_PATH], top[TU_PATH], flat[TU_PATH], withb[TU_PATH];
    tu_path(base, sizeof base, "chain-base.qcow2");
    tu_path(top, sizeof top, "chain-top.qcow2");
    tu_path(flat, sizeof flat, "chain-flat.qcow2");
    tu_path(withb, sizeof withb, "chain-B.qcow2");
    CHECK_RC(cowdisk_create(base, DISK_SIZE, NULL), 0, "create the base");
    cowdisk *img = open_image(base, 0);
    write_pattern(img, m, 0, 2 * MIB, 30);
    close_image(img);
    cowdisk_create_opts c;
    init_create_opts(&c);
    c.backing_file = base;
    c.backing_format = "qcow2";
    CHECK_RC(cowdisk_create(top, 0, &c), 0, "create the overlay (size from the base)");
    img = open_image(top, 0);
    write_pattern(img, m, MIB + 100, 200000, 31);
    write_pattern(img, m, 3 * MIB, CLUSTER, 32);
    verify_handle(img, m, DISK_SIZE, "the overlay reads base + overlay writes");
    close_image(img);

    CHECK_RC(cowdisk_convert(top, flat, NULL), 0, "convert the chain (flatten)");
    img = open_image(flat, COWDISK_OPEN_READONLY);
    cowdisk_info info;
    get_info(img, &info);
    CHECK(info.backing_file[0] == '\0' && info.backing_depth == 0,
          "the flattened copy has no backing file");
    verify_handle(img, m, DISK_SIZE, "the flattened copy reads like the chain");
    close_image(img);

    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.backing_file = base;
    o.backing_format = "qcow2";
    o.workers = 2;
    CHECK_RC(cowdisk_convert(top, withb, &o), 0, "convert with -B base");
    img = open_image(withb, COWDISK_OPEN_READONLY);
    get_info(img, &info);
    CHECK(strcmp(info.backing_file, base) == 0, "the target names the base as backing file");
    CHECK(strcmp(info.backing_format, "qcow2") == 0, "the target records backing format qcow2");
    CHECK(info.backing_depth == 1, "the target opened its backing file");
    verify_handle(img, m, DISK_SIZE, "the -B target reads like the chain");
    CHECK(extent_at(img, 0).depth == 1, "a range only the base holds was not copied");
    CHECK(extent_at(img, 3 * MIB).depth == 0 &&
              (extent_at(img, 3 * MIB).flags & COWDISK_EXTENT_DATA),
          "a range the overlay holds was copied");
    close_image(img);
    img = open_image(withb, COWDISK_OPEN_NO_BACKING);
    unsigned char buf[512];
    CHECK_RC(cowdisk_pread(img, buf, sizeof buf, 0), -ENOTSUP,
             "without its backing file the -B target has nothing at 0");
    CHECK_RC(cowdisk_pread(img, buf, sizeof buf, 3 * MIB), 0,
             "without its backing file the -B target still has its own data");
    CHECK(memcmp(buf, m + 3 * MIB, sizeof buf) == 0, "and that data is right");
    close_image(img);
    tu_qemu_img_check(withb);
    expect_same(top, withb, 0, "cowdisk_compare(chain, -B target) == 0");

    o.flags = COWDISK_CONVERT_TARGET_RAW;
    tu_path(withb, sizeof withb, "chain-B.raw");
    CHECK_RC(cowdisk_convert(top, withb, &o), -EINVAL, "-B with a raw target");
    CHECK(!exists(withb), "no target left behind");
    free(m);
}

/* ---- 2. progress ---------------------------------------------------------------- */

static char big[TU_PATH];
static unsigned char *big_model;

static void make_big_source(void) {
    tu_path(big, sizeof big, "big.qcow2");
    CHECK_RC(cowdisk_create(big, BIG_SIZE, NULL), 0, "create an 8 MiB source");
    cowdisk *img = open_image(big, 0);
    write_pattern(img, big_model, 0, BIG_SIZE, 40);
    close_image(img);
}

static void test_progress(void) {
    SECTION("progress");
    make_big_source();
    char dst[TU_PATH];
    tu_path(dst, sizeof dst, "progress.qcow2");
    struct progress_log log;
    progress_init(&log, -1);
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.workers = 2;
    o.progress = on_progress;
    o.opaque = &log;
    CHECK_RC(cowdisk_convert(big, dst, &o), 0, "convert with a progress callback");
    check_progress(&log, "convert", 2);
    CHECK(log.last_total >= BIG_SIZE / 2, "the progress total covers the data");
    CHECK(!log.total_changed, "convert: the progress total stays the same");
    verify_qcow2(dst, big_model, BIG_SIZE, "the copy made with progress reads like the source");

    progress_init(&log, -1);
    o.flags = COWDISK_CONVERT_COMPRESSED | COWDISK_CONVERT_OUT_OF_ORDER;
    o.workers = 4;
    tu_path(dst, sizeof dst, "progress-c.qcow2");
    CHECK_RC(cowdisk_convert(src, dst, &o), 0, "compressed, out-of-order convert with progress");
    check_progress(&log, "compressed convert", 2);
    verify_qcow2(dst, model, DISK_SIZE, "that copy reads like the source");
}

/* ---- 3. cancel ------------------------------------------------------------------ */

static void test_cancel(void) {
    SECTION("cancel from the progress callback");
    char dst[TU_PATH];
    tu_path(dst, sizeof dst, "cancelled.qcow2");
    struct progress_log log;
    progress_init(&log, 0);
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.workers = 1;
    o.progress = on_progress;
    o.opaque = &log;
    CHECK_RC(cowdisk_convert(big, dst, &o), -ECANCELED, "callback returns 1 at its first call");
    CHECK(log.calls >= 1, "the callback was called");
    CHECK(!exists(dst), "the cancelled convert removed its target");

    /* A file that was there before is replaced, so a cancel leaves nothing either. */
    tu_write_file(dst, "old", 3);
    progress_init(&log, 0);
    o.flags = COWDISK_CONVERT_TARGET_RAW;
    CHECK_RC(cowdisk_convert(big, dst, &o), -ECANCELED, "cancel a convert to raw");
    CHECK(!exists(dst), "the cancelled raw convert removed its target");

    /* An existing target stays, and the message says so. */
    CHECK_RC(cowdisk_create(dst, BIG_SIZE, NULL), 0, "create an existing target");
    progress_init(&log, 0);
    o.flags = COWDISK_CONVERT_EXISTING_TARGET;
    CHECK_RC(cowdisk_convert(big, dst, &o), -ECANCELED, "cancel a convert -n");
    CHECK(strstr(cowdisk_last_error(), "keeps what was written") != NULL,
          "the message says the existing target keeps what was written");
    CHECK(exists(dst), "the existing target is still there");
    verify_qcow2(big, big_model, BIG_SIZE, "the source is unchanged by the cancels");
}

/* ---- 4. bad arguments ----------------------------------------------------------- */

static void test_bad_args(void) {
    SECTION("bad arguments");
    char dst[TU_PATH], missing[TU_PATH];
    tu_path(dst, sizeof dst, "bad.qcow2");
    tu_path(missing, sizeof missing, "no-such-source.qcow2");
    cowdisk_convert_opts o;

    CHECK_RC(cowdisk_convert(NULL, dst, NULL), -EINVAL, "NULL source");
    CHECK_RC(cowdisk_convert(src, NULL, NULL), -EINVAL, "NULL target");
    CHECK_RC(cowdisk_convert("", dst, NULL), -EINVAL, "empty source path");
    CHECK_RC(cowdisk_convert(src, "", NULL), -EINVAL, "empty target path");

    init_convert_opts(&o);
    o.struct_size = 0;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "struct_size 0");
    o.struct_size = 4;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "struct_size 4 (too small)");
    init_convert_opts(&o);
    o.flags = 1u << 20;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "unknown flag");
    init_convert_opts(&o);
    o.workers = 17;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "17 workers");
    init_convert_opts(&o);
    o.flags = COWDISK_CONVERT_COMPRESSED | COWDISK_CONVERT_TARGET_RAW;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "compressed raw target");
    o.flags = COWDISK_CONVERT_SOURCE_RAW | COWDISK_CONVERT_SOURCE_QCOW2;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "source both raw and qcow2");
    o.flags = COWDISK_CONVERT_TARGET_IS_ZERO;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "TARGET_IS_ZERO without EXISTING_TARGET");
    cowdisk_create_opts c;
    init_create_opts(&c);
    c.cluster_size = 1000;
    init_convert_opts(&o);
    o.create = &c;
    CHECK_RC(cowdisk_convert(src, dst, &o), -EINVAL, "create options with cluster_size 1000");
    CHECK(!exists(dst), "no target was created by any of the rejected calls");

    CHECK_RC(cowdisk_convert(missing, dst, NULL), -ENOENT, "nonexistent source");
    CHECK(!exists(dst), "no target was created for a nonexistent source");
    init_convert_opts(&o);
    o.flags = COWDISK_CONVERT_EXISTING_TARGET;
    CHECK_RC(cowdisk_convert(src, dst, &o), -ENOENT, "convert -n into a nonexistent target");
    CHECK(!exists(dst), "and that did not create it");
    tu_path(dst, sizeof dst, "no-such-dir/x.qcow2");
    CHECK_RC(cowdisk_convert(src, dst, NULL), -ENOENT, "target in a nonexistent directory");

    uint64_t mm = 0;
    CHECK_RC(cowdisk_compare(NULL, src, 0, &mm), -EINVAL, "compare with a NULL path");
    CHECK_RC(cowdisk_compare(src, missing, 0, &mm), -ENOENT, "compare with a nonexistent image");
    CHECK_RC(cowdisk_compare(src, src, 1u << 10, &mm), -EINVAL, "compare with an unknown flag");
    CHECK_RC(cowdisk_commit(NULL, NULL, 0, NULL, NULL), -EINVAL, "commit a NULL path");
    CHECK_RC(cowdisk_rebase(NULL, NULL, NULL, 0, NULL, NULL), -EINVAL, "rebase a NULL path");
    CHECK_RC(cowdisk_rebase(src, NULL, NULL, 2, NULL, NULL), -EINVAL,
             "rebase with an unknown flag");
}

/* ---- 5. compare ----------------------------------------------------------------- */

static void test_compare(void) {
    SECTION("compare");
    char copy[TU_PATH], raw[TU_PATH], bigger[TU_PATH];
    tu_path(copy, sizeof copy, "cmp.qcow2");
    tu_path(raw, sizeof raw, "cmp.raw");
    tu_path(bigger, sizeof bigger, "cmp-bigger.qcow2");
    CHECK_RC(cowdisk_convert(src, copy, NULL), 0, "make a qcow2 copy");
    expect_same(src, copy, 0, "the copy compares equal");
    CHECK_RC(cowdisk_compare(src, copy, COWDISK_COMPARE_STRICT, NULL), 0,
             "equal in strict mode too (same size), mismatch pointer NULL");
    CHECK_RC(cowdisk_compare(src, src, 0, NULL), 0, "an image equals itself");

    static const uint64_t flips[] = {1234567, 3 * MIB + 512 * KIB + 1, 511, 2 * MIB - 5001};
    for (size_t i = 0; i < sizeof flips / sizeof flips[0]; i++) {
        uint64_t at = flips[i];
        char what[200];
        cowdisk *img = open_image(copy, 0);
        unsigned char b = (unsigned char)(model[at] ^ 0x40);
        CHECK_RC(cowdisk_pwrite(img, &b, 1, at), 0, "flip one byte in the copy");
        close_image(img);
        uint64_t mismatch = 0;
        snprintf(what, sizeof what, "byte %llu flipped: compare returns 1",
                 (unsigned long long)at);
        CHECK(cowdisk_compare(src, copy, 0, &mismatch) == 1, what);
        printf("     mismatch reported at %llu\n", (unsigned long long)mismatch);
        snprintf(what, sizeof what, "mismatch is the sector of the flipped byte (%llu)",
                 (unsigned long long)(at & ~511ull));
        CHECK(mismatch == (at & ~511ull), what);
        mismatch = 0;
        CHECK(cowdisk_compare(copy, src, 0, &mismatch) == 1 && mismatch == (at & ~511ull),
              "the same the other way round");
        CHECK(cowdisk_compare(src, copy, 0, NULL) == 1, "1 with a NULL mismatch pointer");
        /* Put the byte back. */
        img = open_image(copy, 0);
        CHECK_RC(cowdisk_pwrite(img, model + at, 1, at), 0, "restore the byte");
        close_image(img);
        expect_same(src, copy, 0, "equal again once restored");
    }

    /* Against raw: flip a byte in the raw file. */
    cowdisk_convert_opts o;
    init_convert_opts(&o);
    o.flags = COWDISK_CONVERT_TARGET_RAW;
    CHECK_RC(cowdisk_convert(src, raw, &o), 0, "make a raw copy");
    size_t len;
    unsigned char *bytes = tu_read_file(raw, &len);
    bytes[777777] ^= 1;
    tu_write_file(raw, bytes, len);
    free(bytes);
    uint64_t mismatch = 0;
    CHECK(cowdisk_compare(src, raw, COWDISK_COMPARE_SECOND_RAW, &mismatch) == 1 &&
              mismatch == (777777ull & ~511ull),
          "a flipped byte in the raw copy is found in its sector");

    /* Sizes: a copy grown by 1 MiB reads as zeros past the source's end. */
    CHECK_RC(cowdisk_convert(src, bigger, NULL), 0, "make another copy");
    cowdisk *img = open_image(bigger, 0);
    CHECK_RC(cowdisk_resize(img, DISK_SIZE + MIB), 0, "grow it by 1 MiB");
    close_image(img);
    expect_same(src, bigger, 0, "not strict: the extra zeros are no difference");
    mismatch = 0;
    CHECK(cowdisk_compare(src, bigger, COWDISK_COMPARE_STRICT, &mismatch) == 1,
          "strict: different sizes differ");
    CHECK(mismatch == DISK_SIZE, "strict: mismatch is the smaller size");
    mismatch = 0;
    CHECK(cowdisk_compare(bigger, src, COWDISK_COMPARE_STRICT, &mismatch) == 1 &&
              mismatch == DISK_SIZE,
          "strict the other way round: the same");
    img = open_image(bigger, 0);
    unsigned char b = 0x5C;
    CHECK_RC(cowdisk_pwrite(img, &b, 1, DISK_SIZE + 1000), 0, "write a byte in the extra part");
    close_image(img);
    mismatch = 0;
    CHECK(cowdisk_compare(src, bigger, 0, &mismatch) == 1, "not strict: data past the end differs");
    CHECK(mismatch == DISK_SIZE + 512, "mismatch is the sector of that byte");
}

/* ---- 6. commit ------------------------------------------------------------------ */

static void make_overlay(const char *path, const char *backing) {
    cowdisk_create_opts c;
    init_create_opts(&c);
    c.backing_file = backing;
    c.backing_format = "qcow2";
    CHECK_RC(cowdisk_create(path, 0, &c), 0, "create an overlay");
}

static void test_commit(void) {
    SECTION("commit");
    unsigned char *m = calloc(1, DISK_SIZE), *base_only = calloc(1, DISK_SIZE);
    if (m == NULL || base_only == NULL)
        FAIL("out of memory");
    char base[TU_PATH], top[TU_PATH], mid[TU_PATH];
    tu_path(base, sizeof base, "commit-base.qcow2");
    tu_path(mid, sizeof mid, "commit-mid.qcow2");
    tu_path(top, sizeof top, "commit-top.qcow2");
    CHECK_RC(cowdisk_create(base, DISK_SIZE, NULL), 0, "create the base");
    cowdisk *img = open_image(base, 0);
    write_pattern(img, m, 0, 300000, 50);
    write_pattern(img, m, 2 * MIB, 100000, 51);
    close_image(img);
    memcpy(base_only, m, DISK_SIZE);
    make_overlay(top, base);
    img = open_image(top, 0);
    write_pattern(img, m, 100000, 50000, 52);        /* over base data */
    write_pattern(img, m, 3 * MIB + 3, 70000, 53);   /* where the base has nothing */
    write_zero_bytes(img, m, 2 * MIB, 4096);         /* zeros over base data */
    verify_handle(img, m, DISK_SIZE, "the overlay reads base + its writes");
    close_image(img);
    verify_qcow2(base, base_only, DISK_SIZE, "the base alone does not have them yet");

    struct progress_log log;
    progress_init(&log, -1);
    CHECK_RC(cowdisk_commit(top, NULL, 0, on_progress, &log), 0, "commit the overlay");
    check_progress(&log, "commit", 2);
    verify_qcow2(base, m, DISK_SIZE, "the base alone now reads what the overlay did");
    tu_qemu_img_check(base);
    verify_qcow2(top, m, DISK_SIZE, "the overlay still reads the same (through the base)");
    img = open_image(top, COWDISK_OPEN_NO_BACKING);
    unsigned char buf[4096];
    CHECK_RC(cowdisk_pread(img, buf, sizeof buf, 3 * MIB + 4096), -ENOTSUP,
             "the overlay was emptied: nothing of its own where it had written");
    close_image(img);
    img = open_image(top, COWDISK_OPEN_READONLY);
    CHECK(extent_at(img, 100000).depth == 1 && extent_at(img, 3 * MIB + 4096).depth == 1,
          "block_status: the overlay's former data is now decided by the base (depth 1)");
    close_image(img);

    /* COMMIT_KEEP: the overlay keeps its data. */
    img = open_image(top, 0);
    write_pattern(img, m, MIB + 5, 20000, 54);
    close_image(img);
    CHECK_RC(cowdisk_commit(top, NULL, COWDISK_COMMIT_KEEP, NULL, NULL), 0,
             "commit with COMMIT_KEEP, no progress callback");
    verify_qcow2(base, m, DISK_SIZE, "the base got the new write");
    img = open_image(top, COWDISK_OPEN_NO_BACKING);
    CHECK_RC(cowdisk_pread(img, buf, sizeof buf, MIB + 4096), 0,
             "the overlay still holds its own data");
    CHECK(memcmp(buf, m + MIB + 4096, sizeof buf) == 0, "and it is the data written");
    close_image(img);

    /* An explicit base two layers down. */
    make_overlay(mid, base);
    img = open_image(mid, 0);
    write_pattern(img, m, 1500 * KIB, 40000, 55);
    close_image(img);
    unlink(top);
    make_overlay(top, mid);
    img = open_image(top, 0);
    write_pattern(img, m, 1510 * KIB, 40000, 56);
    write_pattern(img, m, 0, 1000, 57);
    close_image(img);
    verify_qcow2(top, m, DISK_SIZE, "the three-layer chain reads as written");
    CHECK_RC(cowdisk_commit(top, base, 0, NULL, NULL), 0, "commit the top into the bottom base");
    verify_qcow2(base, m, DISK_SIZE, "the bottom base holds both layers' data");
    verify_qcow2(top, m, DISK_SIZE, "the top still reads the same");

    CHECK_RC(cowdisk_commit(base, NULL, 0, NULL, NULL), -EINVAL,
             "commit an image without a backing file");
    CHECK_RC(cowdisk_commit(top, src, 0, NULL, NULL), -EINVAL,
             "commit into an image not in the chain");
    CHECK_RC(cowdisk_commit(top, NULL, 2, NULL, NULL), -EINVAL, "commit with an unknown flag");
    verify_qcow2(base, m, DISK_SIZE, "the rejected commits changed nothing");
    free(m);
    free(base_only);
}

/* ---- 7. rebase ------------------------------------------------------------------ */

static void test_rebase(void) {
    SECTION("rebase");
    unsigned char *m = calloc(1, DISK_SIZE), *base2_m = calloc(1, DISK_SIZE);
    if (m == NULL || base2_m == NULL)
        FAIL("out of memory");
    char base[TU_PATH], base2[TU_PATH], ovl[4][TU_PATH];
    tu_path(base, sizeof base, "rebase-base.qcow2");
    tu_path(base2, sizeof base2, "rebase-base2.qcow2");
    CHECK_RC(cowdisk_create(base, DISK_SIZE, NULL), 0, "create the base");
    cowdisk *img = open_image(base, 0);
    write_pattern(img, m, 0, 400000, 60);
    write_pattern(img, m, 2 * MIB + 17, 300000, 61);
    close_image(img);
    CHECK_RC(cowdisk_create(base2, DISK_SIZE, NULL), 0, "create a second, different base");
    img = open_image(base2, 0);
    write_pattern(img, base2_m, 64 * KIB, 600000, 62);
    write_pattern(img, base2_m, 3 * MIB, 200000, 63);
    close_image(img);
    /* Four overlays with the same writes. */
    for (int i = 0; i < 4; i++) {
        char name[64];
        snprintf(name, sizeof name, "rebase-ovl%d.qcow2", i);
        tu_path(ovl[i], sizeof ovl[i], name);
        make_overlay(ovl[i], base);
        img = open_image(ovl[i], 0);
        write_pattern(img, i == 0 ? m : NULL, 200000, 100000, 64);
        write_pattern(img, i == 0 ? m : NULL, 1500 * KIB, 65536, 65);
        close_image(img);
    }
    verify_qcow2(ovl[0], m, DISK_SIZE, "the overlays read base + their writes");

    struct progress_log log;
    progress_init(&log, -1);
    CHECK_RC(cowdisk_rebase(ovl[0], NULL, NULL, 0, on_progress, &log), 0,
             "rebase overlay 0 onto nothing (NULL)");
    check_progress(&log, "rebase", 2);
    CHECK_RC(cowdisk_rebase(ovl[1], "", NULL, 0, NULL, NULL), 0,
             "rebase overlay 1 onto nothing (\"\")");
    for (int i = 0; i < 2; i++) {
        img = open_image(ovl[i], COWDISK_OPEN_NO_BACKING);
        cowdisk_info info;
        get_info(img, &info);
        CHECK(info.backing_file[0] == '\0' && info.backing_format[0] == '\0' &&
                  info.backing_depth == 0,
              "the rebased overlay names no backing file");
        verify_handle(img, m, DISK_SIZE, "without a backing file it reads the same as before");
        close_image(img);
    }
    tu_qemu_img_check(ovl[0]);
    tu_qemu_img_check(ovl[1]);

    /* Safe rebase onto a different base, named relative to the overlay's folder. */
    CHECK_RC(cowdisk_rebase(ovl[2], "rebase-base2.qcow2", "qcow2", 0, NULL, NULL), 0,
             "rebase overlay 2 onto base2 (relative name)");
    img = open_image(ovl[2], 0);
    cowdisk_info info;
    get_info(img, &info);
    CHECK(strcmp(info.backing_file, "rebase-base2.qcow2") == 0,
          "overlay 2 names rebase-base2.qcow2");
    CHECK(info.backing_depth == 1, "and opened it");
    verify_handle(img, m, DISK_SIZE, "overlay 2 reads the same as before through base2");
    close_image(img);
    expect_same(ovl[0], ovl[2], 0, "compare: rebased overlays 0 and 2 are identical");

    /* Unsafe: only the name changes, so what the overlay does not allocate now reads
     * base2. The overlay's clusters (its writes rounded out to whole clusters, which
     * copy-on-write filled from the old base) read as before. */
    unsigned char *expect = xmalloc(DISK_SIZE);
    memcpy(expect, base2_m, DISK_SIZE);
    static const uint64_t own[][2] = {{200000, 100000}, {1500 * KIB, 65536}};
    for (size_t i = 0; i < 2; i++) {
        uint64_t s = own[i][0] / CLUSTER * CLUSTER;
        uint64_t e = (own[i][0] + own[i][1] + CLUSTER - 1) / CLUSTER * CLUSTER;
        memcpy(expect + s, m + s, (size_t)(e - s));
    }
    size_t before_len;
    CHECK_RC(cowdisk_rebase(ovl[3], base2, "qcow2", COWDISK_REBASE_UNSAFE, NULL, NULL), 0,
             "rebase -u overlay 3 onto base2");
    img = open_image(ovl[3], 0);
    get_info(img, &info);
    CHECK(strcmp(info.backing_file, base2) == 0, "overlay 3 names base2");
    CHECK(strcmp(info.backing_format, "qcow2") == 0, "with format qcow2");
    verify_handle(img, expect, DISK_SIZE,
                  "overlay 3 keeps its own clusters and reads base2 elsewhere (nothing copied)");
    close_image(img);
    unsigned char *before = tu_read_file(base2, &before_len);
    CHECK_FAILS(cowdisk_rebase(ovl[3], "no-such-base.qcow2", NULL, 0, NULL, NULL),
                "safe rebase onto a nonexistent base");
    verify_qcow2(ovl[3], expect, DISK_SIZE, "the failed rebase changed nothing");
    size_t after_len;
    unsigned char *after = tu_read_file(base2, &after_len);
    CHECK(after_len == before_len && memcmp(before, after, after_len) == 0,
          "rebases never write the backing file");
    free(before);
    free(after);
    free(expect);
    free(m);
    free(base2_m);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("convert");
    model = calloc(1, DISK_SIZE);
    model_snap = calloc(1, DISK_SIZE);
    big_model = calloc(1, BIG_SIZE);
    if (model == NULL || model_snap == NULL || big_model == NULL)
        FAIL("out of memory");

    make_source();
    test_convert_default();
    test_convert_create_opts();
    test_convert_compressed();
    test_convert_raw();
    test_convert_sparse();
    test_convert_snapshot();
    test_convert_existing();
    test_convert_chain();
    test_progress();
    test_cancel();
    test_bad_args();
    test_compare();
    test_commit();
    test_rebase();

    free(model);
    free(model_snap);
    free(big_model);
    tu_finish("convert");
    return 0;
}
