#!/bin/busybox sh
# /init of the guest tools/hw-kvm-test.sh boots under QEMU TCG (an emulated AMD CPU with
# SVM and nested paging): load kvm_amd, run the suite against /dev/kvm, send the store it
# made back over the serial console, power off. Everything it prints goes to ttyS0.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
dmesg -n 1
ip link set lo up
echo "=== hw-kvm guest: /init at $(cut -d' ' -f1 /proc/uptime) s of uptime"
echo "cpu:$(grep -m1 vendor_id /proc/cpuinfo | cut -d: -f2),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "cpu flags: $(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -xE 'svm|npt|nrip_save|sse4_2|popcnt|avx|avx2|xsave' | tr '\n' ' ')"
while read -r m; do
	insmod "/lib/modules/$m" || echo "insmod $m FAILED"
done </lib/modules/order
[ -e /dev/kvm ] || mknod /dev/kvm c 10 232
dmesg | grep -iE 'svm|kvm' | tail -n 5
for p in npt nested; do
	[ -e "/sys/module/kvm_amd/parameters/$p" ] && echo "kvm_amd.$p=$(cat "/sys/module/kvm_amd/parameters/$p")"
done
echo "=== suite at $(cut -d' ' -f1 /proc/uptime) s"
cd /repo || exit 1
set -a
. /env
set +a
VMM=/bin/vmm VMM_STORE_BIN=/bin/vmm-store HW_SUITE_WORK=/tmp/suite sh tools/hw-kvm/suite.sh check /expect
echo "=== suite done at $(cut -d' ' -f1 /proc/uptime) s"
if [ -s /tmp/suite/guest.export ]; then
	echo "=== BEGIN guest-store $(sha256sum </tmp/suite/guest.export | cut -d' ' -f1)"
	gzip -c /tmp/suite/guest.export | base64
	echo "=== END guest-store"
fi
echo "=== poweroff at $(cut -d' ' -f1 /proc/uptime) s"
poweroff -f
