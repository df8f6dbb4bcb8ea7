package cowdisk

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

const (
	kib = 1 << 10
	mib = 1 << 20
	cs  = 64 * kib
)

// requireQemuIO skips the test when qemu-io is not installed.
func requireQemuIO(t testing.TB) {
	t.Helper()
	requireQemu(t)
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Skip("qemu-io not installed")
	}
}

// qemuIO runs qemu-io commands on an image of the given format and fails the test
// on error or failed pattern verification.
func qemuIO(t testing.TB, format, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput()
	if err != nil || strings.Contains(strings.ToLower(string(out)), "fail") {
		t.Fatalf("qemu-io %v %s: %v\n%s", cmds, path, err, out)
	}
}

// mustQemuImg runs qemu-img and fails the test unless it succeeds.
func mustQemuImg(t testing.TB, args ...string) string {
	t.Helper()
	requireQemu(t)
	out, code := qemuImg(t, args...)
	if code != 0 {
		t.Fatalf("qemu-img %v: exit %d:\n%s", args, code, out)
	}
	return out
}

// qemuExtent is one entry of `qemu-img map --output=json`.
type qemuExtent struct {
	Start      int64  `json:"start"`
	Length     int64  `json:"length"`
	Depth      int    `json:"depth"`
	Present    bool   `json:"present"`
	Zero       bool   `json:"zero"`
	Data       bool   `json:"data"`
	Compressed bool   `json:"compressed"`
	Offset     *int64 `json:"offset"`
}

// qemuMap runs `qemu-img map --output=json` and converts its entries to Extents.
func qemuMap(t testing.TB, path string) []Extent {
	t.Helper()
	requireQemu(t)
	out, err := exec.Command("qemu-img", "map", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img map %s: %v", path, err)
	}
	var entries []qemuExtent
	if err := json.Unmarshal(out, &entries); err != nil {
		t.Fatalf("qemu-img map output: %v\n%s", err, out)
	}
	var m []Extent
	for _, q := range entries {
		if q.Length == 0 { // qemu-img prints one empty entry for an empty image
			continue
		}
		e := Extent{Start: q.Start, Length: q.Length, Depth: q.Depth, Present: q.Present,
			Zero: q.Zero, Data: q.Data, Compressed: q.Compressed}
		if q.Offset != nil {
			e.Offset, e.HasOffset = *q.Offset, true
		}
		m = append(m, e)
	}
	return m
}

// checkMap fails the test unless Extents of the whole image equals qemu-img map,
// field by field, and a sub-range covers exactly that range. It returns the map.
func checkMap(t testing.TB, path string) []Extent {
	t.Helper()
	img := mustOpen(t, path, &OpenOptions{ReadOnly: true})
	ours, err := img.Extents(0, img.Size())
	if err != nil {
		t.Fatalf("Extents: %v", err)
	}
	if size := img.Size(); size > 3*cs {
		part, err := img.Extents(cs+100, size-3*cs)
		if err != nil {
			t.Fatalf("Extents of a part: %v", err)
		}
		var sum int64
		for _, e := range part {
			sum += e.Length
		}
		if len(part) == 0 || part[0].Start != cs+100 || sum != size-3*cs {
			t.Fatalf("Extents(%d, %d) covers %d bytes from %+v", cs+100, size-3*cs, sum, part)
		}
	}
	mustClose(t, img)
	theirs := qemuMap(t, path)
	if len(ours) != len(theirs) {
		t.Fatalf("%s: %d extents, qemu-img map has %d\nours:   %+v\ntheirs: %+v",
			path, len(ours), len(theirs), ours, theirs)
	}
	for i := range ours {
		if ours[i] != theirs[i] {
			t.Fatalf("%s: extent %d is %+v, qemu-img map says %+v", path, i, ours[i], theirs[i])
		}
	}
	return ours
}

