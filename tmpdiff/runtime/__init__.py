"""Schedule-driven sampling: runs each denoising step on the engine the schedule names."""
