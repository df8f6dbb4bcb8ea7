package cowdisk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

func TestVersion(t *testing.T) {
	noteLibrary()
	v := Version()
	if !regexp.MustCompile(`^\d+\.\d+\.\d+`).MatchString(v) {
		t.Fatalf("Version() = %q, want a semantic version", v)
	}
}

// TestRoundTrip writes at unaligned offsets spanning clusters, reads back before
// and after reopening, and has qemu-img check the image and compare it to a raw
// file with the same data.
func TestRoundTrip(t *testing.T) {
	configs := []*CreateOptions{
		nil,
		{Version: 3, ClusterSize: 512, RefcountBits: 1},
		{Version: 3, ClusterSize: 4096, RefcountBits: 64},
		{Version: 2, ClusterSize: 65536},
		{Version: 3, ClusterSize: 65536, LazyRefcounts: true},
		{Version: 3, ClusterSize: 2 << 20, RefcountBits: 8},
	}
	for i, opts := range configs {
		opts := opts
		seed := int64(i)
		t.Run(fmtOpts(opts), func(t *testing.T) {
			t.Parallel()
			cs := int64(65536)
			if opts != nil && opts.ClusterSize != 0 {
				cs = int64(opts.ClusterSize)
			}
			size := int64(6<<20) + 3*512 // not a multiple of the cluster size (sizes are multiples of 512)
			if cs > 1<<20 {
				size = 5*cs + 1536
			}
			path := mustCreate(t, "rt.qcow2", uint64(size), opts)
			img := mustOpen(t, path, nil)
			if img.Size() != size {
				t.Fatalf("Size() = %d, want %d", img.Size(), size)
			}
			model := make([]byte, size)

			// A fresh image reads as zeros.
			mustReadEqual(t, img, make([]byte, 3*cs+5), cs-3)

			type w struct{ off, n int64 }
			writes := []w{
				{0, 1}, {1, 510}, {511, 2}, {cs - 1, 2}, {cs - 7, cs + 14},
				{3*cs + 5, 2*cs + 3}, {100000, 200000}, {size - 1000, 1000},
				{size - 1, 1}, {2*cs + 1, cs - 2}, // fills a cluster's middle after COW of its ends
			}
			rng := rand.New(rand.NewSource(seed))
			for k := 0; k < 60; k++ {
				n := 1 + rng.Int63n(3*cs)
				writes = append(writes, w{rng.Int63n(size - n), n})
			}
			for k, wr := range writes {
				mustWrite(t, img, model, pattern(seed*1000+int64(k), int(wr.n)), wr.off)
				// Read back the written range plus a margin around it.
				lo, hi := wr.off-100, wr.off+wr.n+100
				if lo < 0 {
					lo = 0
				}
				if hi > size {
					hi = size
				}
				mustReadEqual(t, img, model[lo:hi], lo)
			}
			mustReadEqual(t, img, model, 0)
			for k := 0; k < 50; k++ {
				n := 1 + rng.Int63n(2*cs)
				off := rng.Int63n(size - n)
				mustReadEqual(t, img, model[off:off+n], off)
			}
			mustClose(t, img)

			img = mustOpen(t, path, &OpenOptions{ReadOnly: true})
			mustReadEqual(t, img, model, 0)
			mustClose(t, img)

			checkClean(t, path)
			compareRaw(t, path, model)
		})
	}
}

