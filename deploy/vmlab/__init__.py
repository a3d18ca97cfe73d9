"""The VM lab (deploy/vmlab.sh): Debian 12 VMs with real systemd, the agent installed by
deploy/install.sh through the Vagrant provisioner, Docker on the flannel subnet.

image.py builds and caches the disk image and the wheels; machines.py owns the namespace,
the taps, QEMU and the guest agents' host ends; guest_agent.py runs inside the VMs;
scenario.py provisions and checks; cli.py is the command.
"""
