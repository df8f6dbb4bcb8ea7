package cowdisk

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

var noteLibraryOnce sync.Once

// noteLibrary stats the linked library files, so that `go test`'s result cache,
// which tracks the files tests stat, notices a rebuilt libcowdisk (the build cache
// only hashes the linker flags, not the library they name). Files are only
// tracked while tests run, so the helpers call this, not TestMain.
func noteLibrary() {
	noteLibraryOnce.Do(func() {
		for _, name := range []string{"libcowdisk.a", "libcowdisk.so"} {
			os.Stat(filepath.Join("..", "..", "target", "release", name))
		}
	})
}

// pattern returns n pseudo-random bytes determined by seed.
func pattern(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// mustCreate creates an image in a fresh temporary directory and returns its path.
func mustCreate(t testing.TB, name string, size uint64, opts *CreateOptions) string {
	t.Helper()
	noteLibrary()
	path := filepath.Join(t.TempDir(), name)
	if err := Create(path, size, opts); err != nil {
		t.Fatalf("Create(%q, %d, %+v): %v", path, size, opts, err)
	}
	return path
}

// mustOpen opens an image and closes it at the end of the test if the test did not.
func mustOpen(t testing.TB, path string, opts *OpenOptions) *Image {
	t.Helper()
	noteLibrary()
	img, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open(%q, %+v): %v", path, opts, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// mustClose closes img and fails the test on error.
func mustClose(t testing.TB, img *Image) {
	t.Helper()
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// mustWrite writes p at off, into the image and into the model.
func mustWrite(t testing.TB, img *Image, model []byte, p []byte, off int64) {
	t.Helper()
	n, err := img.WriteAt(p, off)
	if err != nil || n != len(p) {
		t.Fatalf("WriteAt(len %d, off %d) = %d, %v", len(p), off, n, err)
	}
	if model != nil {
		copy(model[off:], p)
	}
}

// mustRead reads n bytes at off and fails the test unless they equal want.
func mustReadEqual(t testing.TB, img *Image, want []byte, off int64) {
	t.Helper()
	got := make([]byte, len(want))
	n, err := img.ReadAt(got, off)
	if err != nil || n != len(want) {
		t.Fatalf("ReadAt(len %d, off %d) = %d, %v", len(want), off, n, err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("ReadAt(len %d, off %d): byte %d (guest offset %d) is %#02x, want %#02x",
			len(want), off, i, off+int64(i), got[i], want[i])
	}
}

// firstDiff returns the index of the first differing byte, or -1.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if i >= len(b) || a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// wantErrno fails the test unless err is an *Error wrapping errno, with a message.
func wantErrno(t testing.TB, err error, op string, errno syscall.Errno) *Error {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: got no error, want %v", op, errno)
	}
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("%s: error %v (%T) is not a *cowdisk.Error", op, err, err)
	}
	if !errors.Is(err, errno) {
		t.Fatalf("%s: got errno %d (%v), want %d (%v); error: %v", op, int(ce.Errno), ce.Errno, int(errno), errno, err)
	}
	if ce.Op != op {
		t.Errorf("Error.Op = %q, want %q (error: %v)", ce.Op, op, err)
	}
	if strings.TrimSpace(ce.Msg) == "" {
		t.Errorf("Error.Msg is empty (error: %v)", err)
	}
	t.Logf("expected error: %v", err)
	return ce
}

// requireQemu skips the test when qemu-img is not installed.
func requireQemu(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
}

// qemuImg runs qemu-img and returns its combined output and exit code.
func qemuImg(t testing.TB, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	default:
		t.Fatalf("qemu-img %v: %v", args, err)
		return "", -1
	}
}

// checkClean fails the test unless `qemu-img check` finds no errors and no leaks.
func checkClean(t testing.TB, path string) {
	t.Helper()
	requireQemu(t)
	out, code := qemuImg(t, "check", "-f", "qcow2", path)
	if code != 0 || !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check %s: exit %d:\n%s", path, code, out)
	}
}

// compareRaw fails the test unless the qcow2 image's guest contents equal data,
// as judged by `qemu-img compare` against a raw file holding data.
func compareRaw(t testing.TB, path string, data []byte, extra ...string) {
	t.Helper()
	requireQemu(t)
	raw := filepath.Join(t.TempDir(), "expected.raw")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"compare"}, extra...)
	args = append(args, "-f", "qcow2", "-F", "raw", path, raw)
	out, code := qemuImg(t, args...)
	if code != 0 || !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img %s: exit %d:\n%s", strings.Join(args, " "), code, out)
	}
}

// qemuInfo is the part of `qemu-img info --output=json` the tests look at.
type qemuInfo struct {
	VirtualSize           uint64 `json:"virtual-size"`
	ClusterSize           uint32 `json:"cluster-size"`
	BackingFilename       string `json:"backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
	FormatSpecific        struct {
		Data struct {
			Compat          string `json:"compat"`
			LazyRefcounts   bool   `json:"lazy-refcounts"`
			RefcountBits    uint32 `json:"refcount-bits"`
			CompressionType string `json:"compression-type"`
			Corrupt         bool   `json:"corrupt"`
		} `json:"data"`
	} `json:"format-specific"`
}

// getQemuInfo runs `qemu-img info` on a qcow2 image.
func getQemuInfo(t testing.TB, path string) qemuInfo {
	t.Helper()
	requireQemu(t)
	out, code := qemuImg(t, "info", "-U", "--output=json", "-f", "qcow2", path)
	if code != 0 {
		t.Fatalf("qemu-img info %s: exit %d:\n%s", path, code, out)
	}
	var qi qemuInfo
	if err := json.Unmarshal([]byte(out), &qi); err != nil {
		t.Fatalf("qemu-img info output: %v\n%s", err, out)
	}
	return qi
}

// fmtOpts renders create options for subtest names.
func fmtOpts(o *CreateOptions) string {
	if o == nil {
		return "defaults"
	}
	return fmt.Sprintf("v%d-cs%d-rb%d-lazy%v", o.Version, o.ClusterSize, o.RefcountBits, o.LazyRefcounts)
}
