/*
 * C API test: create/open/write/read/close at unaligned offsets spanning clusters,
 * get_info, read-only handles, error cases, diagnostics; every image written is
 * checked with `qemu-img check` and compared with `qemu-img compare`.
 */
#include "testutil.h"

#define DISK_SIZE (16ull << 20)
#define CLUSTER 65536ull

/* What the guest should see: every write is applied here too. */
static unsigned char *model;

static void fill_pattern(unsigned char *buf, size_t len, uint64_t offset, unsigned seed) {
    for (size_t i = 0; i < len; i++) {
        uint64_t x = offset + i;
        buf[i] = (unsigned char)(x * 131u + (x >> 9) * 7u + seed * 29u + 1u);
    }
}

/* Writes a pattern at [offset, offset+len) and records it in the model. */
static void write_range(cowdisk *img, uint64_t offset, size_t len, unsigned seed,
                        const char *what) {
    unsigned char *buf = malloc(len);
    if (buf == NULL)
        FAIL("out of memory");
    fill_pattern(buf, len, offset, seed);
    CHECK_RC(cowdisk_pwrite(img, buf, len, offset), 0, what);
    memcpy(model + offset, buf, len);
    free(buf);
}

/* Reads the whole disk in odd-sized chunks and compares it with the model. */
static void verify_disk(cowdisk *img, uint64_t size, const char *what) {
    const size_t chunk = (1u << 20) + 4097; /* unaligned chunks cross clusters */
    unsigned char *buf = malloc(chunk);
    if (buf == NULL)
        FAIL("out of memory");
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

/* Reads one range and compares it with the model. */
static void verify_range(cowdisk *img, uint64_t offset, size_t len, const char *what) {
    unsigned char *buf = malloc(len);
    if (buf == NULL)
        FAIL("out of memory");
    CHECK_RC(cowdisk_pread(img, buf, len, offset), 0, what);
    long long d = tu_first_diff(buf, model + offset, len);
    if (d >= 0)
        FAIL("%s: byte at guest offset %llu is 0x%02x, expected 0x%02x", what,
             (unsigned long long)(offset + (uint64_t)d), buf[d], model[offset + (uint64_t)d]);
    free(buf);
}

static void get_info(cowdisk *img, cowdisk_info *info) {
    memset(info, 0x5A, sizeof *info);
    info->struct_size = sizeof *info;
    CHECK_RC(cowdisk_get_info(img, info), 0, "cowdisk_get_info succeeds");
}

/* Saves the model as a raw file and asks QEMU to compare it with the image. */
static void compare_with_model(const char *image, uint64_t size) {
    char raw[TU_PATH];
    tu_path(raw, sizeof raw, "expected.raw");
    tu_write_file(raw, model, (size_t)size);
    tu_qemu_img_compare(image, raw);
    unlink(raw);
}

static void check_file_unchanged(const char *path, const unsigned char *before,
                                 size_t before_len, const char *what) {
    size_t len;
    unsigned char *now = tu_read_file(path, &len);
    CHECK(len == before_len && memcmp(now, before, len) == 0, what);
    free(now);
}

static void test_diagnostics(void) {
    SECTION("version and error strings");
    const char *v = cowdisk_version();
    CHECK(v != NULL && v[0] >= '0' && v[0] <= '9' && strchr(v, '.') != NULL,
          "cowdisk_version() looks like a version number");
    printf("     version: %s\n", v);
    const char *e1 = cowdisk_strerror(-EINVAL), *e2 = cowdisk_strerror(EINVAL);
    CHECK(e1 != NULL && e1[0] != '\0', "cowdisk_strerror(-EINVAL) is non-empty");
    CHECK(e2 != NULL && strcmp(e1, e2) == 0, "cowdisk_strerror accepts EINVAL and -EINVAL");
    CHECK(cowdisk_strerror(-EROFS)[0] != '\0', "cowdisk_strerror(-EROFS) is non-empty");
    CHECK(cowdisk_strerror(-ENOENT)[0] != '\0', "cowdisk_strerror(-ENOENT) is non-empty");
    CHECK(cowdisk_strerror(123456) != NULL, "cowdisk_strerror(unknown) is not NULL");
    CHECK(cowdisk_last_error() != NULL, "cowdisk_last_error() is never NULL");
}

static void test_null_arguments(void) {
    SECTION("NULL handles and arguments are -EINVAL, never a crash");
    char buf[16] = {0};
    cowdisk_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_RC(cowdisk_pread(NULL, buf, sizeof buf, 0), -EINVAL, "pread on a NULL handle");
    CHECK_RC(cowdisk_pwrite(NULL, buf, sizeof buf, 0), -EINVAL, "pwrite on a NULL handle");
    CHECK_RC(cowdisk_flush(NULL), -EINVAL, "flush on a NULL handle");
    CHECK_RC(cowdisk_get_info(NULL, &info), -EINVAL, "get_info on a NULL handle");
    CHECK_RC(cowdisk_close(NULL), -EINVAL, "close on a NULL handle");
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(NULL, NULL, &img), -EINVAL, "open with a NULL path");
    CHECK(img == NULL, "failed open leaves *out untouched");
    CHECK_RC(cowdisk_open("", NULL, &img), -EINVAL, "open with an empty path");
    CHECK_RC(cowdisk_create(NULL, DISK_SIZE, NULL), -EINVAL, "create with a NULL path");
}

