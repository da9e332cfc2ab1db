# Sourced inside the guest before the v2 lane runs (tests/guest/test_v2_lane.py).
# It only works around limits of the user-mode-linux guest, never of cgprocfs.

# A disk-backed filesystem with writeback, so written files are page cache (file, dirty)
# rather than shmem as on the guest's tmpfs/overlay root.
busybox insmod "/lib/modules/$(uname -r)/kernel/drivers/block/loop.ko" 2>/dev/null || true
truncate -s 640M /tmp/scratch.img
mkfs.ext4 -q -F /tmp/scratch.img
mkdir -p /mnt/scratch
mount -o loop /tmp/scratch.img /mnt/scratch
export CGPROCFS_TEST_SCRATCH=/mnt/scratch

# UML's /proc/cpuinfo lacks "physical id"/"core id", without which procps 4 vmstat refuses
# to start ("Unable to create system stat structure"). Give it the fields.
awk '/^processor/ {print; print "physical id\t: 0"; print "core id\t\t: " $3; next} {print}' \
    /proc/cpuinfo > /run/cpuinfo
mount --bind /run/cpuinfo /proc/cpuinfo

export CGPROCFS_TEST_LOGDIR="$GUEST_OUT/daemon-logs"
mkdir -p "$CGPROCFS_TEST_LOGDIR"
