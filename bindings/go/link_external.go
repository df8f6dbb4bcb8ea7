//go:build cowdisk_external

package cowdisk

// With `-tags cowdisk_external`: link an installed libcowdisk with plain -lcowdisk.
// Point the toolchain at it with CGO_CFLAGS (for cowdisk.h) and CGO_LDFLAGS (for
// the library), e.g. CGO_LDFLAGS="-L/usr/local/lib".

/*
#cgo LDFLAGS: -lcowdisk
*/
import "C"