static void test_create_errors(const char *image) {
    SECTION("create");
    char path[TU_PATH];
    CHECK_RC(cowdisk_create(image, DISK_SIZE, NULL), 0, "create a 16 MiB image with defaults");
    CHECK_RC(cowdisk_create(image, DISK_SIZE, NULL), -EEXIST, "create over an existing file");
    tu_qemu_img_check(image);

    cowdisk_create_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.struct_size = sizeof opts;
    opts.cluster_size = 1000;
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "bad-cluster.qcow2"), DISK_SIZE, &opts),
             -EINVAL, "create with cluster_size 1000 (not a power of two)");
    opts.cluster_size = 4u << 20;
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "big-cluster.qcow2"), DISK_SIZE, &opts),
             -EINVAL, "create with cluster_size 4 MiB (above 2 MiB)");
    opts.cluster_size = 0;
    opts.refcount_bits = 3;
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "bad-refcount.qcow2"), DISK_SIZE,
                            &opts),
             -EINVAL, "create with refcount_bits 3");
    opts.refcount_bits = 0;
    opts.version = 7;
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "bad-version.qcow2"), DISK_SIZE, &opts),
             -EINVAL, "create with version 7");
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "no-such-dir/x.qcow2"), DISK_SIZE, NULL),
             -ENOENT, "create in a directory that does not exist");

    /* COWDISK_CREATE_NO_BACKING_CHECK: the backing file is not opened (qemu-img -u). */
    opts.version = 0;
    opts.backing_file = "no-such-backing.qcow2";
    opts.backing_format = "qcow2";
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "checked.qcow2"), DISK_SIZE, &opts),
             -ENOENT, "create over a missing backing file");
    opts.flags = COWDISK_CREATE_NO_BACKING_CHECK;
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "unchecked.qcow2"), 0, &opts), -EINVAL,
             "NO_BACKING_CHECK needs a size");
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "unchecked.qcow2"), DISK_SIZE, &opts), 0,
             "create with NO_BACKING_CHECK over a missing backing file");
    opts.flags = 0x80;
    CHECK_RC(cowdisk_create(tu_path(path, sizeof path, "bad-flags.qcow2"), DISK_SIZE, &opts),
             -EINVAL, "create with an unknown flag");
}

