// A program outside the repository that uses the Go binding against an installed
// libcowdisk (found with pkg-config): scripts/test-install.sh builds and runs it.
package main

import (
	"bytes"
	"fmt"
	"os"

	"cowdisk.dev/cowdisk"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: goprog IMAGE")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "goprog:", err)
		os.Exit(1)
	}
}

func run(path string) error {
	if err := cowdisk.Create(path, 16<<20, nil); err != nil {
		return err
	}
	img, err := cowdisk.Open(path, nil)
	if err != nil {
		return err
	}
	want := bytes.Repeat([]byte("installed"), 1000)
	if _, err := img.WriteAt(want, 1<<20); err != nil {
		img.Close()
		return err
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 1<<20); err != nil {
		img.Close()
		return err
	}
	if !bytes.Equal(got, want) {
		img.Close()
		return fmt.Errorf("read back other bytes than were written")
	}
	if err := img.Close(); err != nil {
		return err
	}
	fmt.Printf("go program with libcowdisk %s: ok\n", cowdisk.Version())
	return nil
}