// TestConcurrentWrites has goroutines write disjoint, interleaved byte ranges
// (so that several goroutines write into the same new clusters at once), then
// verifies the result concurrently and with qemu-img.
func TestConcurrentWrites(t *testing.T) {
	const (
		size    = 4 << 20
		chunk   = 1000 // unaligned, so clusters are shared between goroutines
		workers = 8
	)
	path := mustCreate(t, "conc.qcow2", size, &CreateOptions{ClusterSize: 4096})
	img := mustOpen(t, path, nil)
	model := pattern(42, size)
	// Leave some holes: chunks whose index is a multiple of 7 are never written.
	for c := 0; c*chunk < size; c++ {
		if c%7 == 0 {
			end := (c + 1) * chunk
			if end > size {
				end = size
			}
			for i := c * chunk; i < end; i++ {
				model[i] = 0
			}
		}
	}

	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var mine []int
			for c := w; c*chunk < size; c += workers {
				if c%7 != 0 {
					mine = append(mine, c)
				}
			}
			rand.New(rand.NewSource(int64(w))).Shuffle(len(mine), func(i, j int) { mine[i], mine[j] = mine[j], mine[i] })
			buf := make([]byte, chunk)
			for _, c := range mine {
				off := c * chunk
				end := off + chunk
				if end > size {
					end = size
				}
				if _, err := img.WriteAt(model[off:end], int64(off)); err != nil {
					errs <- err
					return
				}
				// Read our own chunk back while the others keep writing.
				n, err := img.ReadAt(buf[:end-off], int64(off))
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf[:n], model[off:end]) {
					errs <- errors.New("chunk read back differs during concurrent writes")
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	// Verify concurrently, in slices.
	var rg sync.WaitGroup
	rerrs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		rg.Add(1)
		go func(w int) {
			defer rg.Done()
			part := size / workers
			got := make([]byte, part)
			if _, err := img.ReadAt(got, int64(w*part)); err != nil {
				rerrs <- err
				return
			}
			if i := firstDiff(got, model[w*part:(w+1)*part]); i >= 0 {
				rerrs <- errors.New("concurrent verify: data differs at guest offset " + strconv.Itoa(w*part+i))
			}
		}(w)
	}
	rg.Wait()
	close(rerrs)
	for err := range rerrs {
		t.Error(err)
	}
	mustReadEqual(t, img, model, 0)
	mustClose(t, img)
	checkClean(t, path)
	compareRaw(t, path, model)
}

func TestInfo(t *testing.T) {
	cases := []struct {
		opts *CreateOptions
		want Info
	}{
		{nil, Info{Version: 3, ClusterSize: 65536, RefcountBits: 16, CompressionType: "zlib"}},
		{&CreateOptions{Version: 2, ClusterSize: 4096}, Info{Version: 2, ClusterSize: 4096, RefcountBits: 16, CompressionType: "zlib"}},
		{&CreateOptions{Version: 3, ClusterSize: 512, RefcountBits: 4, LazyRefcounts: true},
			Info{Version: 3, ClusterSize: 512, RefcountBits: 4, LazyRefcounts: true, CompressionType: "zlib"}},
		{&CreateOptions{ClusterSize: 2 << 20, CompressionType: "zstd"},
			Info{Version: 3, ClusterSize: 2 << 20, RefcountBits: 16, CompressionType: "zstd"}},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(fmtOpts(tc.opts)+"-"+tc.want.CompressionType, func(t *testing.T) {
			const size = 10<<20 + 512
			path := mustCreate(t, "info.qcow2", size, tc.opts)
			img := mustOpen(t, path, nil)
			got, err := img.Info()
			if err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if got.HostSize == 0 || got.HostSize > uint64(st.Size())+uint64(got.ClusterSize) {
				t.Errorf("HostSize = %d, file size is %d", got.HostSize, st.Size())
			}
			want := tc.want
			want.VirtualSize = size
			want.HostSize = got.HostSize
			if got != want {
				t.Errorf("Info() =\n %+v\nwant\n %+v", got, want)
			}
			mustClose(t, img)

			// qemu-img agrees about the image cowdisk made.
			qi := getQemuInfo(t, path)
			compat := map[uint32]string{2: "0.10", 3: "1.1"}[want.Version]
			if qi.VirtualSize != size || qi.ClusterSize != want.ClusterSize ||
				qi.FormatSpecific.Data.Compat != compat ||
				qi.FormatSpecific.Data.RefcountBits != want.RefcountBits ||
				qi.FormatSpecific.Data.LazyRefcounts != want.LazyRefcounts ||
				(want.Version == 3 && qi.FormatSpecific.Data.CompressionType != want.CompressionType) {
				t.Errorf("qemu-img info disagrees: %+v, want %+v", qi, want)
			}
			checkClean(t, path)

			ro := mustOpen(t, path, &OpenOptions{ReadOnly: true})
			gotRO, err := ro.Info()
			if err != nil {
				t.Fatal(err)
			}
			if !gotRO.ReadOnly || gotRO.Dirty || gotRO.Corrupt {
				t.Errorf("read-only Info() = %+v, want ReadOnly and neither dirty nor corrupt", gotRO)
			}
		})
	}
}

