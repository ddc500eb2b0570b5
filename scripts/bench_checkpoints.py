"""Shared by the Python parts of scripts/bench.sh."""
import time


def wait_checkpoint(status, after):
    """Waits until the job (`status()` returns its `eddy status --json`) runs and has completed a
    checkpoint newer than `after`; returns that checkpoint's id."""
    while True:
        s = status()
        done = [c["checkpoint_id"] for c in s["checkpoints"] if c["state"] == "completed"]
        if s["state"] == "running" and done and max(done) > after:
            return max(done)
        time.sleep(0.2)
