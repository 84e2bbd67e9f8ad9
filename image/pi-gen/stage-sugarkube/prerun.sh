#!/bin/bash -e
# pi-gen runs this before the stage: start from the previous stage's root file system
# (stage2, Raspberry Pi OS Lite) unless a CONTINUE=1 build already has one.
if [ ! -d "${ROOTFS_DIR}" ]; then
	copy_previous
fi