// TestDirtyAndCorruptFlags checks Info's Dirty and Corrupt flags against the
// header's incompatible feature bits (0 = dirty, 1 = corrupt), set by hand.
func TestDirtyAndCorruptFlags(t *testing.T) {
	path := mustCreate(t, "flags.qcow2", 1<<20, &CreateOptions{LazyRefcounts: true})
	img := mustOpen(t, path, nil)
	model := make([]byte, 1<<20)
	mustWrite(t, img, model, pattern(1, 5000), 70000)
	mustClose(t, img)
	checkClean(t, path)

	setBits := func(bits byte) {
		t.Helper()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// incompatible_features: bytes 72..79, big-endian; bits 0 and 1 live in byte 79.
		b := make([]byte, 1)
		if _, err := f.ReadAt(b, 79); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte{b[0]&^3 | bits}, 79); err != nil {
			t.Fatal(err)
		}
	}
	flags := func() Info {
		t.Helper()
		img := mustOpen(t, path, &OpenOptions{ReadOnly: true})
		defer img.Close()
		info, err := img.Info()
		if err != nil {
			t.Fatal(err)
		}
		mustReadEqual(t, img, model, 0)
		return info
	}

	if info := flags(); info.Dirty || info.Corrupt || !info.LazyRefcounts {
		t.Errorf("clean image: Info() = %+v", info)
	}

	setBits(1)
	if info := flags(); !info.Dirty || info.Corrupt {
		t.Errorf("dirty bit set: Info() = %+v, want Dirty only", info)
	}
	// Read-write: the library either refuses or repairs; a repaired image is clean.
	if img, err := Open(path, nil); err != nil {
		var ce *Error
		if !errors.As(err, &ce) || ce.Msg == "" {
			t.Errorf("read-write open of a dirty image: %v", err)
		}
		t.Logf("read-write open of a dirty image refused: %v", err)
	} else {
		mustClose(t, img)
		checkClean(t, path)
	}

	setBits(2)
	if info := flags(); info.Dirty || !info.Corrupt {
		t.Errorf("corrupt bit set: Info() = %+v, want Corrupt only", info)
	}
	if img, err := Open(path, nil); err == nil {
		img.Close()
		t.Errorf("read-write open of an image marked corrupt succeeded")
	} else {
		t.Logf("expected error: %v", err)
	}
}