// TestWriteZeroes zeroes aligned and unaligned ranges over data and unallocated
// space, on v2 and v3 images with several cluster sizes, against a model.
func TestWriteZeroes(t *testing.T) {
	configs := []*CreateOptions{
		{Version: 3, ClusterSize: 512},
		{Version: 3, ClusterSize: 4096},
		{Version: 3, ClusterSize: cs},
		{Version: 2, ClusterSize: 4096},
		{Version: 2, ClusterSize: cs},
	}
	for i, opts := range configs {
		opts, seed := opts, int64(i)
		t.Run(fmtOpts(opts), func(t *testing.T) {
			t.Parallel()
			const size = 4 * mib
			clusterSize := int64(opts.ClusterSize)
			path := mustCreate(t, "z.qcow2", size, opts)
			img := mustOpen(t, path, nil)
			model := make([]byte, size)
			mustWrite(t, img, model, pattern(seed, 3*mib), 512*kib)
			rng := rand.New(rand.NewSource(seed))
			for k := 0; k < 30; k++ {
				n := 1 + rng.Int63n(3*clusterSize+999)
				off := rng.Int63n(size - n)
				if rng.Intn(3) == 0 {
					off -= off % clusterSize
					n = clusterSize * (1 + rng.Int63n(3))
					if n > size-off {
						n = size - off
					}
				}
				if err := img.WriteZeroes(off, n, rng.Intn(2) == 0); err != nil {
					t.Fatalf("WriteZeroes(%d, %d): %v", off, n, err)
				}
				copy(model[off:off+n], make([]byte, n))
				lo, hi := off-700, off+n+700
				if lo < 0 {
					lo = 0
				}
				if hi > size {
					hi = size
				}
				mustReadEqual(t, img, model[lo:hi], lo)
				if rng.Intn(3) == 0 { // data again over zeroes
					d := pattern(seed*100+int64(k), 1+rng.Intn(5000))
					mustWrite(t, img, model, d, rng.Int63n(size-int64(len(d))))
				}
			}
			if err := img.WriteZeroes(size-1, 1, false); err != nil {
				t.Fatal(err)
			}
			model[size-1] = 0
			if err := img.WriteZeroes(0, 0, false); err != nil {
				t.Fatalf("empty WriteZeroes: %v", err)
			}
			mustReadEqual(t, img, model, 0)
			mustClose(t, img)
			checkClean(t, path)
			compareRaw(t, path, model)
		})
	}
}

// TestWriteZeroesUnmap: whole clusters become zero clusters; with mayUnmap they
// lose their host cluster too.
func TestWriteZeroesUnmap(t *testing.T) {
	path := mustCreate(t, "u.qcow2", 2*mib, nil)
	img := mustOpen(t, path, nil)
	mustWrite(t, img, nil, bytes.Repeat([]byte{0x55}, mib), 0)
	if err := img.WriteZeroes(0, 2*cs, false); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(4*cs, 2*cs, true); err != nil {
		t.Fatal(err)
	}
	m, err := img.Extents(0, mib)
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 4 || !m[0].Zero || m[0].Data || !m[0].HasOffset ||
		!m[1].Data || m[1].Zero || !m[2].Zero || m[2].HasOffset || !m[2].Present ||
		m[2].Start != 4*cs || m[2].Length != 2*cs || !m[3].Data {
		t.Fatalf("Extents after zeroing = %+v", m)
	}
	mustClose(t, img)
	checkClean(t, path)
	checkMap(t, path)
}

// TestDiscard releases whole clusters only; freed clusters are reused.
func TestDiscard(t *testing.T) {
	path := mustCreate(t, "d.qcow2", 2*mib, nil)
	img := mustOpen(t, path, nil)
	model := make([]byte, 2*mib)
	mustWrite(t, img, model, bytes.Repeat([]byte{0x77}, mib), 0)
	if err := img.Discard(cs+1000, 3*cs); err != nil { // clusters 2 and 3
		t.Fatal(err)
	}
	copy(model[2*cs:4*cs], make([]byte, 2*cs))
	if err := img.Discard(8*cs, 100); err != nil { // less than a cluster: nothing
		t.Fatal(err)
	}
	if err := img.Discard(0, 0); err != nil {
		t.Fatal(err)
	}
	mustReadEqual(t, img, model, 0)
	before, _ := img.Info()
	mustWrite(t, img, model, bytes.Repeat([]byte{0x12}, 2*cs), 20*cs)
	after, _ := img.Info()
	if after.HostSize != before.HostSize {
		t.Errorf("host size grew from %d to %d: discarded clusters were not reused",
			before.HostSize, after.HostSize)
	}
	mustReadEqual(t, img, model, 0)
	mustClose(t, img)
	checkClean(t, path)
	compareRaw(t, path, model)
	checkMap(t, path)
}