static void test_open_errors(const char *image) {
    SECTION("open errors");
    char path[TU_PATH];
    cowdisk *img = NULL;

    CHECK_RC(cowdisk_open(image, NULL, NULL), -EINVAL, "open with a NULL out pointer");
    CHECK_RC(cowdisk_open(tu_path(path, sizeof path, "missing.qcow2"), NULL, &img), -ENOENT,
             "open a path that does not exist");
    CHECK(img == NULL, "failed open leaves *out untouched");

    /* A text file is not a qcow2 image, and opening it must not change it. */
    unsigned char junk[8192];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (unsigned char)("this is not a qcow2 image\n"[i % 26]);
    tu_path(path, sizeof path, "not-qcow2.img");
    tu_write_file(path, junk, sizeof junk);
    CHECK_RC(cowdisk_open(path, NULL, &img), -EINVAL, "open a file that is not qcow2");
    CHECK(img == NULL, "failed open leaves *out untouched");
    check_file_unchanged(path, junk, sizeof junk, "the non-qcow2 file is unchanged");

    tu_path(path, sizeof path, "empty.img");
    tu_write_file(path, "", 0);
    CHECK_FAILS(cowdisk_open(path, NULL, &img), "open an empty file");

    /* Truncated copies of a valid image. */
    size_t len;
    unsigned char *whole = tu_read_file(image, &len);
    static const size_t cuts[] = {3, 64, 100, 4096, 65536 + 8};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char what[200];
        if (cuts[i] >= len)
            continue;
        snprintf(path, sizeof path, "%s/truncated-%zu.qcow2", tu_scratch, cuts[i]);
        tu_write_file(path, whole, cuts[i]);
        snprintf(what, sizeof what, "open an image truncated to %zu of its %zu bytes", cuts[i],
                 len);
        img = NULL;
        CHECK_FAILS(cowdisk_open(path, NULL, &img), what);
        CHECK(img == NULL, "failed open leaves *out untouched");
        snprintf(what, sizeof what, "the image truncated to %zu bytes is unchanged", cuts[i]);
        check_file_unchanged(path, whole, cuts[i], what);
    }
    free(whole);
}

static void test_locking(const char *image) {
    SECTION("image locking");
    cowdisk *writer = NULL, *other = NULL;
    CHECK_RC(cowdisk_open(image, NULL, &writer), 0, "open read-write");
    CHECK_RC(cowdisk_open(image, NULL, &other), -EBUSY, "a second writer gets -EBUSY");
    CHECK(other == NULL, "failed open leaves *out untouched");
    CHECK(strstr(cowdisk_last_error(), "Failed to get \"write\" lock") != NULL,
          "the message names the conflict in QEMU's words");
    cowdisk_open_opts o = {.struct_size = sizeof o, .flags = COWDISK_OPEN_READONLY};
    CHECK_RC(cowdisk_open(image, &o, &other), -EBUSY, "a reader beside a writer gets -EBUSY");
    o.flags = COWDISK_OPEN_READONLY | COWDISK_OPEN_FORCE_SHARE;
    CHECK_RC(cowdisk_open(image, &o, &other), 0, "a force-share reader gets in");
    CHECK_RC(cowdisk_close(other), 0, "close the reader");
    o.flags = COWDISK_OPEN_FORCE_SHARE;
    other = NULL;
    CHECK_RC(cowdisk_open(image, &o, &other), -EINVAL, "force-share needs read-only");
    o.flags = COWDISK_OPEN_NO_LOCK;
    CHECK_RC(cowdisk_open(image, &o, &other), 0, "COWDISK_OPEN_NO_LOCK takes no locks");
    CHECK_RC(cowdisk_close(other), 0, "close the unlocked handle");
    CHECK_RC(cowdisk_close(writer), 0, "close the writer");
    CHECK_RC(cowdisk_open(image, NULL, &writer), 0, "closing released the locks");
    CHECK_RC(cowdisk_close(writer), 0, "close again");
}