// TestBackingFile checks an overlay over a qcow2 base: Info, reads falling through
// to the base, writes landing in the overlay only, NoBacking and qemu-img's view.
func TestBackingFile(t *testing.T) {
	dir := t.TempDir()
	const size = 3<<20 + 4096
	base := filepath.Join(dir, "base.qcow2")
	if err := Create(base, size, &CreateOptions{ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	baseData := make([]byte, size)
	bimg := mustOpen(t, base, nil)
	mustWrite(t, bimg, baseData, pattern(1, 1<<20), 12345)
	mustWrite(t, bimg, baseData, pattern(2, 5000), size-5000)
	mustClose(t, bimg)

	overlay := filepath.Join(dir, "overlay.qcow2")
	// Size 0: take the backing file's size. Relative name: resolved next to the overlay.
	err := Create(overlay, 0, &CreateOptions{BackingFile: "base.qcow2", BackingFormat: "qcow2", ClusterSize: 65536})
	if err != nil {
		t.Fatal(err)
	}
	img := mustOpen(t, overlay, nil)
	info, err := img.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.BackingFile != "base.qcow2" || info.BackingFormat != "qcow2" || info.BackingDepth != 1 ||
		info.VirtualSize != size || img.Size() != size {
		t.Errorf("overlay Info() = %+v, Size() = %d; want backing base.qcow2/qcow2, depth 1, size %d",
			info, img.Size(), size)
	}
	mustReadEqual(t, img, baseData, 0)

	model := append([]byte(nil), baseData...)
	// Partial-cluster writes over backed data: the rest of the cluster must be copied from the base.
	mustWrite(t, img, model, pattern(3, 100), 12345+70000)
	mustWrite(t, img, model, pattern(4, 200000), 500000)
	mustWrite(t, img, model, pattern(5, 10), size-10)
	mustReadEqual(t, img, model, 0)
	mustClose(t, img)

	// The base is untouched.
	compareRaw(t, base, baseData)
	checkClean(t, base)
	checkClean(t, overlay)
	compareRaw(t, overlay, model)
	qi := getQemuInfo(t, overlay)
	if qi.BackingFilename != "base.qcow2" || qi.BackingFilenameFormat != "qcow2" {
		t.Errorf("qemu-img info: backing %q format %q", qi.BackingFilename, qi.BackingFilenameFormat)
	}

	// NoBacking: allocated clusters read fine; unallocated ones fail with ENOTSUP.
	nb := mustOpen(t, overlay, &OpenOptions{NoBacking: true, ReadOnly: true})
	nbInfo, err := nb.Info()
	if err != nil {
		t.Fatal(err)
	}
	if nbInfo.BackingDepth != 0 || nbInfo.BackingFile != "base.qcow2" {
		t.Errorf("NoBacking Info() = %+v, want depth 0 and the stored backing name", nbInfo)
	}
	mustReadEqual(t, nb, model[500000:700000], 500000)
	_, err = nb.ReadAt(make([]byte, 4096), 2<<20)
	wantErrno(t, err, "read", syscall.ENOTSUP)

	// A backing chain deeper than MaxBackingDepth is refused; a sufficient limit works.
	top := filepath.Join(dir, "top.qcow2")
	if err := Create(top, 0, &CreateOptions{BackingFile: overlay, BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	if img, err := Open(top, &OpenOptions{MaxBackingDepth: 1}); err == nil {
		img.Close()
		t.Errorf("Open with MaxBackingDepth 1 of a 2-deep chain succeeded")
	} else {
		t.Logf("expected error: %v", err)
	}
	timg := mustOpen(t, top, &OpenOptions{MaxBackingDepth: 2, ReadOnly: true})
	tinfo, err := timg.Info()
	if err != nil {
		t.Fatal(err)
	}
	if tinfo.BackingDepth != 2 || tinfo.BackingFile != overlay {
		t.Errorf("top Info() = %+v, want depth 2, backing %q", tinfo, overlay)
	}
	mustReadEqual(t, timg, model, 0)
}

// TestRawBacking uses a raw backing file.
func TestRawBacking(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	raw := filepath.Join(dir, "base.raw")
	data := pattern(9, size)
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "ov.qcow2")
	if err := Create(overlay, 0, &CreateOptions{BackingFile: raw, BackingFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	img := mustOpen(t, overlay, nil)
	if img.Size() != size {
		t.Fatalf("Size() = %d, want the raw backing file's %d", img.Size(), size)
	}
	mustReadEqual(t, img, data, 0)
	model := append([]byte(nil), data...)
	mustWrite(t, img, model, []byte("hello"), 70000)
	mustReadEqual(t, img, model, 0)
	mustClose(t, img)
	checkClean(t, overlay)
	compareRaw(t, overlay, model)
}

func TestReadOnly(t *testing.T) {
	path := mustCreate(t, "ro.qcow2", 1<<20, nil)
	img := mustOpen(t, path, nil)
	model := make([]byte, 1<<20)
	mustWrite(t, img, model, pattern(1, 3000), 4000)
	mustClose(t, img)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	ro := mustOpen(t, path, &OpenOptions{ReadOnly: true})
	n, err := ro.WriteAt([]byte("x"), 0)
	ce := wantErrno(t, err, "write", syscall.EROFS)
	if n != 0 || ce.Path != path {
		t.Errorf("WriteAt on read-only = %d, path %q", n, ce.Path)
	}
	if !strings.Contains(err.Error(), path) {
		t.Errorf("error text %q does not name the path", err.Error())
	}
	mustReadEqual(t, ro, model, 0)
	if err := ro.Flush(); err != nil {
		t.Errorf("Flush of a read-only image: %v", err)
	}
	mustClose(t, ro)

	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("opening read-only and closing changed the image file")
	}
}

func TestOpenErrors(t *testing.T) {
	noteLibrary()
	dir := t.TempDir()

	t.Run("nonexistent", func(t *testing.T) {
		p := filepath.Join(dir, "missing.qcow2")
		img, err := Open(p, nil)
		if img != nil {
			t.Errorf("Open returned an image with error %v", err)
		}
		ce := wantErrno(t, err, "open", syscall.ENOENT)
		if !errors.Is(err, fs.ErrNotExist) || ce.Path != p || !strings.Contains(err.Error(), p) {
			t.Errorf("error %v: want fs.ErrNotExist and path %q", err, p)
		}
	})

	t.Run("not-qcow2", func(t *testing.T) {
		p := filepath.Join(dir, "text.img")
		if err := os.WriteFile(p, bytes.Repeat([]byte("this is not a qcow2 image\n"), 1000), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := Open(p, nil)
		ce := wantErrno(t, err, "open", syscall.EINVAL)
		if !strings.Contains(strings.ToLower(ce.Msg), "qcow") {
			t.Errorf("message %q does not say the file is not qcow2", ce.Msg)
		}
	})

	t.Run("empty-file", func(t *testing.T) {
		p := filepath.Join(dir, "empty.img")
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := Open(p, nil)
		wantErrno(t, err, "open", syscall.EINVAL)
	})

	t.Run("nul-in-path", func(t *testing.T) {
		_, err := Open("a\x00b", nil)
		wantErrno(t, err, "open", syscall.EINVAL)
	})
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "exists.qcow2")
	if err := Create(existing, 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(existing)
	wantErrno(t, Create(existing, 1<<20, nil), "create", syscall.EEXIST)
	if after, _ := os.ReadFile(existing); !bytes.Equal(before, after) {
		t.Errorf("failed Create changed the existing file")
	}

	bad := []*CreateOptions{
		{ClusterSize: 1000},
		{ClusterSize: 256},
		{ClusterSize: 4 << 20},
		{RefcountBits: 3},
		{RefcountBits: 128},
		{Version: 4},
		{Version: 1},
		{Version: 2, RefcountBits: 8},
		{Version: 2, LazyRefcounts: true},
		{Version: 2, CompressionType: "zstd"},
		{CompressionType: "lz4"},
		{BackingFile: "x\x00y"},
	}
	for i, o := range bad {
		p := filepath.Join(dir, "bad"+strconv.Itoa(i)+".qcow2")
		err := Create(p, 1<<20, o)
		if err == nil {
			t.Errorf("Create with %+v succeeded", *o)
			continue
		}
		if !errors.Is(err, syscall.EINVAL) {
			t.Errorf("Create with %+v: %v, want EINVAL", *o, err)
		} else {
			t.Logf("expected error for %+v: %v", *o, err)
		}
		if _, serr := os.Stat(p); serr == nil {
			t.Errorf("failed Create with %+v left a file behind", *o)
		}
	}

	wantErrno(t, Create(filepath.Join(dir, "no", "such", "dir.qcow2"), 1<<20, nil), "create", syscall.ENOENT)
	wantErrno(t, Create(filepath.Join(dir, "backed.qcow2"), 0,
		&CreateOptions{BackingFile: filepath.Join(dir, "missing-base.qcow2")}), "create", syscall.ENOENT)
}

// TestOutOfRange checks the end-of-disk rules of ReadAt and WriteAt.
func TestOutOfRange(t *testing.T) {
	const size = 1<<20 + 512
	path := mustCreate(t, "oor.qcow2", size, nil)
	img := mustOpen(t, path, nil)
	model := make([]byte, size)
	mustWrite(t, img, model, pattern(7, 300), size-300)

	// Writes crossing or past the end fail with EINVAL and change nothing.
	for _, off := range []int64{size - 10, size, size + 1, 1 << 40} {
		n, err := img.WriteAt(make([]byte, 20), off)
		if n != 0 {
			t.Errorf("WriteAt(20, %d) = %d, want 0", off, n)
		}
		wantErrno(t, err, "write", syscall.EINVAL)
	}
	n, err := img.WriteAt([]byte("x"), -1)
	if n != 0 {
		t.Errorf("WriteAt at -1 = %d", n)
	}
	wantErrno(t, err, "write", syscall.EINVAL)
	mustReadEqual(t, img, model, 0)

	// Reads: negative offset is EINVAL; at or past the end io.EOF; crossing the end
	// gives the bytes before the end and io.EOF.
	_, err = img.ReadAt(make([]byte, 1), -5)
	wantErrno(t, err, "read", syscall.EINVAL)
	for _, off := range []int64{size, size + 1, 1 << 50} {
		n, err := img.ReadAt(make([]byte, 10), off)
		if n != 0 || err != io.EOF {
			t.Errorf("ReadAt(10, %d) = %d, %v; want 0, io.EOF", off, n, err)
		}
	}
	buf := make([]byte, 500)
	n, err = img.ReadAt(buf, size-200)
	if n != 200 || err != io.EOF || !bytes.Equal(buf[:200], model[size-200:]) {
		t.Errorf("ReadAt crossing the end = %d, %v (data equal: %v); want 200, io.EOF",
			n, err, bytes.Equal(buf[:200], model[size-200:]))
	}
	if n, err := img.ReadAt(nil, size+10); n != 0 || err != nil {
		t.Errorf("empty ReadAt = %d, %v; want 0, nil", n, err)
	}
	if n, err := img.WriteAt(nil, 0); n != 0 || err != nil {
		t.Errorf("empty WriteAt = %d, %v; want 0, nil", n, err)
	}

	// io.SectionReader over the whole disk reads everything.
	all, err := io.ReadAll(io.NewSectionReader(img, 0, img.Size()))
	if err != nil || !bytes.Equal(all, model) {
		t.Errorf("io.ReadAll(SectionReader) = %d bytes, %v; want the %d-byte model", len(all), err, len(model))
	}
	mustClose(t, img)
	checkClean(t, path)
	compareRaw(t, path, model)
}

// TestTruncatedImage cuts image files short: open or I/O must fail with a clear
// error, never crash or return wrong data silently.
func TestTruncatedImage(t *testing.T) {
	const cs = 4096
	build := func(t *testing.T) (string, []byte) {
		path := mustCreate(t, "trunc.qcow2", 1<<20, &CreateOptions{ClusterSize: cs})
		img := mustOpen(t, path, nil)
		model := make([]byte, 1<<20)
		mustWrite(t, img, model, pattern(1, 3*cs), 10*cs)
		mustWrite(t, img, model, pattern(2, cs), 200*cs) // written last: last cluster of the file
		mustClose(t, img)
		return path, model
	}
	header := func(t *testing.T, path string) (l1, rt uint64) {
		b, err := os.ReadFile(path)
		if err != nil || len(b) < 72 {
			t.Fatalf("reading header: %v", err)
		}
		return binary.BigEndian.Uint64(b[40:48]), binary.BigEndian.Uint64(b[48:56])
	}

	t.Run("inside-header", func(t *testing.T) {
		path, _ := build(t)
		if err := os.Truncate(path, 50); err != nil {
			t.Fatal(err)
		}
		img, err := Open(path, nil)
		if err == nil {
			img.Close()
			t.Fatal("Open of an image truncated inside its header succeeded")
		}
		if !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.EIO) {
			t.Errorf("Open: %v, want EINVAL or EIO", err)
		}
		t.Logf("expected error: %v", err)
	})

	t.Run("metadata-missing", func(t *testing.T) {
		path, _ := build(t)
		l1, rt := header(t, path)
		cut := l1
		if rt < cut {
			cut = rt
		}
		if err := os.Truncate(path, int64(cut)); err != nil {
			t.Fatal(err)
		}
		img, err := Open(path, nil)
		if err == nil {
			img.Close()
			t.Fatalf("Open of an image cut at %#x (L1 at %#x, refcount table at %#x) succeeded", cut, l1, rt)
		}
		wantErrno(t, err, "open", syscall.EIO)
	})

	t.Run("data-missing", func(t *testing.T) {
		path, model := build(t)
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, st.Size()-cs); err != nil {
			t.Fatal(err)
		}
		img, err := Open(path, &OpenOptions{ReadOnly: true})
		if err != nil {
			t.Logf("Open refused the truncated image: %v", err)
			if !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.EINVAL) {
				t.Errorf("Open: %v, want EIO or EINVAL", err)
			}
			return
		}
		defer img.Close()
		// The first data range is intact.
		mustReadEqual(t, img, model[10*cs:13*cs], 10*cs)
		// The cluster whose data was cut off must not read back as anything but an error.
		buf := make([]byte, cs)
		_, err = img.ReadAt(buf, 200*cs)
		if err == nil {
			t.Fatalf("reading a cluster mapped beyond the end of the file succeeded (data equal: %v, all zero: %v)",
				bytes.Equal(buf, model[200*cs:201*cs]), bytes.Equal(buf, make([]byte, cs)))
		}
		wantErrno(t, err, "read", syscall.EIO)
	})
}

// TestClosed checks Close's idempotence and that use after Close is an error.
func TestClosed(t *testing.T) {
	path := mustCreate(t, "closed.qcow2", 1<<20, nil)
	img, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	if err := img.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	check := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, ErrClosed) || !errors.Is(err, syscall.EBADF) {
			t.Errorf("%s after Close: %v, want ErrClosed", what, err)
		}
	}
	_, err = img.ReadAt(make([]byte, 10), 0)
	check("ReadAt", err)
	_, err = img.ReadAt(make([]byte, 10), 1<<30)
	check("ReadAt past end", err)
	_, err = img.ReadAt(nil, 0)
	check("empty ReadAt", err)
	_, err = img.WriteAt(make([]byte, 10), 0)
	check("WriteAt", err)
	check("Flush", img.Flush())
	_, err = img.Info()
	check("Info", err)
	if img.Size() != 1<<20 {
		t.Errorf("Size() after Close = %d", img.Size())
	}
	checkClean(t, path)
}

