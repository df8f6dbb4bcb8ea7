/*
 * C API test of check and repair and of the corrupt bit: a leak found and repaired;
 * a write that would land on a refcount block refused with -EIO, the image marked
 * corrupt and refused read-write; opened with COWDISK_OPEN_CHECK, repaired with
 * COWDISK_CHECK_REPAIR_ALL, after which qemu-img check calls it clean and it is
 * writable again.
 */
#include "testutil.h"

#include <unistd.h>

#define CLUSTER 65536ull

static void poke(const char *path, uint64_t offset, const void *bytes, size_t len) {
    FILE *f = fopen(path, "r+b");
    if (f == NULL || fseek(f, (long)offset, SEEK_SET) != 0 || fwrite(bytes, 1, len, f) != len)
        FAIL("cannot poke %s", path);
    fclose(f);
}

static void be64(unsigned char *out, uint64_t v) {
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(v >> (56 - 8 * i));
}

static cowdisk_check_result check(cowdisk *img, uint32_t flags, const char *what) {
    cowdisk_check_result r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    CHECK_RC(cowdisk_check(img, flags, &r), 0, what);
    return r;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("check");
    char image[TU_PATH];
    tu_path(image, sizeof image, "c.qcow2");
    cowdisk *img = NULL;
    unsigned char buf[4096];
    memset(buf, 0x5a, sizeof buf);

    SECTION("a leak, found and repaired");
    CHECK_RC(cowdisk_create(image, 64ull << 20, NULL), 0, "create");
    CHECK_RC(cowdisk_open(image, NULL, &img), 0, "open");
    CHECK_RC(cowdisk_pwrite(img, buf, sizeof buf, 0), 0, "write guest cluster 0");
    CHECK_RC(cowdisk_close(img), 0, "close");
    /* Layout: header, reftable, refblock, L1, L2 (cluster 4), data (cluster 5). A
     * refcount of 1 for cluster 6, which nothing references, is a leak. */
    unsigned char one[2] = {0, 1};
    if (truncate(image, 7 * CLUSTER) != 0)
        FAIL("cannot extend %s", image);
    poke(image, 2 * CLUSTER + 2 * 6, one, 2);
    CHECK_RC(cowdisk_open(image, NULL, &img), 0, "open again");
    cowdisk_check_result r = check(img, 0, "check");
    CHECK(r.leaks == 1 && r.corruptions == 0, "one leak, no corruption");
    CHECK(r.allocated_clusters == 1 && r.total_clusters == 1024, "allocation counts");
    r = check(img, COWDISK_CHECK_REPAIR_LEAKS, "check -r leaks");
    CHECK(r.leaks_fixed == 1 && r.leaks == 0, "the leak was repaired");
    r = check(img, 0, "check again");
    CHECK(r.leaks == 0 && r.corruptions == 0 && r.check_errors == 0, "clean now");
    CHECK_RC(cowdisk_check(img, 0x80, &r), -EINVAL, "unknown flags");
    CHECK_RC(cowdisk_close(img), 0, "close");
    tu_qemu_img_check(image);

    SECTION("an overlap refused, the corrupt bit, the repair");
    /* Guest cluster 1 mapped (COPIED) onto the refcount block at cluster 2. */
    unsigned char e[8];
    be64(e, (1ull << 63) | 2 * CLUSTER);
    poke(image, 4 * CLUSTER + 8, e, 8);
    CHECK_RC(cowdisk_open(image, NULL, &img), 0, "open the damaged image");
    CHECK_RC(cowdisk_pwrite(img, buf, sizeof buf, CLUSTER), -EIO,
             "a write onto the refcount block is refused");
    CHECK(strstr(cowdisk_last_error(), "overlaps with refcount block") != NULL,
          "the message names what would have been overwritten");
    CHECK_RC(cowdisk_pwrite(img, buf, sizeof buf, 0), -EIO, "later writes are refused too");
    unsigned char back[4096];
    CHECK_RC(cowdisk_pread(img, back, sizeof back, 0), 0, "reads keep working");
    CHECK(memcmp(back, buf, sizeof buf) == 0, "and read the data");
    cowdisk_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_RC(cowdisk_get_info(img, &info), 0, "info");
    CHECK(info.flags & COWDISK_INFO_CORRUPT, "the image is marked corrupt");
    CHECK_RC(cowdisk_close(img), 0, "close");
    cowdisk *again = NULL;
    CHECK_RC(cowdisk_open(image, NULL, &again), -EIO, "a corrupt image does not open read-write");
    cowdisk_open_opts o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.flags = COWDISK_OPEN_CHECK;
    CHECK_RC(cowdisk_open(image, &o, &img), 0, "it opens for checking");
    CHECK_RC(cowdisk_pwrite(img, buf, sizeof buf, 0), -EIO, "but refuses writes");
    r = check(img, 0, "check the damaged image");
    CHECK(r.corruptions > 0, "corruptions are found");
    r = check(img, COWDISK_CHECK_REPAIR_ALL, "check -r all");
    CHECK(r.corruptions_fixed > 0, "corruptions were repaired");
    r = check(img, 0, "check after the repair");
    CHECK(r.corruptions == 0 && r.leaks == 0, "clean after the repair");
    CHECK_RC(cowdisk_pwrite(img, buf, sizeof buf, 0), 0, "writable again");
    SECTION("amend");
    cowdisk_amend_opts a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.refcount_bits = 8;
    CHECK_RC(cowdisk_amend(img, &a), 0, "amend to 8-bit refcounts");
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_RC(cowdisk_get_info(img, &info), 0, "info");
    CHECK(info.refcount_bits == 8, "8-bit refcounts now");
    a.refcount_bits = 0;
    a.version = 2;
    CHECK_RC(cowdisk_amend(img, &a), -EINVAL, "compat 0.10 needs 16-bit refcounts");
    a.refcount_bits = 16;
    CHECK_RC(cowdisk_amend(img, &a), 0, "compat 0.10 with 16-bit refcounts");
    CHECK_RC(cowdisk_get_info(img, &info), 0, "info");
    CHECK(info.version == 2 && info.refcount_bits == 16, "a version 2 image now");
    CHECK_RC(cowdisk_pread(img, back, sizeof back, 0), 0, "read after amend");
    CHECK(memcmp(back, buf, sizeof buf) == 0, "the data is unchanged");
    CHECK_RC(cowdisk_close(img), 0, "close");
    tu_qemu_img_check(image);
    tu_finish("check");
    return 0;
}
