#!/bin/sh
# /init of the shardswitch test guest (busybox sh, built by tests/guest/image.py).
#
# Theory of operation: the kernel runs this as PID 1 with stdio on /dev/console
# (console=ttyS0, so everything printed here reaches the host's serial log).
# We mount the pseudo file systems, load the virtio(-net) modules in the order
# listed in /etc/ss-modules, bring lo (and eth0, when a virtio-net device
# exists) up, then run the test's script:
#   * normally it arrives base64-encoded on the kernel command line as
#     ss_script=<base64>; the kernel hands unknown key=value words to /init as
#     environment variables;
#   * a script too long for the command line comes as the QEMU fw_cfg blob
#     opt/shardswitch/script instead (read through the qemu_fw_cfg module).
# The host harness (tests/guest/vm.py) waits for these lines on the serial log:
#   SS-BEGIN          the script starts (its output follows)
#   SS-EXIT <rc>      the script's exit status; the guest powers off right after
# and the dhcp helper's event script prints SS-LEASE / SS-LEASE-FAIL lines.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || echo "SS-WARN insmod $mod failed"
done < /etc/ss-modules

ip link set lo up

# A virtio device with device id 1 is a network card: wait (up to 10 s) for
# virtio_net to register eth0, then bring it up.
has_virtio_net() {
    for id in /sys/bus/virtio/devices/*/device; do
        [ "$(cat "$id" 2>/dev/null)" = "0x0001" ] && return 0
    done
    return 1
}
if has_virtio_net; then
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
fi
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
fi

FWCFG_SCRIPT=/sys/firmware/qemu_fw_cfg/by_name/opt/shardswitch/script/raw
if [ -n "$ss_script" ]; then
    echo "$ss_script" | base64 -d > /tmp/ss-script
elif [ -r "$FWCFG_SCRIPT" ]; then
    cat "$FWCFG_SCRIPT" > /tmp/ss-script
else
    printf 'echo "SS-ERROR no script given (ss_script= or fw_cfg)"\nexit 125\n' > /tmp/ss-script
fi
unset ss_script

echo "SS-BEGIN"
sh /tmp/ss-script < /dev/null
rc=$?
echo "SS-EXIT $rc"
sync
poweroff -f
# Should poweroff fail, returning makes the kernel panic; panic=-1 plus
# QEMU's -no-reboot then ends the VM anyway.
sleep 5