// TestCloseRace closes an image while goroutines are reading and writing it: each
// call either completes or reports ErrClosed.
func TestCloseRace(t *testing.T) {
	path := mustCreate(t, "race.qcow2", 1<<20, &CreateOptions{ClusterSize: 4096})
	img, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	start := make(chan struct{})
	var mu sync.Mutex
	var unexpected []error
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			buf := make([]byte, 777)
			<-start
			for i := 0; ; i++ {
				off := int64((g*100 + i) % 1000 * 1000)
				var err error
				if g%2 == 0 {
					_, err = img.WriteAt(buf, off)
				} else {
					_, err = img.ReadAt(buf, off)
				}
				if errors.Is(err, ErrClosed) {
					return
				}
				if err != nil {
					mu.Lock()
					unexpected = append(unexpected, err)
					mu.Unlock()
					return
				}
			}
		}(g)
	}
	close(start)
	if _, err := img.WriteAt([]byte("before close"), 5); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	wg.Wait()
	for _, err := range unexpected {
		t.Errorf("unexpected error: %v", err)
	}
	checkClean(t, path)
}

// TestFlushDurable checks that after Flush, another reader (qemu-img) sees the data
// while the image is still open.
func TestFlushDurable(t *testing.T) {
	requireQemu(t)
	path := mustCreate(t, "flush.qcow2", 2<<20, nil)
	img := mustOpen(t, path, nil)
	model := make([]byte, 2<<20)
	mustWrite(t, img, model, pattern(3, 300000), 654321)
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	compareRaw(t, path, model, "-U")
	mustClose(t, img)
	checkClean(t, path)
}

