/*
 * C API test of compressed writes: cowdisk_pwrite_compressed with zlib and zstd, with
 * the compressed-write cache on and off (COWDISK_OPEN_NO_COMPRESSED_CACHE), its
 * alignment and "unallocated only" rules, a normal write into a compressed cluster,
 * and reads before and after flush. Every image is checked with `qemu-img check` and
 * compared with the expected contents through `qemu-img compare`.
 */
#include "testutil.h"

#define CLUSTER 65536ull
#define CLUSTERS 24ull
#define SIZE (CLUSTERS * CLUSTER + 4096) /* the last cluster is partial */

static unsigned char model[SIZE];

static void fill(void) {
    static const char text[] = "compressed clusters, packed back to back. ";
    for (size_t i = 0; i < SIZE; i++)
        model[i] = (unsigned char)text[i % (sizeof text - 1)];
    uint32_t x = 12345;
    for (size_t i = 5 * CLUSTER; i < 6 * CLUSTER; i++) { /* does not compress */
        x = x * 1103515245u + 12345u;
        model[i] = (unsigned char)(x >> 16);
    }
    memset(model + 9 * CLUSTER, 0, CLUSTER);
}

static void verify(cowdisk *img, const char *what) {
    unsigned char *buf = malloc(SIZE);
    if (buf == NULL)
        FAIL("out of memory");
    CHECK_RC(cowdisk_pread(img, buf, SIZE, 0), 0, what);
    long long d = tu_first_diff(buf, model, SIZE);
    if (d >= 0)
        FAIL("%s: byte %lld is 0x%02x, expected 0x%02x", what, d, buf[d], model[d]);
    free(buf);
}

static void run(uint32_t compression, uint32_t open_flags, const char *name) {
    char image[TU_PATH], raw[TU_PATH], what[256];
    SECTION(name);
    tu_path(image, sizeof image, name);
    cowdisk_create_opts copts;
    memset(&copts, 0, sizeof copts);
    copts.struct_size = sizeof copts;
    copts.compression_type = compression;
    CHECK_RC(cowdisk_create(image, SIZE, &copts), 0, "create");
    cowdisk_open_opts oopts;
    memset(&oopts, 0, sizeof oopts);
    oopts.struct_size = sizeof oopts;
    oopts.flags = open_flags;
    oopts.compressed_cache_size = 1 << 20;
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(image, &oopts, &img), 0, "open");

    CHECK_RC(cowdisk_pwrite_compressed(img, model, 12 * CLUSTER, 0), 0,
             "12 clusters in one call (compressed on all cores)");
    for (uint64_t off = 12 * CLUSTER; off < SIZE; off += CLUSTER) {
        size_t n = SIZE - off < CLUSTER ? (size_t)(SIZE - off) : (size_t)CLUSTER;
        snprintf(what, sizeof what, "one cluster at %llu", (unsigned long long)off);
        CHECK_RC(cowdisk_pwrite_compressed(img, model + off, n, off), 0, what);
    }
    verify(img, "reads before the flush");
    CHECK_RC(cowdisk_pwrite_compressed(img, model, CLUSTER, 512), -EINVAL, "misaligned offset");
    CHECK_RC(cowdisk_pwrite_compressed(img, model, 4096, 0), -EINVAL, "partial cluster");
    CHECK_RC(cowdisk_pwrite_compressed(img, model, CLUSTER, 0), -EINVAL,
             "over an allocated cluster");
    CHECK_RC(cowdisk_pwrite_compressed(img, NULL, CLUSTER, 0), -EINVAL, "NULL buffer");
    CHECK_RC(cowdisk_pwrite_compressed(NULL, model, CLUSTER, 0), -EINVAL, "NULL handle");
    CHECK_RC(cowdisk_flush(img), 0, "flush");
    memcpy(model + 3 * CLUSTER + 1000, "written into a compressed cluster", 33);
    CHECK_RC(cowdisk_pwrite(img, model + 3 * CLUSTER + 1000, 33, 3 * CLUSTER + 1000), 0,
             "normal write into a compressed cluster");
    verify(img, "reads after the flush");
    CHECK_RC(cowdisk_close(img), 0, "close");

    tu_qemu_img_check(image);
    tu_path(raw, sizeof raw, "expected.raw");
    tu_write_file(raw, model, SIZE);
    tu_qemu_img_compare(image, raw);
    unlink(raw);
    fill();
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("compressed");
    fill();
    run(0, 0, "zlib-cache.qcow2");
    run(1, 0, "zstd-cache.qcow2");
    run(0, COWDISK_OPEN_NO_COMPRESSED_CACHE, "zlib-nocache.qcow2");
    run(1, COWDISK_OPEN_NO_COMPRESSED_CACHE, "zstd-nocache.qcow2");
    tu_finish("compressed");
    return 0;
}
