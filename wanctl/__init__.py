"""wanctl: the control CLI of the wand daemon."""
