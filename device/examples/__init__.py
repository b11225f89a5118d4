"""Reference programs on the device library (``linux_appliance``: a Linux appliance)."""