static void check_default_info(cowdisk *img, const char *image, int readonly) {
    cowdisk_info info;
    get_info(img, &info);
    CHECK(info.struct_size == sizeof info, "info.struct_size is kept");
    CHECK(info.version == 3, "info.version is 3 (the default)");
    CHECK(info.virtual_size == DISK_SIZE, "info.virtual_size is 16 MiB");
    CHECK(info.cluster_size == CLUSTER, "info.cluster_size is 65536 (the default)");
    CHECK(info.refcount_bits == 16, "info.refcount_bits is 16 (the default)");
    CHECK(((info.flags & COWDISK_INFO_READONLY) != 0) == (readonly != 0),
          readonly ? "info.flags has READONLY" : "info.flags has no READONLY");
    CHECK((info.flags & COWDISK_INFO_CORRUPT) == 0, "info.flags has no CORRUPT");
    CHECK((info.flags & COWDISK_INFO_LAZY_REFCOUNTS) == 0, "info.flags has no LAZY_REFCOUNTS");
    CHECK(info.compression_type == 0, "info.compression_type is zlib");
    CHECK(info.nb_snapshots == 0, "info.nb_snapshots is 0");
    CHECK(info.backing_depth == 0, "info.backing_depth is 0");
    CHECK(info.backing_file[0] == '\0', "info.backing_file is empty");
    CHECK(info.backing_format[0] == '\0', "info.backing_format is empty");
    struct stat st;
    if (stat(image, &st) != 0)
        FAIL("stat %s: %s", image, strerror(errno));
    CHECK(info.host_size > 0 && info.host_size <= (uint64_t)st.st_size + 16 * CLUSTER,
          "info.host_size is the size of the file");
}

static void test_read_write(const char *image) {
    SECTION("read and write at unaligned offsets");
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(image, NULL, &img), 0, "open read-write with NULL options");
    CHECK(img != NULL, "open stores a handle");
    check_default_info(img, image, 0);
    CHECK_RC(cowdisk_get_info(img, NULL), -EINVAL, "get_info with a NULL out pointer");

    verify_disk(img, DISK_SIZE, "a new image reads as zeros");

    char small[8];
    CHECK_RC(cowdisk_pread(img, NULL, 16, 0), -EINVAL, "pread into a NULL buffer");
    CHECK_RC(cowdisk_pwrite(img, NULL, 16, 0), -EINVAL, "pwrite from a NULL buffer");
    CHECK_RC(cowdisk_pread(img, small, 0, 0), 0, "pread of 0 bytes succeeds");
    CHECK_RC(cowdisk_pwrite(img, small, 0, 0), 0, "pwrite of 0 bytes succeeds");

    write_range(img, 7, 1, 1, "write 1 byte at offset 7");
    write_range(img, CLUSTER - 123, 3 * CLUSTER + 1000, 2,
                "write 197,608 bytes at 65,413 (spans 5 clusters, unaligned both ends)");
    write_range(img, 5 * CLUSTER + 511, 513, 3, "write 513 bytes at 328,191 (inside a cluster)");
    write_range(img, 6 * CLUSTER - 1, 2, 4, "write 2 bytes straddling a cluster boundary");
    write_range(img, 2 * CLUSTER + 4000, 70000, 5,
                "overwrite 70,000 bytes inside the earlier write (allocated clusters)");
    write_range(img, 3 * CLUSTER + 60000, 80000, 6,
                "write 80,000 bytes half over allocated, half over new clusters");
    write_range(img, 8u << 20, 1u << 20, 7, "write 1 MiB at 8 MiB (aligned)");
    write_range(img, DISK_SIZE - 1000, 1000, 8, "write the last 1000 bytes of the disk");
    write_range(img, DISK_SIZE - 1, 1, 9, "write the very last byte");

    verify_range(img, CLUSTER - 200, 400, "read 400 bytes around the first cluster boundary");
    verify_range(img, 6 * CLUSTER - 3, 6, "read 6 bytes straddling a cluster boundary");
    verify_disk(img, DISK_SIZE, "the whole disk reads back as written");

    SECTION("out-of-range I/O is -EINVAL and changes nothing");
    unsigned char buf[64];
    memset(buf, 0xEE, sizeof buf);
    CHECK_RC(cowdisk_pread(img, buf, 20, DISK_SIZE - 10), -EINVAL,
             "pread of 20 bytes 10 bytes before the end");
    CHECK_RC(cowdisk_pread(img, buf, 1, DISK_SIZE), -EINVAL, "pread of 1 byte at the end");
    CHECK_RC(cowdisk_pread(img, buf, 16, UINT64_MAX - 5), -EINVAL,
             "pread where offset + length overflows");
    CHECK_RC(cowdisk_pwrite(img, buf, 20, DISK_SIZE - 10), -EINVAL,
             "pwrite of 20 bytes 10 bytes before the end");
    CHECK_RC(cowdisk_pwrite(img, buf, 1, DISK_SIZE), -EINVAL, "pwrite of 1 byte at the end");
    CHECK_RC(cowdisk_pwrite(img, buf, 16, UINT64_MAX - 5), -EINVAL,
             "pwrite where offset + length overflows");
    CHECK_RC(cowdisk_pwrite(img, buf, 1, 1ull << 62), -EINVAL, "pwrite at offset 2^62");
    verify_range(img, DISK_SIZE - 1000, 1000, "the end of the disk is unchanged");

    CHECK_RC(cowdisk_flush(img), 0, "flush");
    CHECK_RC(cowdisk_close(img), 0, "close");
    tu_qemu_img_check(image);
    compare_with_model(image, DISK_SIZE);
}

