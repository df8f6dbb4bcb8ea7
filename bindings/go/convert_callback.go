package cowdisk

// The progress trampoline. cgo copies the preamble of a file with //export into
// two C files, so it may hold declarations only: the definitions that use the
// trampoline live in convert.go.

/*
#include <stdint.h>
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// cowdiskGoProgress is the cowdisk_progress_fn of every call made by
// runWithProgress. opaque points to C memory holding the cgo.Handle of the
// call's *progressCall. It runs on the thread that made the C call, so it never
// races that call's Go code; it must not let a panic unwind into C.
//
//export cowdiskGoProgress
func cowdiskGoProgress(opaque unsafe.Pointer, done, total C.uint64_t) C.int {
	p := cgo.Handle(*(*C.uintptr_t)(opaque)).Value().(*progressCall)
	if p.report(uint64(done), uint64(total)) {
		return 0
	}
	return 1
}
