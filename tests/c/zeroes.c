/*
 * C API test of the calls beyond plain I/O: write_zeroes (with and without
 * MAY_UNMAP, aligned and not), discard, block_status, resize, and the same over a
 * backing file. Every image is checked with `qemu-img check` and compared with the
 * expected contents through `qemu-img compare`.
 */
#include "testutil.h"

#define MIB (1ull << 20)
#define CLUSTER 65536ull
#define MAX_SIZE (16 * MIB)

static unsigned char *model; /* expected guest contents */
static uint64_t model_size;

static void fill_pattern(unsigned char *buf, size_t len, uint64_t offset, unsigned seed) {
    for (size_t i = 0; i < len; i++) {
        uint64_t x = offset + i;
        buf[i] = (unsigned char)(x * 13u + (x >> 9) * 5u + seed * 71u + 1u);
        if (buf[i] == 0)
            buf[i] = 1; /* data never looks like zeros */
    }
}

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

static void verify_disk(cowdisk *img, const char *what) {
    const size_t chunk = MIB + 511;
    unsigned char *buf = malloc(chunk);
    if (buf == NULL)
        FAIL("out of memory");
    for (uint64_t off = 0; off < model_size; off += chunk) {
        size_t n = model_size - off < chunk ? (size_t)(model_size - off) : chunk;
        int rc = cowdisk_pread(img, buf, n, off);
        if (rc != 0)
            FAIL("%s: pread(%zu at %llu) returned %d: %s", what, n, (unsigned long long)off,
                 rc, cowdisk_last_error());
        long long d = tu_first_diff(buf, model + off, n);
        if (d >= 0)
            FAIL("%s: byte at guest offset %llu is 0x%02x, expected 0x%02x", what,
                 (unsigned long long)(off + (uint64_t)d), buf[d], model[off + (uint64_t)d]);
    }
    free(buf);
    tu_checks++;
    printf("ok   %s\n", what);
}

static void check_with_qemu(const char *image) {
    char raw[TU_PATH];
    tu_qemu_img_check(image);
    tu_path(raw, sizeof raw, "expected.raw");
    tu_write_file(raw, model, (size_t)model_size);
    tu_qemu_img_compare(image, raw);
    unlink(raw);
}

