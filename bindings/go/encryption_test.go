package cowdisk

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const testPass = "go binding passphrase"

// qemuEncArgs names an encrypted qcow2 image for qemu-img, with the passphrase.
func qemuEncArgs(path string) []string {
	return []string{"--object", "secret,id=s0,data=" + testPass, "--image-opts",
		"driver=qcow2,file.filename=" + path + ",encrypt.key-secret=s0"}
}

func TestEncryptedCreateWriteQemuReads(t *testing.T) {
	requireQemu(t)
	for _, tc := range []struct {
		name string
		opts CreateOptions
	}{
		{"luks", CreateOptions{EncryptFormat: "luks"}},
		{"luks-aes128-cbc-essiv", CreateOptions{EncryptFormat: "luks", CipherAlg: "aes-128",
			CipherMode: "cbc", IvgenAlg: "essiv", HashAlg: "sha512"}},
		{"aes", CreateOptions{EncryptFormat: "aes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			opts.Secret = []byte(testPass)
			opts.IterTime = 10 * time.Millisecond
			path := mustCreate(t, "enc.qcow2", 2<<20, &opts)
			img := mustOpen(t, path, &OpenOptions{Secret: []byte(testPass)})
			info, err := img.Info()
			if err != nil {
				t.Fatal(err)
			}
			if info.EncryptFormat != tc.opts.EncryptFormat {
				t.Fatalf("EncryptFormat = %q, want %q", info.EncryptFormat, tc.opts.EncryptFormat)
			}
			model := make([]byte, 2<<20)
			mustWrite(t, img, model, pattern(1, 70000), 1000)
			mustWrite(t, img, model, pattern(2, 5), 1<<20+3)
			mustReadEqual(t, img, model, 0)
			mustClose(t, img)
			raw := filepath.Join(t.TempDir(), "m.raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			args := append([]string{"compare"}, qemuEncArgs(path)...)
			args = append(args, "driver=raw,file.filename="+raw)
			if out, code := qemuImg(t, args...); code != 0 {
				t.Fatalf("qemu-img compare: %d\n%s", code, out)
			}
			args = append([]string{"check"}, qemuEncArgs(path)...)
			if out, code := qemuImg(t, args...); code != 0 || !strings.Contains(out, "No errors") {
				t.Fatalf("qemu-img check: %d\n%s", code, out)
			}
		})
	}
}

func TestEncryptedKeys(t *testing.T) {
	_, err := Open(mustCreate(t, "x.qcow2", 1<<20, &CreateOptions{EncryptFormat: "luks",
		Secret: []byte(testPass), IterTime: 10 * time.Millisecond}), nil)
	wantErrno(t, err, "open", syscall.ENOKEY)
	path := mustCreate(t, "k.qcow2", 1<<20, &CreateOptions{EncryptFormat: "luks",
		Secret: []byte(testPass), IterTime: 10 * time.Millisecond})
	_, err = Open(path, &OpenOptions{Secret: []byte("wrong")})
	ce := wantErrno(t, err, "open", syscall.EKEYREJECTED)
	if strings.Contains(ce.Msg, "wrong") {
		t.Fatalf("the passphrase appears in the error: %v", err)
	}
	img := mustOpen(t, path, &OpenOptions{ReadOnly: true, MetadataOnly: true})
	if info, _ := img.Info(); info.EncryptFormat != "luks" {
		t.Fatalf("EncryptFormat = %q", info.EncryptFormat)
	}
	_, err = img.ReadAt(make([]byte, 512), 0)
	wantErrno(t, err, "read", syscall.ENOKEY)
	err = Create(filepath.Join(t.TempDir(), "nokey.qcow2"), 1<<20, &CreateOptions{EncryptFormat: "luks"})
	wantErrno(t, err, "create", syscall.ENOKEY)
}

func TestConvertEncrypted(t *testing.T) {
	plain := mustCreate(t, "plain.qcow2", 1<<20, nil)
	img := mustOpen(t, plain, nil)
	model := make([]byte, 1<<20)
	mustWrite(t, img, model, pattern(3, 100000), 4096)
	mustClose(t, img)
	enc := filepath.Join(t.TempDir(), "enc.qcow2")
	err := Convert(context.Background(), plain, enc, &ConvertOptions{Create: &CreateOptions{
		EncryptFormat: "luks", Secret: []byte(testPass), IterTime: 10 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	back := filepath.Join(t.TempDir(), "back.raw")
	if err := Convert(context.Background(), enc, back, &ConvertOptions{TargetFormat: "raw",
		Secret: []byte(testPass)}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(model) {
		t.Fatalf("the round trip through an encrypted image changed the data (first difference at %d)", firstDiff(got, model))
	}
}