// TestReadQemuImages reads images written by qemu-img: v2, small clusters and
// compressed clusters (zlib and zstd).
func TestReadQemuImages(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	const size = 3 << 20
	data := make([]byte, size)
	copy(data[100:], pattern(1, 200000))
	copy(data[1<<20:], bytes.Repeat([]byte("compressible "), 40000))
	copy(data[size-1000:], pattern(2, 1000))
	raw := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := map[string][]string{
		"v2":   {"-o", "compat=0.10"},
		"cs4k": {"-o", "cluster_size=4096,refcount_bits=1"},
		"zlib": {"-c", "-o", "compression_type=zlib"},
		"zstd": {"-c", "-o", "compression_type=zstd"},
	}
	for name, args := range cases {
		q := filepath.Join(dir, name+".qcow2")
		cmd := append([]string{"convert", "-f", "raw", "-O", "qcow2"}, args...)
		out, code := qemuImg(t, append(cmd, raw, q)...)
		if code != 0 {
			if name == "zstd" {
				t.Logf("qemu-img cannot make zstd images here: %s", out)
				continue
			}
			t.Fatalf("qemu-img %v: %s", cmd, out)
		}
		t.Run(name, func(t *testing.T) {
			img := mustOpen(t, q, &OpenOptions{ReadOnly: true})
			mustReadEqual(t, img, data, 0)
			mustReadEqual(t, img, data[1<<20+7:1<<20+99999], 1<<20+7)
		})
	}
}

