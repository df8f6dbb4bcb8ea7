package cowdisk

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
)

// convertSize is the virtual size of the test sources: not a multiple of the
// cluster size.
const convertSize = 8*mib + 3*512

// convertData is the guest contents of the test sources: data at unaligned
// offsets, a compressible run, and holes (zero runs) in between.
func convertData() []byte {
	data := make([]byte, convertSize)
	copy(data[100:], pattern(11, 200000))
	copy(data[1*mib+4096:], bytes.Repeat([]byte("convert me, compress me. "), 40000))
	copy(data[3*mib+17:], pattern(12, 70000))
	// Zeros inside data (shorter and longer than the default MinSparse of 4 KiB).
	for i := 3*mib + 20000; i < 3*mib+21000; i++ {
		data[i] = 0
	}
	for i := 3*mib + 30000; i < 3*mib+60000; i++ {
		data[i] = 0
	}
	copy(data[6*mib-5:], pattern(13, 10))
	copy(data[convertSize-1000:], pattern(14, 1000))
	return data
}

// qemuSource writes data to a raw file and has qemu-img convert it to a qcow2
// image with 4 KiB clusters (zero runs become holes); it returns both paths.
func qemuSource(t testing.TB, data []byte) (qcow2, raw string) {
	t.Helper()
	requireQemu(t)
	noteLibrary()
	dir := t.TempDir()
	raw = filepath.Join(dir, "src.raw")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	qcow2 = filepath.Join(dir, "src.qcow2")
	mustQemuImg(t, "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, qcow2)
	return qcow2, raw
}

// qemuCheck is the part of `qemu-img check --output=json` the tests look at.
type qemuCheck struct {
	TotalClusters      uint64 `json:"total-clusters"`
	AllocatedClusters  uint64 `json:"allocated-clusters"`
	CompressedClusters uint64 `json:"compressed-clusters"`
}

// getQemuCheck runs `qemu-img check --output=json` on a qcow2 image that must be
// clean.
func getQemuCheck(t testing.TB, path string) qemuCheck {
	t.Helper()
	checkClean(t, path)
	out := mustQemuImg(t, "check", "--output=json", "-f", "qcow2", path)
	var c qemuCheck
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		t.Fatalf("qemu-img check output: %v\n%s", err, out)
	}
	return c
}

// qemuIdentical fails the test unless `qemu-img compare` says the images are
// identical.
func qemuIdentical(t testing.TB, a, fmtA, b, fmtB string, extra ...string) {
	t.Helper()
	args := append([]string{"compare", "-f", fmtA, "-F", fmtB}, extra...)
	args = append(args, a, b)
	out, code := qemuImg(t, args...)
	if code != 0 || !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img %s: exit %d:\n%s", strings.Join(args, " "), code, out)
	}
}

// wantGone fails the test if path exists.
func wantGone(t testing.TB, path string) {
	t.Helper()
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("%s still exists (stat: %v)", path, err)
	}
}

// wantCancelled fails the test unless err is a cancelled call of op matching
// cause and syscall.ECANCELED.
func wantCancelled(t testing.TB, err error, op string, cause error) *Error {
	t.Helper()
	ce := wantErrno(t, err, op, syscall.ECANCELED)
	if !errors.Is(err, cause) {
		t.Fatalf("errors.Is(%v, %v) is false", err, cause)
	}
	if !strings.Contains(err.Error(), cause.Error()) {
		t.Errorf("error %q does not name the cause %q", err, cause)
	}
	return ce
}

// progressLog records progress calls and checks them.
type progressLog struct{ calls [][2]uint64 }

func (p *progressLog) record(done, total uint64) { p.calls = append(p.calls, [2]uint64{done, total}) }

