/*
 * C API test of encrypted images: cowdisk_create_opts with encrypt_format, secret and
 * the LUKS cipher strings; cowdisk_open_opts with a secret (and without: -ENOKEY;
 * wrong: -EKEYREJECTED; metadata only); cowdisk_info.encrypt_format; QEMU reads what
 * was written (`qemu-img compare` with the secret) and finds it check-clean.
 */
#include "testutil.h"

#define SIZE (2ull << 20)

static const char PASS[] = "c binding passphrase";

static void qemu_compare_encrypted(const char *image, const char *raw) {
    char cmd[TU_CMD];
    snprintf(cmd, sizeof cmd,
             "qemu-img compare -q --object secret,id=s0,data='%s' --image-opts "
             "driver=qcow2,file.filename='%s',encrypt.key-secret=s0 "
             "driver=raw,file.filename='%s' && "
             "qemu-img check -q --object secret,id=s0,data='%s' --image-opts "
             "driver=qcow2,file.filename='%s',encrypt.key-secret=s0",
             PASS, image, raw, PASS, image);
    tu_checks++;
    if (system(cmd) != 0)
        FAIL("QEMU does not read %s as %s, or finds it unclean", image, raw);
    printf("ok   QEMU reads %s as written and finds it clean\n", image);
}

static void roundtrip(const char *name, uint32_t format, const char *cipher,
                      const char *mode, const char *ivgen) {
    char image[TU_PATH], raw[TU_PATH], rawname[128], what[256];
    tu_path(image, sizeof image, name);
    snprintf(rawname, sizeof rawname, "%s.raw", name);
    tu_path(raw, sizeof raw, rawname);
    struct cowdisk_create_opts co = {0};
    co.struct_size = sizeof co;
    co.encrypt_format = format;
    co.secret = PASS;
    co.secret_len = strlen(PASS);
    co.iter_time_ms = 10;
    co.cipher_alg = cipher;
    co.cipher_mode = mode;
    co.ivgen_alg = ivgen;
    snprintf(what, sizeof what, "create %s", name);
    CHECK_RC(cowdisk_create(image, SIZE, &co), 0, what);

    struct cowdisk_open_opts oo = {0};
    oo.struct_size = sizeof oo;
    oo.secret = PASS;
    oo.secret_len = strlen(PASS);
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(image, &oo, &img), 0, "open with the passphrase");
    struct cowdisk_info info = {0};
    info.struct_size = sizeof info;
    CHECK_RC(cowdisk_get_info(img, &info), 0, "get_info");
    CHECK(info.encrypt_format == format, "info.encrypt_format names the encryption");

    unsigned char *model = calloc(1, SIZE);
    unsigned char *buf = malloc(SIZE);
    if (model == NULL || buf == NULL)
        FAIL("out of memory");
    /* Unaligned pieces: the library reads and rewrites whole sectors. */
    const uint64_t offs[] = {0, 511, 4097, 65535, 1000000, SIZE - 700};
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        size_t n = 700 + 333 * i;
        if (offs[i] + n > SIZE)
            n = (size_t)(SIZE - offs[i]);
        for (size_t j = 0; j < n; j++)
            buf[j] = (unsigned char)(i * 37 + j * 11 + 1);
        CHECK_RC(cowdisk_pwrite(img, buf, n, offs[i]), 0, "unaligned write");
        memcpy(model + offs[i], buf, n);
    }
    CHECK_RC(cowdisk_pread(img, buf, SIZE, 0), 0, "read back");
    CHECK(memcmp(buf, model, SIZE) == 0, "reads what was written");
    unsigned char cluster[65536] = {0};
    CHECK_RC(cowdisk_pwrite_compressed(img, cluster, sizeof cluster, SIZE - 65536),
             -ENOTSUP, "compressed writes into an encrypted image are refused");
    CHECK_RC(cowdisk_close(img), 0, "close");
    tu_write_file(raw, model, SIZE);
    qemu_compare_encrypted(image, raw);

    /* No secret, a wrong one, metadata only. */
    img = NULL;
    CHECK_RC(cowdisk_open(image, NULL, &img), -ENOKEY, "open without a passphrase");
    CHECK(strstr(cowdisk_last_error(), "passphrase") != NULL, "the message says why");
    if (format == COWDISK_ENCRYPT_LUKS) {
        /* Legacy AES has nothing to check a passphrase against (QEMU's neither). */
        oo.secret = "not the passphrase";
        oo.secret_len = strlen(oo.secret);
        CHECK_RC(cowdisk_open(image, &oo, &img), -EKEYREJECTED,
                 "open with a wrong passphrase");
        CHECK(strstr(cowdisk_last_error(), "not the passphrase") == NULL,
              "the message does not show the passphrase");
    }
    oo.secret = NULL;
    oo.secret_len = 0;
    oo.flags = COWDISK_OPEN_READONLY | COWDISK_OPEN_METADATA_ONLY;
    CHECK_RC(cowdisk_open(image, &oo, &img), 0, "metadata-only open without a passphrase");
    CHECK_RC(cowdisk_get_info(img, &info), 0, "get_info without the key");
    CHECK(info.encrypt_format == format, "info still names the encryption");
    CHECK_RC(cowdisk_pread(img, buf, 512, 0), -ENOKEY, "data reads need the key");
    CHECK_RC(cowdisk_close(img), 0, "close");
    free(model);
    free(buf);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("encryption");
    SECTION("LUKS, QEMU's default cipher");
    roundtrip("luks.qcow2", COWDISK_ENCRYPT_LUKS, NULL, NULL, NULL);
    SECTION("LUKS, aes-128-cbc-essiv");
    roundtrip("luks-cbc.qcow2", COWDISK_ENCRYPT_LUKS, "aes-128", "cbc", "essiv");
    SECTION("legacy AES");
    roundtrip("aes.qcow2", COWDISK_ENCRYPT_AES, NULL, NULL, NULL);

    SECTION("bad options");
    char image[TU_PATH];
    tu_path(image, sizeof image, "bad.qcow2");
    struct cowdisk_create_opts co = {0};
    co.struct_size = sizeof co;
    co.encrypt_format = COWDISK_ENCRYPT_LUKS;
    CHECK_RC(cowdisk_create(image, SIZE, &co), -ENOKEY, "LUKS without a passphrase");
    co.secret = PASS;
    co.secret_len = strlen(PASS);
    co.cipher_alg = "twofish-256";
    CHECK_RC(cowdisk_create(image, SIZE, &co), -ENOTSUP, "a cipher other than AES");
    CHECK(strstr(cowdisk_last_error(), "twofish-256") != NULL, "the message names it");
    co.cipher_alg = NULL;
    co.encrypt_format = 7;
    CHECK_RC(cowdisk_create(image, SIZE, &co), -EINVAL, "an unknown encrypt_format");
    co.encrypt_format = COWDISK_ENCRYPT_LUKS;
    co.secret = NULL;
    co.secret_len = 5;
    CHECK_RC(cowdisk_create(image, SIZE, &co), -EINVAL, "a NULL secret with a length");
    tu_finish("encryption");
    return 0;
}