static void test_read_only(const char *image) {
    SECTION("read-only handle");
    cowdisk_open_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.struct_size = sizeof opts;
    opts.flags = COWDISK_OPEN_READONLY;
    size_t before_len;
    unsigned char *before = tu_read_file(image, &before_len);

    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(image, &opts, &img), 0, "open read-only");
    check_default_info(img, image, 1);
    verify_disk(img, DISK_SIZE, "data written before close reads back after reopening");
    unsigned char buf[512];
    memset(buf, 0x11, sizeof buf);
    CHECK_RC(cowdisk_pwrite(img, buf, sizeof buf, 4096), -EROFS, "pwrite on a read-only handle");
    CHECK_RC(cowdisk_pwrite(img, buf, 100, CLUSTER - 50), -EROFS,
             "unaligned pwrite on a read-only handle");
    verify_disk(img, DISK_SIZE, "the failed writes changed nothing");
    CHECK_RC(cowdisk_close(img), 0, "close the read-only handle");
    check_file_unchanged(image, before, before_len, "a read-only open leaves the file as it was");
    free(before);
}

static void test_rewrite(const char *image) {
    SECTION("reopen read-write and overwrite");
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(image, NULL, &img), 0, "reopen read-write");
    write_range(img, 100, 3 * CLUSTER, 10, "overwrite 3 clusters' worth at offset 100");
    write_range(img, 12u << 20, 12345, 11, "write 12,345 bytes into a new area at 12 MiB");
    verify_disk(img, DISK_SIZE, "the whole disk matches after overwriting");
    CHECK_RC(cowdisk_close(img), 0, "close");
    tu_qemu_img_check(image);
    compare_with_model(image, DISK_SIZE);
}

/* Other formats: v2 with 512-byte clusters (many L2 tables), v3 with 4 KiB clusters,
 * 8-bit refcounts and lazy refcounts. */
