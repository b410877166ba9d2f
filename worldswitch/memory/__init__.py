"""Guest memory, the ground floor: guest RAM and its bounds-checked accessor (`guest.py`), and the
guest-physical layout (`layout.py`). Devices, loaders and the VMM use it; it imports nothing of
worldswitch but the error hierarchy."""
