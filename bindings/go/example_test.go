package cowdisk_test

import (
	"errors"
	"fmt"
	"io"
	"log"
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
