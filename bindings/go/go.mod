module cowdisk.dev/cowdisk

go 1.19
