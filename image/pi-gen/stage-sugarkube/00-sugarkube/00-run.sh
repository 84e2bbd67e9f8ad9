#!/bin/bash -e
# Install sugarkube-agent from the very .deb that `make pi-gen-stage` copied into files/: the same
# file `make image-test` installs with this script and boots under systemd-nspawn. The package
# enables sugarkube-agent.service; the image's first boot starts it.
shopt -s nullglob
debs=(files/sugarkube-agent_*_all.deb)
if [ "${#debs[@]}" -ne 1 ]; then
	echo "00-sugarkube: want exactly one files/sugarkube-agent_*_all.deb (run: make pi-gen-stage), found ${#debs[@]}" >&2
	exit 1
fi
deb=$(basename "${debs[0]}")
install -m 644 "${debs[0]}" "${ROOTFS_DIR}/var/tmp/${deb}"
on_chroot <<CHROOT
apt-get install -y --no-install-recommends "/var/tmp/${deb}"
rm -f "/var/tmp/${deb}"
systemctl is-enabled sugarkube-agent.service
CHROOT
