//go:build cowdisk_repo || cowdisk_repo_shared

package cowdisk

/*
#ifndef COWDISK_LIB_ID
#define COWDISK_LIB_ID ""
#endif
#define COWDISK_STR2(x) #x
#define COWDISK_STR(x) COWDISK_STR2(x)
static const char *cowdisk_go_lib_id(void) {
    const char *id = COWDISK_STR(COWDISK_LIB_ID);
    return id;
}
*/
import "C"

// linkedLibraryID is the COWDISK_LIB_ID this package was compiled with: the SHA-256
// of the in-repository library it links (set by `make test-go`), or "" without it.
func linkedLibraryID() string {
	id := C.GoString(C.cowdisk_go_lib_id())
	if id == `""` {
		return ""
	}
	return id
}