// allocated returns the bytes the host file system allocates for path.
func allocated(t testing.TB, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// TestDiscardUnmap: with OpenOptions.DiscardUnmap, discarded clusters are punched
// out of the file.
func TestDiscardUnmap(t *testing.T) {
	path := mustCreate(t, "du.qcow2", 16*mib, nil)
	img := mustOpen(t, path, nil)
	mustWrite(t, img, nil, pattern(5, 8*mib), 0)
	mustClose(t, img)
	full := allocated(t, path)

	img = mustOpen(t, path, nil)
	if err := img.Discard(0, mib); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	if a := allocated(t, path); a < full-8*512 {
		t.Errorf("without DiscardUnmap the file shrank from %d to %d bytes", full, a)
	}

	img = mustOpen(t, path, &OpenOptions{DiscardUnmap: true})
	if err := img.Discard(mib, 4*mib); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	punched := allocated(t, path)
	if punched > full-4*mib+cs {
		t.Errorf("after discarding 4 MiB with DiscardUnmap: %d bytes allocated, was %d", punched, full)
	}
	mustReadEqual(t, img, make([]byte, 4*mib), mib)
	if err := img.WriteZeroes(5*mib, mib, true); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if a := allocated(t, path); a > punched-mib+cs {
		t.Errorf("after zeroing 1 MiB with unmap: %d bytes allocated, was %d", a, punched)
	}
	mustClose(t, img)
	checkClean(t, path)
	checkMap(t, path)
}

// TestResize grows, shrinks, refuses to drop data without force, and keeps Size()
// in step; qemu-img agrees on the size.
func TestResize(t *testing.T) {
	path := mustCreate(t, "r.qcow2", mib, nil)
	img := mustOpen(t, path, nil)
	mustWrite(t, img, nil, bytes.Repeat([]byte{0x42}, cs), 512*kib)
	if err := img.Resize(3*mib, false); err != nil {
		t.Fatal(err)
	}
	if img.Size() != 3*mib {
		t.Fatalf("Size() = %d after growing to 3 MiB", img.Size())
	}
	mustReadEqual(t, img, make([]byte, 2*mib), mib)
	mustWrite(t, img, nil, []byte{0x43}, 3*mib-1)

	wantErrno(t, img.Resize(256*kib, false), "resize", syscall.EINVAL)
	if img.Size() != 3*mib {
		t.Fatalf("Size() = %d after a refused shrink", img.Size())
	}
	mustReadEqual(t, img, bytes.Repeat([]byte{0x42}, cs), 512*kib)
	wantErrno(t, img.Resize(2*mib, false), "resize", syscall.EINVAL) // the last byte
	if err := img.Discard(3*mib-cs, cs); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(2*mib, false); err != nil {
		t.Fatalf("shrinking over unallocated space: %v", err)
	}
	wantErrno(t, img.Resize(mib+1, false), "resize", syscall.EINVAL)
	wantErrno(t, img.Resize(-512, false), "resize", syscall.EINVAL)

	if err := img.Resize(256*kib, true); err != nil {
		t.Fatalf("forced shrink: %v", err)
	}
	if img.Size() != 256*kib {
		t.Fatalf("Size() = %d after a forced shrink", img.Size())
	}
	if n, err := img.ReadAt(make([]byte, 10), 256*kib); n != 0 || err == nil {
		t.Fatalf("ReadAt past the new end = %d, %v", n, err)
	}
	if err := img.Resize(mib, false); err != nil {
		t.Fatal(err)
	}
	mustReadEqual(t, img, make([]byte, mib), 0)
	if info, _ := img.Info(); info.VirtualSize != mib {
		t.Fatalf("Info().VirtualSize = %d", info.VirtualSize)
	}
	mustClose(t, img)
	if qi := getQemuInfo(t, path); qi.VirtualSize != mib {
		t.Fatalf("qemu-img info virtual-size = %d", qi.VirtualSize)
	}
	checkClean(t, path)

	// Reopened, the size is the new one; shrinking to nothing works.
	img = mustOpen(t, path, nil)
	if img.Size() != mib {
		t.Fatalf("Size() after reopening = %d", img.Size())
	}
	if err := img.Resize(0, true); err != nil {
		t.Fatal(err)
	}
	if m, err := img.Extents(0, 1); err != nil || len(m) != 0 {
		t.Fatalf("Extents of an empty image = %+v, %v", m, err)
	}
	mustClose(t, img)
	checkClean(t, path)
}

// TestResizeWithSnapshots: images with internal snapshots can grow, not shrink.
func TestResizeWithSnapshots(t *testing.T) {
	path := mustCreate(t, "s.qcow2", mib, nil)
	mustQemuImg(t, "snapshot", "-c", "snap1", path)
	img := mustOpen(t, path, nil)
	if err := img.Resize(2*mib, false); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, img.Resize(512*kib, true), "resize", syscall.ENOTSUP)
	if img.Size() != 2*mib {
		t.Fatalf("Size() = %d", img.Size())
	}
	mustClose(t, img)
	checkClean(t, path)
}

