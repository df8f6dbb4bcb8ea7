package cowdisk

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
)

// kib and mib are declared in zeroes_test.go.

func mustBitmaps(t *testing.T, img *Image) map[string]BitmapInfo {
	t.Helper()
	list, err := img.Bitmaps()
	if err != nil {
		t.Fatalf("Bitmaps: %v", err)
	}
	m := make(map[string]BitmapInfo, len(list))
	for _, b := range list {
		m[b.Name] = b
	}
	return m
}

func wantExtents(t *testing.T, img *Image, name string, off, n int64, want []DirtyExtent) {
	t.Helper()
	got, err := img.DirtyExtents(name, off, n)
	if err != nil {
		t.Fatalf("DirtyExtents(%q, %d, %d): %v", name, off, n, err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("DirtyExtents(%q, %d, %d) =\n  %+v\nwant\n  %+v", name, off, n, got, want)
	}
}

func TestBitmapsAddWriteListPersist(t *testing.T) {
	const size = 4 * mib
	path := mustCreate(t, "b.qcow2", size, nil)
	img := mustOpen(t, path, nil)
	if list, err := img.Bitmaps(); err != nil || len(list) != 0 {
		t.Fatalf("Bitmaps of a new image = %v, %v", list, err)
	}
	for _, b := range []struct {
		name    string
		g       uint64
		enabled bool
	}{{"a", 0, true}, {"b", 0, false}, {"fine", 512, true}} {
		if err := img.BitmapAdd(b.name, b.g, b.enabled); err != nil {
			t.Fatalf("BitmapAdd(%q): %v", b.name, err)
		}
	}
	list, err := img.Bitmaps()
	if err != nil {
		t.Fatal(err)
	}
	want := []BitmapInfo{
		{Name: "a", Granularity: 64 * kib, Enabled: true},
		{Name: "b", Granularity: 64 * kib},
		{Name: "fine", Granularity: 512, Enabled: true},
	}
	if !reflect.DeepEqual(list, want) {
		t.Fatalf("Bitmaps = %+v, want %+v", list, want)
	}

	mustWrite(t, img, nil, bytes.Repeat([]byte{1}, 4096), mib+512)
	bm := mustBitmaps(t, img)
	if bm["a"].DirtyBytes != 64*kib || bm["b"].DirtyBytes != 0 || bm["fine"].DirtyBytes != 4096 {
		t.Fatalf("dirty bytes after a 4 KiB write: %+v", bm)
	}
	wantExtents(t, img, "fine", 0, size, []DirtyExtent{
		{0, mib + 512, false}, {mib + 512, 4096, true}, {mib + 512 + 4096, size - mib - 512 - 4096, false},
	})
	wantExtents(t, img, "a", mib-100, 200*kib, []DirtyExtent{
		{mib - 100, 100, false}, {mib, 64 * kib, true}, {mib + 64*kib, 200*kib - 100 - 64*kib, false},
	})
	wantExtents(t, img, "a", 0, size*2, []DirtyExtent{ // clamped to the size
		{0, mib, false}, {mib, 64 * kib, true}, {mib + 64*kib, 3*mib - 64*kib, false},
	})
	wantExtents(t, img, "a", size, 512, nil)

	if err := img.BitmapEnable("b", true); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(2*mib, 64*kib, false); err != nil {
		t.Fatal(err)
	}
	if err := img.BitmapEnable("b", false); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, nil, []byte{2}, 3*mib)
	bm = mustBitmaps(t, img)
	if bm["b"].Enabled || bm["b"].DirtyBytes != 64*kib || bm["a"].DirtyBytes != 3*64*kib {
		t.Fatalf("after enable, zeroes, disable, write: %+v", bm)
	}
	if err := img.BitmapMerge("fine", nil, "b"); err != nil {
		t.Fatal(err)
	}
	if got := mustBitmaps(t, img)["fine"].DirtyBytes; got != 4096+64*kib+512 {
		t.Fatalf("'fine' after merging 'b': %d dirty bytes", got)
	}
	if err := img.BitmapClear("a"); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, img, "a", 0, size, []DirtyExtent{{0, size, false}})
	if err := img.BitmapAdd("gone", 0, true); err != nil {
		t.Fatal(err)
	}
	if err := img.BitmapRemove("gone"); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	checkClean(t, path)

	img = mustOpen(t, path, &OpenOptions{ReadOnly: true})
	list, err = img.Bitmaps()
	if err != nil {
		t.Fatal(err)
	}
	want = []BitmapInfo{
		{Name: "a", Granularity: 64 * kib, Enabled: true},
		{Name: "b", Granularity: 64 * kib, DirtyBytes: 64 * kib},
		{Name: "fine", Granularity: 512, Enabled: true, DirtyBytes: 4096 + 64*kib + 512},
	}
	if !reflect.DeepEqual(list, want) {
		t.Fatalf("after reopening: %+v, want %+v", list, want)
	}
	wantExtents(t, img, "b", 0, size, []DirtyExtent{
		{0, 2 * mib, false}, {2 * mib, 64 * kib, true}, {2*mib + 64*kib, 2*mib - 64*kib, false},
	})
	wantErrno(t, img.BitmapAdd("ro", 0, true), "bitmap_add", syscall.EROFS)
}