static int all_zero(const unsigned char *p, uint64_t len) {
    for (uint64_t i = 0; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Walks block_status over the whole disk: the extents must be contiguous, cover the
 * disk, and no extent flagged ZERO may hold non-zero data. Returns the number of
 * bytes flagged ZERO in [zero_start, zero_end). */
static uint64_t walk_block_status(cowdisk *img, uint64_t zero_start, uint64_t zero_end,
                                  const char *what) {
    cowdisk_extent ext[16];
    uint64_t pos = 0, zero_bytes = 0;
    while (pos < model_size) {
        size_t count = 0;
        int rc = cowdisk_block_status(img, pos, model_size - pos, ext, 16, &count);
        if (rc != 0)
            FAIL("%s: block_status at %llu returned %d: %s", what, (unsigned long long)pos,
                 rc, cowdisk_last_error());
        if (count == 0 || count > 16)
            FAIL("%s: block_status at %llu gave %zu extents", what, (unsigned long long)pos,
                 count);
        for (size_t i = 0; i < count; i++) {
            if (ext[i].start != pos || ext[i].length == 0 ||
                ext[i].start + ext[i].length > model_size)
                FAIL("%s: extent %zu is [%llu, +%llu), expected to start at %llu within "
                     "the disk",
                     what, i, (unsigned long long)ext[i].start,
                     (unsigned long long)ext[i].length, (unsigned long long)pos);
            if ((ext[i].flags & COWDISK_EXTENT_ZERO) &&
                !all_zero(model + ext[i].start, ext[i].length))
                FAIL("%s: extent [%llu, +%llu) is flagged ZERO but holds data", what,
                     (unsigned long long)ext[i].start, (unsigned long long)ext[i].length);
            if (ext[i].flags & COWDISK_EXTENT_ZERO) {
                uint64_t a = ext[i].start > zero_start ? ext[i].start : zero_start;
                uint64_t e = ext[i].start + ext[i].length;
                uint64_t b = e < zero_end ? e : zero_end;
                if (b > a)
                    zero_bytes += b - a;
            }
            pos += ext[i].length;
        }
    }
    tu_checks++;
    printf("ok   %s\n", what);
    return zero_bytes;
}

static void test_zeroes_and_discard(const char *image) {
    SECTION("write_zeroes and discard");
    model_size = 8 * MIB;
    memset(model, 0, MAX_SIZE);
    CHECK_RC(cowdisk_create(image, model_size, NULL), 0, "create an 8 MiB image");
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(image, NULL, &img), 0, "open read-write");
    write_range(img, 0, 6 * MIB, 1, "fill the first 6 MiB with data");

    CHECK_RC(cowdisk_write_zeroes(img, 100000, 300000, 0), 0,
             "write_zeroes of 300,000 bytes at 100,000 (unaligned)");
    memset(model + 100000, 0, 300000);
    CHECK_RC(cowdisk_write_zeroes(img, MIB, MIB, COWDISK_ZEROES_MAY_UNMAP), 0,
             "write_zeroes of 1 MiB at 1 MiB with MAY_UNMAP");
    memset(model + MIB, 0, MIB);
    CHECK_RC(cowdisk_write_zeroes(img, 7 * MIB - 10, 20, 0), 0,
             "write_zeroes of 20 bytes over unallocated space");
    memset(model + 7 * MIB - 10, 0, 20);
    CHECK_RC(cowdisk_write_zeroes(img, 3 * MIB + 1, 0, 0), 0, "write_zeroes of 0 bytes");
    verify_disk(img, "zeroed ranges read as zeros, everything else is unchanged");

    CHECK_RC(cowdisk_discard(img, 2 * MIB + 1000, MIB), 0,
             "discard 1 MiB at 2 MiB + 1000 (whole clusters inside are released)");
    memset(model + 2 * MIB + CLUSTER, 0, MIB - CLUSTER);
    verify_disk(img, "discarded clusters read as zeros, the partial edges are unchanged");

    uint64_t z = walk_block_status(img, MIB, 2 * MIB,
                                   "block_status extents are contiguous and never call data "
                                   "zero");
    CHECK(z == MIB, "block_status reports the MAY_UNMAP range [1 MiB, 2 MiB) as zero");

    SECTION("argument errors");
    cowdisk_extent ext[4];
    size_t count = 0;
    CHECK_RC(cowdisk_write_zeroes(img, model_size - 10, 20, 0), -EINVAL,
             "write_zeroes past the end");
    CHECK_RC(cowdisk_write_zeroes(img, 0, 512, 0x80), -EINVAL, "write_zeroes with unknown flags");
    CHECK_RC(cowdisk_write_zeroes(NULL, 0, 512, 0), -EINVAL, "write_zeroes on a NULL handle");
    CHECK_RC(cowdisk_discard(img, model_size, 1), -EINVAL, "discard past the end");
    CHECK_RC(cowdisk_discard(NULL, 0, 512), -EINVAL, "discard on a NULL handle");
    CHECK_RC(cowdisk_block_status(img, 0, 512, NULL, 4, &count), -EINVAL,
             "block_status with NULL extents");
    CHECK_RC(cowdisk_block_status(img, 0, 512, ext, 0, &count), -EINVAL,
             "block_status with max_extents 0");
    CHECK_RC(cowdisk_block_status(img, 0, 512, ext, 4, NULL), -EINVAL,
             "block_status with a NULL count");
    CHECK_RC(cowdisk_block_status(img, model_size + 512, 512, ext, 4, &count), -EINVAL,
             "block_status past the end");
    CHECK_RC(cowdisk_block_status(img, model_size, 512, ext, 4, &count), 0,
             "block_status at exactly the end");
    CHECK(count == 0, "block_status at the end gives 0 extents");
    verify_disk(img, "failed calls changed nothing");

    CHECK_RC(cowdisk_close(img), 0, "close");
    check_with_qemu(image);

    SECTION("read-only handle");
    cowdisk_open_opts ro;
    memset(&ro, 0, sizeof ro);
    ro.struct_size = sizeof ro;
    ro.flags = COWDISK_OPEN_READONLY;
    CHECK_RC(cowdisk_open(image, &ro, &img), 0, "open read-only");
    CHECK_RC(cowdisk_write_zeroes(img, 0, 4096, 0), -EROFS, "write_zeroes on a read-only handle");
    CHECK_RC(cowdisk_discard(img, 0, CLUSTER), -EROFS, "discard on a read-only handle");
    CHECK_RC(cowdisk_resize(img, 16 * MIB), -EROFS, "resize on a read-only handle");
    verify_disk(img, "the data is unchanged");
    CHECK_RC(cowdisk_close(img), 0, "close");
}

static void test_resize(const char *image) {
    SECTION("resize");
    cowdisk *img = NULL;
    cowdisk_info info;
    CHECK_RC(cowdisk_open(image, NULL, &img), 0, "open read-write");
    CHECK_RC(cowdisk_resize(img, 12 * MIB), 0, "grow from 8 MiB to 12 MiB");
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_RC(cowdisk_get_info(img, &info), 0, "get_info");
    CHECK(info.virtual_size == 12 * MIB, "info.virtual_size is 12 MiB");
    model_size = 12 * MIB;
    verify_disk(img, "the new 4 MiB read as zeros");
    write_range(img, 11 * MIB + 3, 5000, 2, "write 5000 bytes at 11 MiB + 3");
    CHECK_RC(cowdisk_resize(img, 12 * MIB + 100), -EINVAL, "resize to a size not a multiple of 512");
    CHECK_RC(cowdisk_resize(img, 10 * MIB), -EINVAL,
             "shrink to 10 MiB over allocated data without FORCE");
    CHECK(cowdisk_get_info(img, &info) == 0 && info.virtual_size == 12 * MIB,
          "the failed shrink kept the size");
    CHECK_RC(cowdisk_resize_ex(img, 10 * MIB, COWDISK_RESIZE_FORCE), 0,
             "shrink to 10 MiB with FORCE");
    model_size = 10 * MIB;
    CHECK(cowdisk_get_info(img, &info) == 0 && info.virtual_size == 10 * MIB,
          "info.virtual_size is 10 MiB");
    CHECK_RC(cowdisk_resize(img, 11 * MIB + 512), 0, "grow again to 11 MiB + 512");
    memset(model + 10 * MIB, 0, MIB + 512);
    model_size = 11 * MIB + 512;
    verify_disk(img, "data cut off by the shrink does not come back when growing");
    CHECK_RC(cowdisk_close(img), 0, "close");
    check_with_qemu(image);
}

static void test_backing(void) {
    SECTION("over a backing file");
    char base[TU_PATH], overlay[TU_PATH];
    tu_path(base, sizeof base, "base.qcow2");
    tu_path(overlay, sizeof overlay, "overlay.qcow2");
    model_size = 4 * MIB;
    memset(model, 0, MAX_SIZE);

    cowdisk *img = NULL;
    CHECK_RC(cowdisk_create(base, model_size, NULL), 0, "create a 4 MiB base image");
    CHECK_RC(cowdisk_open(base, NULL, &img), 0, "open the base");
    write_range(img, 0, (size_t)model_size, 3, "fill the base with data");
    CHECK_RC(cowdisk_close(img), 0, "close the base");

    cowdisk_create_opts c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    c.backing_file = "base.qcow2"; /* relative to the overlay's directory */
    c.backing_format = "qcow2";
    CHECK_RC(cowdisk_create(overlay, 0, &c), 0, "create an overlay (size 0 = the base's)");
    CHECK_RC(cowdisk_open(overlay, NULL, &img), 0, "open the overlay");
    cowdisk_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_RC(cowdisk_get_info(img, &info), 0, "get_info");
    CHECK(info.virtual_size == model_size, "the overlay has the base's size");
    CHECK(info.backing_depth == 1, "info.backing_depth is 1");
    CHECK(strcmp(info.backing_file, "base.qcow2") == 0, "info.backing_file is base.qcow2");
    CHECK(strcmp(info.backing_format, "qcow2") == 0, "info.backing_format is qcow2");
    verify_disk(img, "the overlay reads the base's data");

    write_range(img, 100, 1000, 4, "write 1000 bytes at 100 (copy-on-write from the base)");
    CHECK_RC(cowdisk_write_zeroes(img, MIB - 7, MIB + 14, 0), 0,
             "write_zeroes of 1 MiB + 14 at 1 MiB - 7");
    memset(model + MIB - 7, 0, MIB + 14);
    CHECK_RC(cowdisk_discard(img, 3 * MIB, CLUSTER * 2), 0, "discard 2 clusters at 3 MiB");
    memset(model + 3 * MIB, 0, CLUSTER * 2);
    verify_disk(img, "zeroed and discarded ranges read as zeros, not as the base");

    cowdisk_extent ext[1];
    size_t count = 0;
    CHECK_RC(cowdisk_block_status(img, 2 * MIB + MIB / 2 + 5, 100, ext, 1, &count), 0,
             "block_status of an area only the base has");
    printf("     extent: start %llu length %llu flags 0x%x depth %u\n",
           (unsigned long long)ext[0].start, (unsigned long long)ext[0].length, ext[0].flags,
           ext[0].depth);
    CHECK(count == 1 && ext[0].depth == 1 && (ext[0].flags & COWDISK_EXTENT_DATA),
          "the extent is data from layer 1 (the base)");
    CHECK_RC(cowdisk_close(img), 0, "close the overlay");
    check_with_qemu(overlay);

    cowdisk_open_opts nb;
    memset(&nb, 0, sizeof nb);
    nb.struct_size = sizeof nb;
    nb.flags = COWDISK_OPEN_NO_BACKING | COWDISK_OPEN_READONLY;
    CHECK_RC(cowdisk_open(overlay, &nb, &img), 0, "open the overlay with NO_BACKING");
    unsigned char b[16];
    CHECK_RC(cowdisk_pread(img, b, sizeof b, 2 * MIB + MIB / 2), -ENOTSUP,
             "reading an area only the base has, without the base");
    CHECK_RC(cowdisk_close(img), 0, "close");
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("zeroes");
    model = calloc(1, MAX_SIZE);
    if (model == NULL)
        FAIL("out of memory");
    char image[TU_PATH];
    tu_path(image, sizeof image, "zeroes.qcow2");
    test_zeroes_and_discard(image);
    test_resize(image);
    test_backing();
    free(model);
    tu_finish("zeroes");
    return 0;
}