static void test_options(void) {
    struct {
        const char *name;
        uint32_t version, cluster_size, refcount_bits, flags;
        const char *qemu_compat;
        uint64_t size;
    } cases[] = {
        {"v2-512.qcow2", 2, 512, 16, 0, "0.10", 4ull << 20},
        {"v3-4k-rc8-lazy.qcow2", 3, 4096, 8, COWDISK_CREATE_LAZY_REFCOUNTS, "1.1", 4ull << 20},
        {"v3-2m-rc1.qcow2", 3, 2u << 20, 1, 0, "1.1", 16ull << 20},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const uint64_t size = cases[i].size;
        char image[TU_PATH], heading[300], what[300];
        snprintf(heading, sizeof heading,
                 "create options: version %u, %u-byte clusters, %u-bit refcounts%s",
                 cases[i].version, cases[i].cluster_size, cases[i].refcount_bits,
                 cases[i].flags ? ", lazy refcounts" : "");
        SECTION(heading);
        tu_path(image, sizeof image, cases[i].name);
        cowdisk_create_opts opts;
        memset(&opts, 0, sizeof opts);
        opts.struct_size = sizeof opts;
        opts.version = cases[i].version;
        opts.cluster_size = cases[i].cluster_size;
        opts.refcount_bits = cases[i].refcount_bits;
        opts.flags = cases[i].flags;
        CHECK_RC(cowdisk_create(image, size, &opts), 0, "create");
        tu_qemu_img_check(image);

        memset(model, 0, (size_t)size);
        cowdisk *img = NULL;
        CHECK_RC(cowdisk_open(image, NULL, &img), 0, "open");
        cowdisk_info info;
        get_info(img, &info);
        CHECK(info.version == cases[i].version, "info.version matches");
        CHECK(info.cluster_size == cases[i].cluster_size, "info.cluster_size matches");
        CHECK(info.refcount_bits == cases[i].refcount_bits, "info.refcount_bits matches");
        CHECK(info.virtual_size == size, "info.virtual_size matches");
        CHECK(((info.flags & COWDISK_INFO_LAZY_REFCOUNTS) != 0) ==
                  ((cases[i].flags & COWDISK_CREATE_LAZY_REFCOUNTS) != 0),
              "info.flags LAZY_REFCOUNTS matches");
        uint64_t cs = cases[i].cluster_size;
        write_range(img, 1000, 3000, 20, "write 3000 bytes at 1000");
        write_range(img, cs * 3 - 7, (size_t)cs + 14, 21, "write a cluster + 14 bytes unaligned");
        write_range(img, 1u << 20, 300 * 1024 + 3, 22, "write 300 KiB + 3 bytes at 1 MiB");
        write_range(img, size - 513, 513, 23, "write the last 513 bytes");
        write_range(img, 1500, 100, 24, "overwrite 100 bytes inside the first write");
        verify_disk(img, size, "the whole disk reads back as written");
        CHECK_RC(cowdisk_close(img), 0, "close");
        tu_qemu_img_check(image);
        compare_with_model(image, size);

        char cmd[TU_CMD];
        snprintf(cmd, sizeof cmd,
                 "qemu-img info -f qcow2 '%s' | grep -q 'compat: %s'", image,
                 cases[i].qemu_compat);
        snprintf(what, sizeof what, "qemu-img info reports compat %s", cases[i].qemu_compat);
        CHECK(system(cmd) == 0, what);
        snprintf(cmd, sizeof cmd, "qemu-img info -f qcow2 '%s' | grep -q 'cluster_size: %u$'",
                 image, cases[i].cluster_size);
        CHECK(system(cmd) == 0, "qemu-img info reports the cluster size");
    }
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("basic");
    model = calloc(1, DISK_SIZE);
    if (model == NULL)
        FAIL("out of memory");
    char image[TU_PATH];
    tu_path(image, sizeof image, "basic.qcow2");

    test_diagnostics();
    test_null_arguments();
    test_create_errors(image);
    test_open_errors(image);
    test_locking(image);
    test_read_write(image);
    test_read_only(image);
    test_rewrite(image);
    test_options();

    free(model);
    tu_finish("basic");
    return 0;
}