func TestBitmapErrors(t *testing.T) {
	path := mustCreate(t, "e.qcow2", 4*mib, nil)
	img := mustOpen(t, path, nil)
	if err := img.BitmapAdd("a", 0, true); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, img.BitmapAdd("a", 0, true), "bitmap_add", syscall.EINVAL)
	wantErrno(t, img.BitmapAdd("g", 1000, true), "bitmap_add", syscall.EINVAL)
	wantErrno(t, img.BitmapAdd("", 0, true), "bitmap_add", syscall.EINVAL)
	wantErrno(t, img.BitmapAdd(strings.Repeat("n", 1024), 0, true), "bitmap_add", syscall.EINVAL)
	wantErrno(t, img.BitmapAdd("a\x00b", 0, true), "bitmap_add", syscall.EINVAL)
	wantErrno(t, img.BitmapRemove("nope"), "bitmap_remove", syscall.ENOENT)
	wantErrno(t, img.BitmapClear("nope"), "bitmap_clear", syscall.ENOENT)
	wantErrno(t, img.BitmapEnable("nope", true), "bitmap_enable", syscall.ENOENT)
	wantErrno(t, img.BitmapMerge("nope", nil, "a"), "bitmap_merge", syscall.ENOENT)
	wantErrno(t, img.BitmapMerge("a", img, "nope"), "bitmap_merge", syscall.ENOENT)
	_, err := img.DirtyExtents("nope", 0, 512)
	wantErrno(t, err, "bitmap_extents", syscall.ENOENT)
	_, err = img.DirtyExtents("a", 4*mib+512, 512)
	wantErrno(t, err, "bitmap_extents", syscall.EINVAL)
	_, err = img.DirtyExtents("a", -1, 512)
	wantErrno(t, err, "bitmap_extents", syscall.EINVAL)
	if err := img.BitmapAdd(strings.Repeat("n", 1023), 0, true); err != nil {
		t.Fatalf("a 1023-byte name: %v", err)
	}
	mustClose(t, img)
	if _, err := img.Bitmaps(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Bitmaps after Close: %v", err)
	}
}

func TestBitmapMergeFromAnotherImage(t *testing.T) {
	dst := mustCreate(t, "dst.qcow2", 4*mib, nil)
	src := mustCreate(t, "src.qcow2", 4*mib, nil)
	a := mustOpen(t, dst, nil)
	b := mustOpen(t, src, nil)
	if err := a.BitmapAdd("target", 65536, true); err != nil {
		t.Fatal(err)
	}
	if err := b.BitmapAdd("source", 4096, true); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, b, nil, make([]byte, 4096), mib+8192)
	if err := a.BitmapMerge("target", b, "source"); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, a, "target", 0, 4*mib, []DirtyExtent{
		{0, mib, false}, {mib, 64 * kib, true}, {mib + 64*kib, 3*mib - 64*kib, false},
	})
	// Merges in both directions at once (the locks are taken in a fixed order).
	if err := b.BitmapAdd("back", 0, true); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 2)
	go func() { done <- a.BitmapMerge("target", b, "source") }()
	go func() { done <- b.BitmapMerge("back", a, "target") }()
	for i := 0; i < 2; i++ {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	mustClose(t, b)
	if err := a.BitmapMerge("target", b, "source"); !errors.Is(err, ErrClosed) {
		t.Fatalf("merge from a closed image: %v", err)
	}
	mustClose(t, a)
	checkClean(t, dst)
	checkClean(t, src)
}