// TestZeroesErrors: read-only handles, ranges past the end, negative numbers and
// closed images.
func TestZeroesErrors(t *testing.T) {
	path := mustCreate(t, "e.qcow2", mib, nil)
	ro := mustOpen(t, path, &OpenOptions{ReadOnly: true})
	wantErrno(t, ro.WriteZeroes(0, 512, false), "write_zeroes", syscall.EROFS)
	wantErrno(t, ro.Discard(0, cs), "discard", syscall.EROFS)
	wantErrno(t, ro.Resize(2*mib, false), "resize", syscall.EROFS)
	if ro.Size() != mib {
		t.Fatalf("Size() changed after a refused resize: %d", ro.Size())
	}
	if _, err := ro.Extents(0, mib); err != nil {
		t.Fatalf("Extents on a read-only image: %v", err)
	}
	mustClose(t, ro)

	img := mustOpen(t, path, nil)
	wantErrno(t, img.WriteZeroes(mib, 1, false), "write_zeroes", syscall.EINVAL)
	wantErrno(t, img.WriteZeroes(mib-1, 2, false), "write_zeroes", syscall.EINVAL)
	wantErrno(t, img.WriteZeroes(-1, 2, false), "write_zeroes", syscall.EINVAL)
	wantErrno(t, img.WriteZeroes(0, -2, false), "write_zeroes", syscall.EINVAL)
	wantErrno(t, img.Discard(0, mib+1), "discard", syscall.EINVAL)
	wantErrno(t, img.Discard(-cs, cs), "discard", syscall.EINVAL)
	_, err := img.Extents(mib+1, 1)
	wantErrno(t, err, "block_status", syscall.EINVAL)
	_, err = img.Extents(-1, 1)
	wantErrno(t, err, "block_status", syscall.EINVAL)
	if m, err := img.Extents(mib, 100); err != nil || len(m) != 0 {
		t.Fatalf("Extents at the end = %+v, %v", m, err)
	}
	if m, err := img.Extents(0, 0); err != nil || len(m) != 0 {
		t.Fatalf("Extents of nothing = %+v, %v", m, err)
	}
	if m, err := img.Extents(cs, 1<<62); err != nil || len(m) != 1 || m[0].Length != mib-cs {
		t.Fatalf("Extents clamped to the end = %+v, %v", m, err)
	}
	mustClose(t, img)
	for _, err := range []error{
		img.WriteZeroes(0, 1, false), img.Discard(0, cs), img.Resize(2*mib, false),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("after Close: %v, want ErrClosed", err)
		}
	}
	if _, err := img.Extents(0, 1); !errors.Is(err, ErrClosed) {
		t.Errorf("Extents after Close: %v, want ErrClosed", err)
	}
}

// TestExtentsOurImage compares Extents with qemu-img map on an image we wrote,
// zeroed and discarded in.
func TestExtentsOurImage(t *testing.T) {
	requireQemu(t)
	path := mustCreate(t, "ours.qcow2", 16*mib, nil)
	img := mustOpen(t, path, nil)
	mustWrite(t, img, nil, bytes.Repeat([]byte{1}, 320*kib-10000), 10000)
	for _, z := range []struct {
		off, n int64
		unmap  bool
	}{{mib, 5 * cs, false}, {2 * mib, cs, true}, {12 * mib, 100, false}} {
		if z.off == 2*mib {
			mustWrite(t, img, nil, bytes.Repeat([]byte{2}, 3*cs), 2*mib)
		}
		if err := img.WriteZeroes(z.off, z.n, z.unmap); err != nil {
			t.Fatal(err)
		}
	}
	mustWrite(t, img, nil, bytes.Repeat([]byte{3}, mib), 15*mib)
	for _, d := range [][2]int64{{0, cs}, {15 * mib, 2 * cs}} {
		if err := img.Discard(d[0], d[1]); err != nil {
			t.Fatal(err)
		}
	}
	mustClose(t, img)
	checkClean(t, path)
	checkMap(t, path)
}