// TestSnapshotCount checks Info().NbSnapshots on an image with internal snapshots
// made by qemu-img, and that reads see the current (not the snapshot's) data.
func TestSnapshotCount(t *testing.T) {
	requireQemu(t)
	path := mustCreate(t, "snap.qcow2", 1<<20, nil)
	img := mustOpen(t, path, nil)
	old := make([]byte, 1<<20)
	mustWrite(t, img, old, pattern(1, 4000), 1000)
	mustClose(t, img)
	for _, name := range []string{"one", "two"} {
		if out, code := qemuImg(t, "snapshot", "-c", name, path); code != 0 {
			t.Fatalf("qemu-img snapshot -c %s: %s", name, out)
		}
	}
	img = mustOpen(t, path, nil)
	info, err := img.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.NbSnapshots != 2 {
		t.Errorf("NbSnapshots = %d, want 2", info.NbSnapshots)
	}
	cur := append([]byte(nil), old...)
	mustWrite(t, img, cur, pattern(2, 100), 2000) // COW of a cluster shared with the snapshots
	mustReadEqual(t, img, cur, 0)
	mustClose(t, img)
	checkClean(t, path)
	compareRaw(t, path, cur)
	// The snapshot still holds the old data.
	snapRaw := filepath.Join(t.TempDir(), "snap.raw")
	if out, code := qemuImg(t, "convert", "-l", "snapshot.name=one", "-O", "raw", path, snapRaw); code != 0 {
		t.Fatalf("qemu-img convert -l: %s", out)
	}
	got, err := os.ReadFile(snapRaw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, old) {
		t.Errorf("snapshot 'one' changed after writing to the active image")
	}
}

