package cowdisk_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"

	"cowdisk.dev/cowdisk"
)

func ExampleOpen() {
	if err := cowdisk.Create("disk.qcow2", 1<<30, nil); err != nil {
		log.Fatal(err)
	}
	img, err := cowdisk.Open("disk.qcow2", nil)
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt([]byte("hello"), 4096); err != nil {
		log.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := img.ReadAt(buf, 4096); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s\n", buf)
}

func ExampleImage_ReadAt() {
	img, err := cowdisk.Open("disk.qcow2", &cowdisk.OpenOptions{ReadOnly: true})
	if errors.Is(err, syscall.ENOENT) {
		log.Fatal("no such image")
	} else if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	// Stream the whole guest disk.
	n, err := io.Copy(io.Discard, io.NewSectionReader(img, 0, img.Size()))
	fmt.Println(n, err)
}

func ExampleConvert() {
	// Stop the copy on Ctrl-C: Convert then removes the half-made target.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	err := cowdisk.Convert(ctx, "disk.qcow2", "disk-compressed.qcow2", &cowdisk.ConvertOptions{
		Compressed: true,
		Create:     &cowdisk.CreateOptions{CompressionType: "zstd"},
		Progress: func(done, total uint64) {
			fmt.Fprintf(os.Stderr, "\r%3d%%", done*100/total)
		},
	})
	if errors.Is(err, context.Canceled) {
		log.Fatal("interrupted")
	} else if err != nil {
		log.Fatal(err)
	}
	identical, at, err := cowdisk.Compare("disk.qcow2", "disk-compressed.qcow2", nil)
	fmt.Println(identical, at, err)
}

func ExampleImage_DirtyExtents() {
	dir, err := os.MkdirTemp("", "cowdisk-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := dir + "/disk.qcow2"
	if err := cowdisk.Create(path, 16<<20, nil); err != nil {
		log.Fatal(err)
	}
	img, err := cowdisk.Open(path, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	// Start tracking writes (64 KiB per bit), then write 4 KiB at 1 MiB.
	if err := img.BitmapAdd("backup-1", 65536, true); err != nil {
		log.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, 4096), 1<<20); err != nil {
		log.Fatal(err)
	}
	// An incremental backup copies only the dirty runs.
	extents, err := img.DirtyExtents("backup-1", 0, img.Size())
	if err != nil {
		log.Fatal(err)
	}
	for _, e := range extents {
		if e.Dirty {
			fmt.Printf("dirty: %d bytes at %d\n", e.Length, e.Start)
		}
	}
	// Output:
	// dirty: 65536 bytes at 1048576
}
