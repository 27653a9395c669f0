"""k3trt.contract: the artifact contract every stage shares: component cards, the manifest, errors, precision,
argument validators, image limits, engine compatibility. It imports no stage and nothing heavy."""