func TestBitmapInUseIsInconsistent(t *testing.T) {
	path := mustCreate(t, "u.qcow2", 4*mib, nil)
	img := mustOpen(t, path, nil)
	if err := img.BitmapAdd("a", 0, true); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	img = mustOpen(t, path, nil) // marks the bitmaps in use on disk
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	copyPath := filepath.Join(t.TempDir(), "copy.qcow2")
	if err := os.WriteFile(copyPath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	c := mustOpen(t, copyPath, nil)
	list, err := c.Bitmaps()
	if err != nil || len(list) != 1 || !list[0].Inconsistent || list[0].DirtyBytes != 0 {
		t.Fatalf("Bitmaps of the copy = %+v, %v", list, err)
	}
	wantErrno(t, c.BitmapClear("a"), "bitmap_clear", syscall.ENOTSUP)
	_, err = c.DirtyExtents("a", 0, 4*mib)
	wantErrno(t, err, "bitmap_extents", syscall.ENOTSUP)
	if err := c.BitmapRemove("a"); err != nil {
		t.Fatal(err)
	}
	mustClose(t, c)
	checkClean(t, copyPath)
}

func TestBitmapDropBitmaps(t *testing.T) {
	path := mustCreate(t, "d.qcow2", 4*mib, nil)
	img := mustOpen(t, path, nil)
	if err := img.BitmapAdd("a", 0, true); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	img = mustOpen(t, path, &OpenOptions{DropBitmaps: true})
	if bm := mustBitmaps(t, img); len(bm) != 1 {
		t.Fatalf("DropBitmaps must keep readable bitmaps: %+v", bm)
	}
	mustClose(t, img)
	// Set a reserved flag in the directory entry: bitmaps cowdisk cannot keep.
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := -1
	for pos := int(binary.BigEndian.Uint32(data[100:])); ; {
		magic, n := binary.BigEndian.Uint32(data[pos:]), int(binary.BigEndian.Uint32(data[pos+4:]))
		if magic == 0 {
			t.Fatal("no bitmaps extension")
		}
		if magic == 0x23852875 {
			dir = int(binary.BigEndian.Uint64(data[pos+8+16:]))
			break
		}
		pos += 8 + (n+7)/8*8
	}
	flags := binary.BigEndian.Uint32(data[dir+12:])
	binary.BigEndian.PutUint32(data[dir+12:], flags|0x10)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if img, err := Open(path, nil); err == nil {
		img.Close()
		t.Fatal("a read-write open of unkeepable bitmaps succeeded")
	}
	ro := mustOpen(t, path, &OpenOptions{ReadOnly: true})
	_, err = ro.Bitmaps()
	wantErrno(t, err, "bitmap_list", syscall.ENOTSUP)
	mustClose(t, ro)
	img = mustOpen(t, path, &OpenOptions{DropBitmaps: true})
	if bm := mustBitmaps(t, img); len(bm) != 0 {
		t.Fatalf("bitmaps given up, yet listed: %+v", bm)
	}
	if _, err := img.Check(RepairLeaks); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	checkClean(t, path)
}

func TestBitmapQemuImgInterop(t *testing.T) {
	requireQemu(t)
	path := filepath.Join(t.TempDir(), "q.qcow2")
	for _, args := range [][]string{
		{"create", "-q", "-f", "qcow2", path, "4M"},
		{"bitmap", "--add", "-g", "65536", path, "qb"},
		{"bitmap", "--add", "--disable", path, "qd"},
	} {
		if out, code := qemuImg(t, args...); code != 0 {
			t.Fatalf("qemu-img %v: %s", args, out)
		}
	}
	img := mustOpen(t, path, nil)
	list, err := img.Bitmaps()
	if err != nil {
		t.Fatal(err)
	}
	want := []BitmapInfo{{Name: "qb", Granularity: 64 * kib, Enabled: true}, {Name: "qd", Granularity: 64 * kib}}
	if !reflect.DeepEqual(list, want) {
		t.Fatalf("qemu-img's bitmaps: %+v, want %+v", list, want)
	}
	mustWrite(t, img, nil, make([]byte, 100), 3*mib+10)
	if err := img.BitmapAdd("ours", 4096, true); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, nil, make([]byte, 100), 5000)
	mustClose(t, img)
	checkClean(t, path)
	for _, args := range [][]string{
		{"bitmap", "--add", path, "merged"},
		{"bitmap", "--merge", "ours", path, "merged"},
		{"bitmap", "--merge", "qb", path, "merged"},
	} {
		if out, code := qemuImg(t, args...); code != 0 {
			t.Fatalf("qemu-img %v: %s", args, out)
		}
	}
	img = mustOpen(t, path, &OpenOptions{ReadOnly: true})
	wantExtents(t, img, "merged", 0, 4*mib, []DirtyExtent{
		{0, 64 * kib, true}, {64 * kib, 3*mib - 64*kib, false}, {3 * mib, 64 * kib, true}, {3*mib + 64*kib, mib - 64*kib, false},
	})
	mustClose(t, img)
	out, code := qemuImg(t, "info", "--output=json", path)
	if code != 0 {
		t.Fatal(out)
	}
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []struct {
					Name  string   `json:"name"`
					Flags []string `json:"flags"`
				} `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, b := range info.FormatSpecific.Data.Bitmaps {
		names = append(names, b.Name)
		for _, f := range b.Flags {
			if f == "in-use" {
				t.Errorf("bitmap %q is still in use after close", b.Name)
			}
		}
	}
	if !reflect.DeepEqual(names, []string{"qb", "qd", "ours", "merged"}) {
		t.Fatalf("qemu-img info lists %v", names)
	}
}