// TestDirect opens with O_DIRECT and does unaligned I/O through it.
func TestDirect(t *testing.T) {
	dir := t.TempDir()
	probe := filepath.Join(dir, "probe")
	if f, err := os.OpenFile(probe, os.O_CREATE|os.O_RDWR|syscall.O_DIRECT, 0o644); err != nil {
		t.Skipf("file system of %s does not support O_DIRECT: %v", dir, err)
	} else {
		f.Close()
	}
	path := filepath.Join(dir, "direct.qcow2")
	if err := Create(path, 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	img := mustOpen(t, path, &OpenOptions{Direct: true})
	model := make([]byte, 1<<20)
	mustWrite(t, img, model, pattern(5, 100001), 333)
	mustReadEqual(t, img, model, 0)
	mustClose(t, img)
	checkClean(t, path)
	compareRaw(t, path, model)
}

// TestL2CacheSize uses a tiny L2 cache so tables get evicted and re-read.
func TestL2CacheSize(t *testing.T) {
	const size = 64 << 20
	path := mustCreate(t, "l2.qcow2", size, &CreateOptions{ClusterSize: 512})
	img := mustOpen(t, path, &OpenOptions{L2CacheSize: 2048})
	model := make([]byte, size)
	rng := rand.New(rand.NewSource(11))
	for i := 0; i < 200; i++ {
		off := rng.Int63n(size - 2000)
		mustWrite(t, img, model, pattern(int64(i), 1+rng.Intn(1999)), off)
	}
	mustReadEqual(t, img, model, 0)
	mustClose(t, img)
	checkClean(t, path)
	compareRaw(t, path, model)
}

func TestErrorFormatting(t *testing.T) {
	e := &Error{Op: "read", Path: "/x.qcow2", Errno: syscall.EINVAL,
		Msg: "cowdisk_pread: invalid argument: range 10+20 is beyond the end"}
	if got, want := e.Error(), "cowdisk read /x.qcow2: invalid argument: range 10+20 is beyond the end"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(e, syscall.EINVAL) || errors.Is(e, ErrClosed) {
		t.Errorf("errors.Is misbehaves for %v", e)
	}
	e = &Error{Op: "flush", Errno: syscall.EIO}
	if got := e.Error(); got != "cowdisk flush: "+syscall.EIO.Error() {
		t.Errorf("Error() without message = %q", got)
	}
	var target *Error
	wrapped := fmt.Errorf("context: %w", e)
	if !errors.As(wrapped, &target) || target != e {
		t.Errorf("errors.As through wrapping failed")
	}
}

// TestLocking: a second writer is refused with EBUSY, a sharing reader is not, and
// NoLock takes no locks.
func TestLocking(t *testing.T) {
	path := mustCreate(t, "lock.qcow2", 4*mib, nil)
	img := mustOpen(t, path, nil)
	if _, err := Open(path, nil); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("second writer: got %v, want EBUSY", err)
	}
	if _, err := Open(path, &OpenOptions{ReadOnly: true}); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("reader beside a writer: got %v, want EBUSY", err)
	}
	r := mustOpen(t, path, &OpenOptions{ReadOnly: true, ForceShare: true})
	mustClose(t, r)
	u := mustOpen(t, path, &OpenOptions{NoLock: true})
	mustClose(t, u)
	if _, err := Open(path, &OpenOptions{ForceShare: true}); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("ForceShare without ReadOnly: got %v, want EINVAL", err)
	}
	mustClose(t, img)
	mustClose(t, mustOpen(t, path, nil))
}

// TestCheck: a written image checks clean, with its allocation counted.
func TestCheck(t *testing.T) {
	path := mustCreate(t, "check.qcow2", 4*mib, nil)
	img := mustOpen(t, path, nil)
	if _, err := img.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	r, err := img.Check(RepairNone)
	if err != nil {
		t.Fatal(err)
	}
	if r.Corruptions != 0 || r.Leaks != 0 || r.AllocatedClusters != 1 {
		t.Fatalf("check: %+v", r)
	}
	if _, err := img.Check(RepairAll); err != nil {
		t.Fatal(err)
	}
	if err := img.Amend(AmendOptions{RefcountBits: 8}); err != nil {
		t.Fatal(err)
	}
	if info, err := img.Info(); err != nil || info.RefcountBits != 8 {
		t.Fatalf("after amend: %+v, %v", info, err)
	}
	if err := img.Amend(AmendOptions{Version: 2}); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("compat 0.10 with 8-bit refcounts: %v", err)
	}
	mustClose(t, img)
}