// check fails the test unless there were at least two calls (start and end),
// done never went backwards nor past the total, the total never changed, and
// the last call had done == total > 0.
func (p *progressLog) check(t testing.TB) {
	t.Helper()
	if len(p.calls) < 2 {
		t.Fatalf("%d progress calls, want at least 2: %v", len(p.calls), p.calls)
	}
	total := p.calls[0][1]
	for i, c := range p.calls {
		if c[1] != total || c[0] > c[1] || (i > 0 && c[0] < p.calls[i-1][0]) {
			t.Fatalf("progress call %d is %v: calls %v", i, c, p.calls)
		}
	}
	if last := p.calls[len(p.calls)-1]; last[0] != total || total == 0 {
		t.Fatalf("last progress call is %v, want done == total > 0", last)
	}
}

// TestConvert converts a qemu-img-made image with data and holes to qcow2
// (several settings), compressed qcow2 and raw; qemu-img compares each result
// with the source and checks the qcow2 ones.
func TestConvert(t *testing.T) {
	data := convertData()
	src, raw := qemuSource(t, data)
	cases := []struct {
		name    string
		opts    *ConvertOptions
		srcPath string
		target  string // target format
		check   func(t *testing.T, dst string, c qemuCheck)
	}{
		{name: "defaults", opts: nil},
		{name: "qcow2-4k-ooo", opts: &ConvertOptions{SourceFormat: "qcow2", TargetFormat: "qcow2",
			OutOfOrder: true, Workers: 3, Create: &CreateOptions{ClusterSize: 4096, Version: 2}},
			check: func(t *testing.T, dst string, c qemuCheck) {
				if qi := getQemuInfo(t, dst); qi.ClusterSize != 4096 || qi.FormatSpecific.Data.Compat != "0.10" {
					t.Errorf("qemu-img info: cluster size %d, compat %q", qi.ClusterSize, qi.FormatSpecific.Data.Compat)
				}
			}},
		{name: "from-raw", opts: &ConvertOptions{SourceFormat: "raw", Workers: 1, TargetNoFlush: true}, srcPath: raw},
		{name: "compressed-zlib", opts: &ConvertOptions{Compressed: true,
			Create: &CreateOptions{CompressionType: "zlib"}},
			check: func(t *testing.T, dst string, c qemuCheck) {
				if c.CompressedClusters == 0 {
					t.Errorf("no compressed clusters: %+v", c)
				}
				if ct := getQemuInfo(t, dst).FormatSpecific.Data.CompressionType; ct != "zlib" {
					t.Errorf("compression type %q, want zlib", ct)
				}
			}},
		{name: "no-sparse", opts: &ConvertOptions{NoSparse: true},
			check: func(t *testing.T, dst string, c qemuCheck) {
				if c.AllocatedClusters != c.TotalClusters {
					t.Errorf("NoSparse: %d of %d clusters allocated, want all", c.AllocatedClusters, c.TotalClusters)
				}
			}},
		{name: "raw", opts: &ConvertOptions{TargetFormat: "raw"}, target: "raw"},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			from, fromFmt := src, "qcow2"
			if tc.srcPath != "" {
				from, fromFmt = tc.srcPath, "raw"
			}
			target := tc.target
			if target == "" {
				target = "qcow2"
			}
			dst := filepath.Join(t.TempDir(), "dst."+target)
			if err := Convert(context.Background(), from, dst, tc.opts); err != nil {
				t.Fatalf("Convert: %v", err)
			}
			qemuIdentical(t, from, fromFmt, dst, target)
			if target == "raw" {
				got, err := os.ReadFile(dst)
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != len(data) || firstDiff(got, data) >= 0 {
					t.Fatalf("raw target: %d bytes, first difference at %d", len(got), firstDiff(got, data))
				}
				return
			}
			compareRaw(t, dst, data)
			c := getQemuCheck(t, dst)
			if tc.check != nil {
				tc.check(t, dst, c)
			}
			if tc.opts == nil || !tc.opts.NoSparse {
				// The holes (about 4 MiB of 8) stay unallocated.
				cs := uint64(getQemuInfo(t, dst).ClusterSize)
				if c.AllocatedClusters*cs > 5*mib {
					t.Errorf("%d clusters of %d bytes allocated: holes were written", c.AllocatedClusters, cs)
				}
			}
		})
	}
}

