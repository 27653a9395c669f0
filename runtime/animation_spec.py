"""What an animation request may hold: its modes, defaults and ranges (no heavy imports, so the CLI's `--help` can
name them without loading torch)."""
from __future__ import annotations

MODES = ("deforum", "zoom-out", "zoom-in")
COLOR_COHERENCE = ("none", "rgb", "hsv", "lab")  # Deforum's 'Match Frame 0 RGB/HSV/LAB'
MAX_FRAMES = 10_000
MAX_FRAMES_PER_KEY = 240
DEFAULT_FRAMES, DEFAULT_FPS, DEFAULT_FRAMES_PER_KEY = 48, 12, 8
ZOOM_RANGE = (0.1, 10.0)  # Deforum zoom per frame; 1 = still
ANGLE_RANGE = (-360.0, 360.0)  # degrees per frame
DEFORUM_STRENGTH = 0.3  # share of the schedule each frame re-runs (diffusers' image-to-image default)
