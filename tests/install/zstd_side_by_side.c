/* Built against an installed cowdisk (pkg-config) and the system libzstd in one program:
 * each library must keep its own zstd. cowdisk writes and reads back a zstd-compressed
 * image with its bundled zstd while the program compresses with the system one; each
 * reports its own version. With a libcowdisk.a that exported its zstd symbols, one of
 * the two would silently take the other's code.
 *
 * usage: zstd_side_by_side IMAGE   (exit 0 on success; the image is left for qemu-img check) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include <cowdisk.h>

#define CLUSTER 65536u
#define CLUSTERS 8u

static int fail(const char *what, int rc) {
    fprintf(stderr, "FAIL: %s: %d (%s)\n", what, rc, cowdisk_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE\n", argv[0]);
        return 2;
    }
    if (strcmp(cowdisk_version(), COWDISK_VERSION_STRING) != 0) {
        fprintf(stderr, "FAIL: library %s, header %s\n", cowdisk_version(), COWDISK_VERSION_STRING);
        return 1;
    }
    /* The system libzstd answers with its own version, the one its header names. */
    if (ZSTD_versionNumber() != ZSTD_VERSION_NUMBER) {
        fprintf(stderr, "FAIL: ZSTD_versionNumber() %u is not the system header's %u\n",
                ZSTD_versionNumber(), (unsigned)ZSTD_VERSION_NUMBER);
        return 1;
    }

    static unsigned char data[CLUSTERS * CLUSTER], back[CLUSTERS * CLUSTER];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (unsigned char)((i / 4096) * 7 + (i % 13 == 0));

    /* The system zstd round trip. */
    size_t bound = ZSTD_compressBound(sizeof data);
    unsigned char *z = malloc(bound);
    if (!z)
        return 1;
    size_t zn = ZSTD_compress(z, bound, data, sizeof data, 3);
    if (ZSTD_isError(zn) || ZSTD_decompress(back, sizeof back, z, zn) != sizeof data ||
        memcmp(back, data, sizeof data) != 0) {
        fprintf(stderr, "FAIL: system zstd round trip\n");
        return 1;
    }
    free(z);

    /* cowdisk's zstd: compressed clusters written and read back. */
    cowdisk_create_opts copts;
    memset(&copts, 0, sizeof copts);
    copts.struct_size = sizeof copts;
    copts.compression_type = COWDISK_COMPRESSION_ZSTD;
    int rc = cowdisk_create(argv[1], sizeof data, &copts);
    if (rc != 0)
        return fail("cowdisk_create", rc);
    cowdisk *img = NULL;
    if ((rc = cowdisk_open(argv[1], NULL, &img)) != 0)
        return fail("cowdisk_open", rc);
    if ((rc = cowdisk_pwrite_compressed(img, data, sizeof data, 0)) != 0)
        return fail("cowdisk_pwrite_compressed", rc);
    if ((rc = cowdisk_flush(img)) != 0)
        return fail("cowdisk_flush", rc);
    memset(back, 0, sizeof back);
    if ((rc = cowdisk_pread(img, back, sizeof back, 0)) != 0)
        return fail("cowdisk_pread", rc);
    if (memcmp(back, data, sizeof data) != 0) {
        fprintf(stderr, "FAIL: cowdisk read back other bytes than it wrote\n");
        return 1;
    }
    cowdisk_extent ext[4];
    size_t n = 0;
    if ((rc = cowdisk_block_status(img, 0, CLUSTER, ext, 4, &n)) != 0)
        return fail("cowdisk_block_status", rc);
    if (n < 1 || !(ext[0].flags & COWDISK_EXTENT_COMPRESSED)) {
        fprintf(stderr, "FAIL: the first cluster is not stored compressed\n");
        return 1;
    }
    if ((rc = cowdisk_close(img)) != 0)
        return fail("cowdisk_close", rc);
    printf("system zstd %s and cowdisk %s (with its own zstd) side by side: ok\n",
           ZSTD_versionString(), cowdisk_version());
    return 0;
}
