"""Many devices and hosts: the device mesh, how arrays are split over it, multi-host coordination."""
