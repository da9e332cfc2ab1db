# Sourced inside the guest before the v2 lane runs (tests/guest/test_v2_lane.py).
# It only works around limits of the user-mode-linux guest, never of cgprocfs.

# A disk-backed filesystem with writeback, so written files are page cache (file, dirty)
# rather than shmem as on the guest's tmpfs/overlay root. Its image lives on the host
# share (hostfs), not on tmpfs: the loop driver charges its backing writes to the writer's
# cgroup, and tmpfs pages there would be unreclaimable shmem.
busybox insmod "/lib/modules/$(uname -r)/kernel/drivers/block/loop.ko" 2>/dev/null || true
IMG="$(dirname "$GUEST_OUT")/scratch.img"
truncate -s 640M "$IMG"
mkfs.ext4 -q -F "$IMG"
mkdir -p /mnt/scratch
mount -o loop "$IMG" /mnt/scratch
export CGPROCFS_TEST_SCRATCH=/mnt/scratch

# UML's /proc/cpuinfo lacks "physical id"/"core id", without which procps 4 vmstat refuses
# to start ("Unable to create system stat structure"). Give it the fields.
awk '/^processor/ {print; print "physical id\t: 0"; print "core id\t\t: " $3; next} {print}' \
    /proc/cpuinfo > /run/cpuinfo
mount --bind /run/cpuinfo /proc/cpuinfo

export CGPROCFS_TEST_LOGDIR="$GUEST_OUT/daemon-logs"
mkdir -p "$CGPROCFS_TEST_LOGDIR"