// TestExtentsManyBatches: more extents than one library call returns.
func TestExtentsManyBatches(t *testing.T) {
	requireQemu(t)
	path := mustCreate(t, "many.qcow2", 12*mib, &CreateOptions{ClusterSize: 4096})
	img := mustOpen(t, path, nil)
	data := bytes.Repeat([]byte{9}, 4096)
	for i := int64(0); i < 3000; i++ {
		switch i % 3 {
		case 0:
			mustWrite(t, img, nil, data, i*4096)
		case 1:
			if err := img.WriteZeroes(i*4096, 4096, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	m, err := img.Extents(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	if len(m) < 3000 {
		t.Fatalf("%d extents, want at least 3000", len(m))
	}
	mustClose(t, img)
	checkClean(t, path)
	if got := checkMap(t, path); len(got) != len(m) {
		t.Fatalf("%d extents on reopening, %d before", len(got), len(m))
	}
}

// TestExtentsQemuImage compares Extents with qemu-img map on an image qemu-io wrote
// (zeroes, discards, compressed and plain data), before and after our changes.
func TestExtentsQemuImage(t *testing.T) {
	requireQemuIO(t)
	path := filepath.Join(t.TempDir(), "q.qcow2")
	mustQemuImg(t, "create", "-f", "qcow2", path, "16M")
	qemuIO(t, "qcow2", path,
		"write -P 1 0 1M", "write -z 2M 128k", "write -z -u 512k 64k", "discard 128k 64k",
		"write -P 5 3M 256k", "write -z 3M 64k", "write -c -P 7 4M 64k", "write -P 3 15M 64k")
	m := checkMap(t, path)
	compressed := 0
	for _, e := range m {
		if e.Compressed {
			compressed++
			if e.HasOffset || !e.Data {
				t.Errorf("compressed extent %+v", e)
			}
		}
	}
	if compressed != 1 {
		t.Errorf("%d compressed extents in %+v", compressed, m)
	}

	img := mustOpen(t, path, nil)
	if err := img.WriteZeroes(4*mib, cs, false); err != nil {
		t.Fatal(err)
	}
	if err := img.Discard(15*mib, cs); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(0, 2*cs, true); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, nil, bytes.Repeat([]byte{8}, cs), 8*mib)
	mustClose(t, img)
	checkClean(t, path)
	checkMap(t, path)
	qemuIO(t, "qcow2", path, "read -P 0 0 128k", "read -P 1 192k 320k", "read -P 0 4M 64k",
		"read -P 8 8M 64k", "read -P 0 15M 1M")
}

// TestExtentsChain compares Extents with qemu-img map on a 3-deep chain
// top.qcow2 → mid.qcow2 → base.raw of different sizes.
func TestExtentsChain(t *testing.T) {
	requireQemuIO(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	mid := filepath.Join(dir, "mid.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	mustQemuImg(t, "create", "-f", "raw", base, "4M")
	qemuIO(t, "raw", base, "write -P 1 0 1M", "write -P 2 3M 64k")
	mustQemuImg(t, "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "6M")
	qemuIO(t, "qcow2", mid, "write -P 3 512k 128k", "write -z 1M 64k", "write -P 4 5M 64k")
	mustQemuImg(t, "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "8M")

	img := mustOpen(t, top, nil)
	mustWrite(t, img, nil, bytes.Repeat([]byte{5}, cs), 0)
	if err := img.WriteZeroes(2*cs, cs, true); err != nil {
		t.Fatal(err)
	}
	if err := img.Discard(3*mib, cs); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(5*mib, 2*cs, false); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, nil, bytes.Repeat([]byte{6}, 2*cs), 7*mib)
	mustClose(t, img)

	m := checkMap(t, top)
	depths := map[int]bool{}
	for _, e := range m {
		depths[e.Depth] = true
		if e.Depth == 2 && e.Data && (!e.HasOffset || e.Offset != e.Start) {
			t.Errorf("raw base extent %+v should map to its guest offset", e)
		}
	}
	if !depths[0] || !depths[1] || !depths[2] {
		t.Errorf("depths %v, want 0, 1 and 2", depths)
	}
	checkMap(t, mid)
	checkClean(t, top)
	checkClean(t, mid)
}