// TestConvertSnapshotAndBacking converts an internal snapshot of the source, and
// converts onto a backing file so that only the top image's data is copied.
func TestConvertSnapshotAndBacking(t *testing.T) {
	data := convertData()
	src, _ := qemuSource(t, data)
	mustQemuImg(t, "snapshot", "-c", "before", src)
	img := mustOpen(t, src, nil)
	now := append([]byte(nil), data...)
	mustWrite(t, img, now, pattern(20, 100000), 2*mib)
	mustClose(t, img)

	dir := t.TempDir()
	snap := filepath.Join(dir, "snap.qcow2")
	if err := Convert(context.Background(), src, snap, &ConvertOptions{Snapshot: "before"}); err != nil {
		t.Fatalf("Convert of a snapshot: %v", err)
	}
	compareRaw(t, snap, data)

	// An overlay over the snapshot's contents, converted with -B snap: the target
	// reads as the overlay but allocates only what the overlay wrote.
	top := filepath.Join(dir, "top.qcow2")
	if err := Create(top, 0, &CreateOptions{BackingFile: "snap.qcow2", BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	timg := mustOpen(t, top, nil)
	want := append([]byte(nil), data...)
	mustWrite(t, timg, want, pattern(21, 5000), 5*mib+3)
	mustClose(t, timg)
	dst := filepath.Join(dir, "dst.qcow2")
	err := Convert(context.Background(), top, dst, &ConvertOptions{BackingFile: "snap.qcow2", BackingFormat: "qcow2"})
	if err != nil {
		t.Fatalf("Convert with a backing file: %v", err)
	}
	compareRaw(t, dst, want)
	if qi := getQemuInfo(t, dst); qi.BackingFilename != "snap.qcow2" {
		t.Errorf("target's backing file %q, want snap.qcow2", qi.BackingFilename)
	}
	if c := getQemuCheck(t, dst); c.AllocatedClusters*65536 > 256*kib {
		t.Errorf("target allocates %d clusters: more than the top image's data", c.AllocatedClusters)
	}
}

// TestConvertProgress sees progress start, move forward and end at the total.
func TestConvertProgress(t *testing.T) {
	src, _ := qemuSource(t, convertData())
	var p progressLog
	dst := filepath.Join(t.TempDir(), "dst.qcow2")
	if err := Convert(context.Background(), src, dst, &ConvertOptions{Progress: p.record, Workers: 2}); err != nil {
		t.Fatal(err)
	}
	p.check(t)
	t.Logf("%d progress calls, total %d", len(p.calls), p.calls[0][1])
	qemuIdentical(t, src, "qcow2", dst, "qcow2")
}

// TestConvertCancel cancels the context from the progress callback: Convert
// fails with an error matching context.Canceled and removes the target, even one
// that existed before.
func TestConvertCancel(t *testing.T) {
	src, _ := qemuSource(t, convertData())
	dst := filepath.Join(t.TempDir(), "dst.qcow2")
	if err := os.WriteFile(dst, []byte("an old file"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	calls := 0
	err := Convert(ctx, src, dst, &ConvertOptions{Progress: func(done, total uint64) {
		calls++
		cancel()
	}})
	wantCancelled(t, err, "convert", context.Canceled)
	if calls != 1 {
		t.Errorf("%d progress calls after the cancel, want 1", calls)
	}
	wantGone(t, dst)
}

// flipContext is a context that is not done for its first `live` Err calls and
// has expired from then on: it reaches the trampoline's check deterministically.
type flipContext struct {
	context.Context
	live  int32
	calls atomic.Int32
	done  chan struct{}
}

func newFlipContext(live int32) *flipContext {
	return &flipContext{Context: context.Background(), live: live, done: make(chan struct{})}
}

func (c *flipContext) Done() <-chan struct{} { return c.done }

func (c *flipContext) Err() error {
	if n := c.calls.Add(1); n <= c.live {
		return nil
	} else if n == c.live+1 {
		close(c.done)
	}
	return context.DeadlineExceeded
}

// TestConvertDeadlineWithoutProgress: a context that can expire stops Convert
// even without a Progress function.
func TestConvertDeadlineWithoutProgress(t *testing.T) {
	src, _ := qemuSource(t, convertData())
	dst := filepath.Join(t.TempDir(), "dst.qcow2")
	ctx := newFlipContext(1) // the check before the call passes
	err := Convert(ctx, src, dst, nil)
	if ce := wantCancelled(t, err, "convert", context.DeadlineExceeded); !ce.Timeout() {
		t.Errorf("Timeout() is false for %v", err)
	}
	if ctx.calls.Load() < 2 {
		t.Errorf("the callback never asked the context")
	}
	wantGone(t, dst)

	// An expired deadline before the call: nothing is touched.
	ctx2, cancel := context.WithTimeout(context.Background(), -1)
	defer cancel()
	err = Convert(ctx2, src, dst, nil)
	wantCancelled(t, err, "convert", context.DeadlineExceeded)
	wantGone(t, dst)
}

// TestConvertCancelledBefore: a context cancelled before the call fails at once
// and leaves an existing target as it was.
func TestConvertCancelledBefore(t *testing.T) {
	src, _ := qemuSource(t, convertData())
	dst := filepath.Join(t.TempDir(), "dst.qcow2")
	if err := os.WriteFile(dst, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	called := false
	err := Convert(ctx, src, dst, &ConvertOptions{Progress: func(done, total uint64) { called = true }})
	wantCancelled(t, err, "convert", context.Canceled)
	if called {
		t.Error("Progress was called")
	}
	if b, err := os.ReadFile(dst); err != nil || string(b) != "keep me" {
		t.Errorf("target after the refused call: %q, %v", b, err)
	}
}

// progressPanic is the value TestConvertProgressPanic panics with.
type progressPanic struct{ done uint64 }

// TestConvertProgressPanic: a panic in Progress does not cross into C; Convert
// stops, removes the target and panics again with the same value.
func TestConvertProgressPanic(t *testing.T) {
	src, _ := qemuSource(t, convertData())
	dst := filepath.Join(t.TempDir(), "dst.qcow2")
	calls := 0
	func() {
		defer func() {
			r := recover()
			if _, ok := r.(progressPanic); !ok {
				t.Fatalf("recovered %#v, want a progressPanic", r)
			}
		}()
		Convert(context.Background(), src, dst, &ConvertOptions{Progress: func(done, total uint64) {
			calls++
			panic(progressPanic{done})
		}})
		t.Fatal("Convert returned instead of panicking")
	}()
	if calls != 1 {
		t.Errorf("Progress called %d times, want 1 (no calls after the panic)", calls)
	}
	wantGone(t, dst)
	// The package still works on this thread.
	if err := Convert(context.Background(), src, dst, nil); err != nil {
		t.Fatal(err)
	}
	qemuIdentical(t, src, "qcow2", dst, "qcow2")
}

// TestConvertErrors checks argument and host errors.
func TestConvertErrors(t *testing.T) {
	noteLibrary()
	dir := t.TempDir()
	src := mustCreate(t, "src.qcow2", mib, nil)
	dst := filepath.Join(dir, "dst.qcow2")
	ctx := context.Background()
	wantErrno(t, Convert(ctx, filepath.Join(dir, "missing"), dst, nil), "convert", syscall.ENOENT)
	wantErrno(t, Convert(ctx, src, dst, &ConvertOptions{SourceFormat: "vmdk"}), "convert", syscall.EINVAL)
	wantErrno(t, Convert(ctx, src, dst, &ConvertOptions{TargetFormat: "vdi"}), "convert", syscall.EINVAL)
	wantErrno(t, Convert(ctx, src, dst, &ConvertOptions{Workers: -1}), "convert", syscall.EINVAL)
	wantErrno(t, Convert(ctx, src, dst, &ConvertOptions{Workers: 17}), "convert", syscall.EINVAL)
	wantErrno(t, Convert(ctx, src, dst, &ConvertOptions{Create: &CreateOptions{CompressionType: "lz4"}}),
		"convert", syscall.EINVAL)
	wantErrno(t, Convert(ctx, src, "a\x00b", nil), "convert", syscall.EINVAL)
	wantErrno(t, Convert(ctx, src, dst, &ConvertOptions{Snapshot: "nope"}), "convert", syscall.ENOENT)
	wantErrno(t, Convert(nil, src, dst, nil), "convert", syscall.EINVAL) // refused, not a crash
	wantGone(t, dst)
}

// TestCompare finds a single differing byte in its 512-byte sector, as qemu-img
// compare reports it, and says identical for images that read the same.
func TestCompare(t *testing.T) {
	data := convertData()
	src, raw := qemuSource(t, data)
	dir := t.TempDir()
	ours := filepath.Join(dir, "ours.qcow2")
	if err := Convert(context.Background(), src, ours, &ConvertOptions{Create: &CreateOptions{ClusterSize: 65536}}); err != nil {
		t.Fatal(err)
	}
	for _, pair := range [][2]string{{src, ours}, {ours, src}} {
		same, at, err := Compare(pair[0], pair[1], nil)
		if err != nil || !same || at != 0 {
			t.Fatalf("Compare(%s, %s) = %v, %d, %v; want identical", pair[0], pair[1], same, at, err)
		}
	}
	if same, _, err := Compare(src, raw, &CompareOptions{SecondRaw: true, Strict: true}); err != nil || !same {
		t.Fatalf("Compare(qcow2, raw) = %v, %v; want identical", same, err)
	}

	// One byte changed, in a hole of the source and in data.
	for _, off := range []int64{5*mib + 1234, 3*mib + 17 + 777} {
		img := mustOpen(t, ours, nil)
		old := make([]byte, 1)
		if _, err := img.ReadAt(old, off); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, img, nil, []byte{old[0] ^ 0x5a}, off)
		mustClose(t, img)
		same, at, err := Compare(src, ours, nil)
		if err != nil || same || at != uint64(off)&^511 {
			t.Fatalf("after changing byte %d: Compare = %v, %d, %v; want a difference at %d",
				off, same, at, err, off&^511)
		}
		out, code := qemuImg(t, "compare", src, ours)
		if want := fmt.Sprintf("Content mismatch at offset %d!", at); code != 1 || !strings.Contains(out, want) {
			t.Fatalf("qemu-img compare: exit %d, %q; want %q", code, out, want)
		}
		// Put it back.
		img = mustOpen(t, ours, nil)
		mustWrite(t, img, nil, old, off)
		mustClose(t, img)
		if same, _, err := Compare(src, ours, nil); err != nil || !same {
			t.Fatalf("after restoring byte %d: Compare = %v, %v", off, same, err)
		}
	}

	// A larger image whose extra part reads as zeros: identical unless strict.
	big := mustCreate(t, "big.qcow2", convertSize+mib, nil)
	bimg := mustOpen(t, big, nil)
	mustWrite(t, bimg, nil, data, 0)
	mustClose(t, bimg)
	if same, _, err := Compare(src, big, nil); err != nil || !same {
		t.Fatalf("Compare with a larger image = %v, %v; want identical", same, err)
	}
	same, at, err := Compare(src, big, &CompareOptions{Strict: true})
	if err != nil || same || at != convertSize {
		t.Fatalf("strict Compare with a larger image = %v, %d, %v; want a difference at %d", same, at, err, convertSize)
	}

	_, _, err = Compare(src, filepath.Join(dir, "missing"), nil)
	wantErrno(t, err, "compare", syscall.ENOENT)
}

// commitChain makes base.qcow2 <- top.qcow2 in dir (relative backing name) with
// data in both; it returns the paths and what each reads.
func commitChain(t testing.TB, dir string) (base, top string, baseData, topData []byte) {
	t.Helper()
	const size = 4 * mib
	base = filepath.Join(dir, "base.qcow2")
	top = filepath.Join(dir, "top.qcow2")
	if err := Create(base, size, &CreateOptions{ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	baseData = make([]byte, size)
	img := mustOpen(t, base, nil)
	mustWrite(t, img, baseData, pattern(30, 300000), 1000)
	mustWrite(t, img, baseData, pattern(31, 100000), 3*mib)
	mustClose(t, img)
	if err := Create(top, 0, &CreateOptions{BackingFile: "base.qcow2", BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	topData = append([]byte(nil), baseData...)
	img = mustOpen(t, top, nil)
	mustWrite(t, img, topData, pattern(32, 150000), 200000) // over the base's data
	mustWrite(t, img, topData, pattern(33, 70000), 2*mib+5) // where the base has none
	if err := img.WriteZeroes(3*mib+4096, 8192, false); err != nil {
		t.Fatal(err)
	}
	for i := 3*mib + 4096; i < 3*mib+4096+8192; i++ {
		topData[i] = 0
	}
	mustClose(t, img)
	return base, top, baseData, topData
}

// copyDir copies the regular files of src into a new temporary directory.
func copyDir(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// TestCommit commits an overlay into its base, compared with what qemu-img
// commit makes of a copy, then with Keep, and into a base two levels down.
func TestCommit(t *testing.T) {
	requireQemu(t)
	noteLibrary()
	dir := t.TempDir()
	base, top, _, topData := commitChain(t, dir)
	theirs := copyDir(t, dir)
	mustQemuImg(t, "commit", "-f", "qcow2", filepath.Join(theirs, "top.qcow2"))

	var p progressLog
	if err := Commit(context.Background(), top, &CommitOptions{Progress: p.record}); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	p.check(t)
	compareRaw(t, base, topData)
	compareRaw(t, top, topData)
	qemuIdentical(t, base, "qcow2", filepath.Join(theirs, "base.qcow2"), "qcow2")
	checkClean(t, base)
	if c := getQemuCheck(t, top); c.AllocatedClusters != 0 {
		t.Errorf("the top still allocates %d clusters after Commit", c.AllocatedClusters)
	}

	// Keep: the top keeps its clusters.
	dir2 := t.TempDir()
	base2, top2, _, topData2 := commitChain(t, dir2)
	if err := Commit(context.Background(), top2, &CommitOptions{Keep: true}); err != nil {
		t.Fatal(err)
	}
	compareRaw(t, base2, topData2)
	compareRaw(t, top2, topData2)
	if c := getQemuCheck(t, top2); c.AllocatedClusters == 0 {
		t.Error("Keep: the top allocates nothing after Commit")
	}

	// base <- mid <- top, committed into base.
	dir3 := t.TempDir()
	base3, mid3, _, want := commitChain(t, dir3)
	top3 := filepath.Join(dir3, "top3.qcow2")
	if err := Create(top3, 0, &CreateOptions{BackingFile: "top.qcow2", BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	img := mustOpen(t, top3, nil)
	mustWrite(t, img, want, pattern(34, 9000), 4*mib-9000)
	mustClose(t, img)
	if err := Commit(context.Background(), top3, &CommitOptions{Base: base3}); err != nil {
		t.Fatal(err)
	}
	compareRaw(t, base3, want)
	compareRaw(t, top3, want)
	checkClean(t, mid3)

	// Errors: no backing file; a base outside the chain.
	wantErrno(t, Commit(context.Background(), base3, nil), "commit", syscall.EINVAL)
	other := mustCreate(t, "other.qcow2", 4*mib, nil)
	wantErrno(t, Commit(context.Background(), top3, &CommitOptions{Base: other}), "commit", syscall.EINVAL)
}

// TestRebase removes the backing file safely (the image then reads the same on
// its own), moves an image onto another base safely, and renames unsafely.
func TestRebase(t *testing.T) {
	requireQemu(t)
	noteLibrary()

	// Safe rebase onto no backing file.
	dir := t.TempDir()
	_, top, _, topData := commitChain(t, dir)
	var p progressLog
	if err := Rebase(context.Background(), top, "", &RebaseOptions{Progress: p.record}); err != nil {
		t.Fatalf("Rebase onto nothing: %v", err)
	}
	p.check(t)
	if qi := getQemuInfo(t, top); qi.BackingFilename != "" {
		t.Fatalf("backing file %q after rebasing onto nothing", qi.BackingFilename)
	}
	os.Remove(filepath.Join(dir, "base.qcow2")) // it must not be needed any more
	compareRaw(t, top, topData)
	checkClean(t, top)

	// Safe rebase onto another base (raw): the image reads the same.
	dir2 := t.TempDir()
	_, top2, _, topData2 := commitChain(t, dir2)
	other := filepath.Join(dir2, "other.raw")
	if err := os.WriteFile(other, pattern(40, 4*mib), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Rebase(context.Background(), top2, "other.raw", &RebaseOptions{BackingFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	qi := getQemuInfo(t, top2)
	if qi.BackingFilename != "other.raw" || qi.BackingFilenameFormat != "raw" {
		t.Fatalf("backing %q format %q, want other.raw / raw", qi.BackingFilename, qi.BackingFilenameFormat)
	}
	compareRaw(t, top2, topData2)
	checkClean(t, top2)

	// Unsafe: only the name changes, so the image now reads through the new file.
	dir3 := t.TempDir()
	base3, top3, baseData3, topData3 := commitChain(t, dir3)
	newBase := filepath.Join(dir3, "new.qcow2")
	if err := Convert(context.Background(), base3, newBase, nil); err != nil {
		t.Fatal(err)
	}
	nimg := mustOpen(t, newBase, nil)
	changed := append([]byte(nil), baseData3...)
	mustWrite(t, nimg, changed, pattern(41, 4096), 3*mib+200000) // where the top allocates nothing
	mustClose(t, nimg)
	if err := Rebase(context.Background(), top3, "new.qcow2", &RebaseOptions{Unsafe: true, BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	if qi := getQemuInfo(t, top3); qi.BackingFilename != "new.qcow2" {
		t.Fatalf("backing %q after the unsafe rebase, want new.qcow2", qi.BackingFilename)
	}
	want := append([]byte(nil), topData3...)
	copy(want[3*mib+200000:], changed[3*mib+200000:3*mib+200000+4096])
	compareRaw(t, top3, want)

	// Unsafe onto nothing: unallocated clusters read as zeros.
	if err := Rebase(context.Background(), top3, "", &RebaseOptions{Unsafe: true}); err != nil {
		t.Fatal(err)
	}
	img := mustOpen(t, top3, &OpenOptions{ReadOnly: true})
	mustReadEqual(t, img, make([]byte, 4096), 3*mib+200000)
	mustReadEqual(t, img, topData3[200000:350000], 200000)
	mustClose(t, img)

	wantErrno(t, Rebase(context.Background(), top3, "missing.qcow2", &RebaseOptions{BackingFormat: "qcow2"}),
		"rebase", syscall.ENOENT)
}

// TestCommitRebaseCancel cancels Commit and Rebase from their progress
// callbacks: the chain then reads as before, and the rebased image still names
// its backing file.
func TestCommitRebaseCancel(t *testing.T) {
	requireQemu(t)
	noteLibrary()
	dir := t.TempDir()
	base, top, _, topData := commitChain(t, dir)

	ctx, cancel := context.WithCancel(context.Background())
	err := Commit(ctx, top, &CommitOptions{Progress: func(done, total uint64) { cancel() }})
	wantCancelled(t, err, "commit", context.Canceled)
	compareRaw(t, top, topData)

	ctx, cancel = context.WithCancel(context.Background())
	err = Rebase(ctx, top, "", &RebaseOptions{Progress: func(done, total uint64) { cancel() }})
	wantCancelled(t, err, "rebase", context.Canceled)
	if qi := getQemuInfo(t, top); qi.BackingFilename != "base.qcow2" {
		t.Fatalf("backing %q after a cancelled rebase, want base.qcow2", qi.BackingFilename)
	}
	compareRaw(t, top, topData)
	checkClean(t, top)
	checkClean(t, base)

	// A context cancelled before the call changes nothing.
	err = Rebase(ctx, top, "", &RebaseOptions{Unsafe: true})
	wantCancelled(t, err, "rebase", context.Canceled)
	err = Commit(ctx, top, nil)
	wantCancelled(t, err, "commit", context.Canceled)
	if qi := getQemuInfo(t, top); qi.BackingFilename != "base.qcow2" {
		t.Fatalf("backing %q after refused calls", qi.BackingFilename)
	}
}
