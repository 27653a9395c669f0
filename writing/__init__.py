"""k3trt.writing: what only the writers (export, calibration, engines, the CLI) need: atomic writes, staging,
locks, and the markers that say which folders and files k3trt wrote. The runtime never imports it."""
